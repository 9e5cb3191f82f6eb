"""Small shared helpers: atomic file writes, safe checkpoint loading, progress bars, logging.

Every part of the toolkit (alignment, training, evaluation) writes its results through these so that
an interrupted run never leaves a half-written file behind: data goes to a temporary file in the
same folder, is flushed to disk, then moved over the destination with ``os.replace`` (atomic on
POSIX file systems).
"""
from __future__ import annotations

import functools
import io
import json
import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional


@contextmanager
def atomic_open(path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success fsync it and ``os.replace`` it into place.

    On an exception the temporary file is removed and the destination is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@functools.lru_cache(maxsize=None)
def _umask() -> int:
    # os.umask can only be read by setting it; do that once, not around every write
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path) -> None:
    """``torch.save`` through a temporary file and ``os.replace``."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def safe_torch_load(path, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, no code."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)


def is_rank0() -> bool:
    """True on the process that logs and writes (rank 0, or any process outside torch.distributed)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # pragma: no cover - torch without distributed support
        pass
    return int(os.environ.get("RANK", "0")) == 0


def progress(iterable: Optional[Iterable] = None, *, disable: Optional[bool] = None, **kwargs: Any):
    """A tqdm progress bar that is quiet when stderr is not a terminal and on ranks other than 0.

    Set ``SPHEREFACE_PLUS_PROGRESS=1`` to force bars on (for example in a log file), ``=0`` to
    force them off.
    """
    from tqdm.auto import tqdm

    if disable is None:
        forced = os.environ.get("SPHEREFACE_PLUS_PROGRESS")
        if forced is not None:
            disable = forced == "0"
        else:
            disable = not (sys.stderr.isatty() and is_rank0())
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)


def setup_logging(level: int = logging.INFO, rank0_only: bool = True) -> None:
    """Configure the root logger once for command-line use (never called at import).

    On ranks other than 0 only warnings and errors are shown when ``rank0_only`` is set.
    """
    if rank0_only and not is_rank0():
        level = max(level, logging.WARNING)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
