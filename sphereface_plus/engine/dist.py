"""Distributed set-up from the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

``setup_distributed(device)`` returns a small :class:`DistInfo`. With a world size of 1 no process
group is created at all, so a plain ``python -m sphereface_plus train`` never touches
``torch.distributed``. Above 1 the backend is NCCL on CUDA and gloo on CPU (docs/theory.md#sphereface-recipe: the
global batch is split across processes).

``timeout`` (``train.dist_timeout``, seconds) bounds every collective, so a peer that stopped answering
(stopped, hung, dead without its socket closing) fails the others in bounded time instead of torch's
default 30 minutes. A :class:`Heartbeat` in the process group's key-value store records each rank's
last iteration, so the error can say which rank went silent (:func:`describe_silent_ranks`).
"""
from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

from sphereface_plus.engine.device import resolve_device

logger = logging.getLogger(__name__)

__all__ = ["DistInfo", "setup_distributed", "cleanup_distributed", "all_reduce_sum", "all_reduce_max",
           "broadcast_object", "Heartbeat", "DEFAULT_TIMEOUT", "describe_silent_ranks", "explain_collective_failure"]

#: seconds a collective may wait for a peer (torch's own default); ``train.dist_timeout`` overrides it
DEFAULT_TIMEOUT = 1800.0


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto", timeout: Optional[float] = None) -> DistInfo:
    """Read the torchrun variables; create the process group only when ``WORLD_SIZE > 1``.

    ``timeout``: seconds any collective may wait for the other ranks (None: :data:`DEFAULT_TIMEOUT`).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, setting="train.device")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        seconds = float(timeout or DEFAULT_TIMEOUT)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=seconds))
        logger.info("process group: backend=%s rank=%d/%d device=%s timeout %g s", backend, rank, world_size, dev,
                    seconds)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity without a process group)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Maximum over processes (identity without a process group)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable; identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class Heartbeat:
    """Each rank's last iteration and time in the process group's store, written at most once per ``interval``.

    Read by :meth:`silent_ranks` when a collective fails, to name the rank(s) that stopped answering.
    Without a process group (or a store) every method does nothing.
    """

    PREFIX = "sphereface_plus/heartbeat/"

    def __init__(self, rank: int, world_size: int, interval: float = 1.0):
        self.rank, self.world_size, self.interval = rank, world_size, float(interval)
        self._last = -1e18
        self._broken = False

    @property
    def store(self):
        """The process group's store, looked up at each use and never kept: a reference held past
        ``destroy_process_group`` outlives the group, and the store's C++ threads then end at interpreter
        exit in no fixed order ("terminate called without an active exception", SIGABRT, seen under
        torchrun)."""
        if self._broken or self.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return None
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            return _get_default_store()
        except Exception:  # pragma: no cover - a torch without it: no names in the error
            return None

    def beat(self, iteration: int, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.interval:
            return
        store = self.store
        if store is None:
            return
        self._last = now
        try:
            store.set(f"{self.PREFIX}{self.rank}", f"{int(iteration)} {now:.3f}")
        except Exception:  # pragma: no cover - the store itself is gone
            self._broken = True

    def read(self) -> List[Tuple[int, Optional[int], Optional[float]]]:
        """``(rank, last iteration, seconds since)`` of every rank (None, None: never heard of)."""
        out: List[Tuple[int, Optional[int], Optional[float]]] = []
        store = self.store
        if store is None:
            return out
        now = time.time()
        for r in range(self.world_size):
            key = f"{self.PREFIX}{r}"
            try:
                if not store.check([key]):
                    out.append((r, None, None))
                    continue
                it, t = store.get(key).decode().split()
                out.append((r, int(it), now - float(t)))
            except Exception:
                out.append((r, None, None))
        return out

    def silent_ranks(self, after: float) -> List[Tuple[int, Optional[int], Optional[float]]]:
        """The ranks (other than this one) not heard of for more than ``after`` seconds, or never."""
        return [(r, it, age) for r, it, age in self.read() if r != self.rank and (age is None or age > after)]


def describe_silent_ranks(heartbeat: Heartbeat, timeout: float) -> str:
    """``rank 1 (last heard at iteration 12, 31 s ago)`` for the ranks silent longer than half ``timeout``."""
    silent = heartbeat.silent_ranks(after=max(timeout / 2.0, heartbeat.interval * 2))
    parts = [f"rank {r} (" + (f"last heard at iteration {it}, {age:.0f} s ago)" if it is not None else "never heard of)")
             for r, it, age in silent]
    return ", ".join(parts)


def explain_collective_failure(exc: BaseException, heartbeat: Optional[Heartbeat], timeout: float, rank: int):
    """A :class:`~sphereface_plus.errors.RunEnvironmentError` naming the silent rank(s) for a collective that
    failed (timed out, or a peer's connection closed), or None when ``exc`` does not look like one."""
    from sphereface_plus.errors import RunEnvironmentError, one_line

    text = str(exc)
    silent = describe_silent_ranks(heartbeat, timeout) if heartbeat is not None else ""
    lowered = text.lower()
    if not silent and not any(w in lowered for w in ("timed out", "timeout", "connection", "closed", "peer")):
        return None
    who = f"{silent} stopped answering" if silent else "a peer process stopped answering"
    detail = one_line(exc)
    if len(detail) > 200:
        detail = detail[:200] + "..."
    return RunEnvironmentError(
        f"rank {rank}: {who}; a collective operation gave up after train.dist_timeout={timeout:g} s ({detail}); "
        "check that process (stopped, hung, out of memory, its machine down), then restart with --resume auto")
