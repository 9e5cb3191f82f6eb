"""Distributed set-up from the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

``setup_distributed(device)`` returns a small :class:`DistInfo`. With a world size of 1 no process
group is created at all, so a plain ``python -m sphereface_plus train`` never touches
``torch.distributed``. Above 1 the backend is NCCL on CUDA and gloo on CPU (docs/theory.md#sphereface-recipe: the
global batch is split across processes).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sphereface_plus.engine.device import resolve_device

logger = logging.getLogger(__name__)

__all__ = ["DistInfo", "setup_distributed", "cleanup_distributed", "all_reduce_sum"]


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


def setup_distributed(device: str = "auto") -> DistInfo:
    """Read the torchrun variables; create the process group only when ``WORLD_SIZE > 1``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, setting="train.device")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        logger.info("process group: backend=%s rank=%d/%d device=%s", backend, rank, world_size, dev)
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
