"""Small shared helpers: atomic file writes, the file hash, the cache folder, safe checkpoint loading, progress
bars, logging.

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
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

#: the toolkit's cache folder (detector weights, exported graphs, GAN statistics); each user has one
CACHE_DIR = Path("~/.cache/sphereface_plus")


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


def read_text(path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a byte that is not UTF-8 is an ``InputFileError`` naming the file and line.

    (A non-UTF-8 byte in a pairs or list file would otherwise end in a ``UnicodeDecodeError`` traceback.)
    """
    from sphereface_plus.errors import InputFileError

    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputFileError(f"{what} {path}, line {line}: byte 0x{data[exc.start]:02x} is not UTF-8 text; save the "
                             "file as UTF-8 (for example: iconv -f latin1 -t utf-8)") from None


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
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, no code.

    A missing file raises :class:`~sphereface_plus.errors.MissingFileError`; a file that does not load
    (truncated, not a torch file, or holding Python objects that a weights-only load refuses) raises
    :class:`~sphereface_plus.errors.CheckpointError`. PyTorch's own message is deliberately not
    repeated: it advises loading with ``weights_only`` turned off, which would run code from the file.
    """
    import pickle
    import zipfile

    import torch

    from sphereface_plus.errors import CheckpointError, MissingFileError

    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        if not p.is_file():
            raise MissingFileError(f"checkpoint {str(p)!r} does not exist" if not p.is_dir() else
                                   f"checkpoint {str(p)!r} is a folder; give the .pt file (e.g. {p}/checkpoints/last.pt)")
        if p.stat().st_size == 0:
            raise CheckpointError(f"{str(p)!r} is not a valid checkpoint (truncated or not written by this toolkit): "
                                  "the file is empty")
    name = repr(str(path)) if isinstance(path, (str, os.PathLike)) else "the checkpoint"
    try:
        with warnings.catch_warnings():
            # torch warns about foreign pickles with advice about weights_only and "file an issue"
            warnings.filterwarnings("ignore", message=".*weights_only.*")
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, KeyError,
            TypeError, AttributeError, ImportError, IndexError) as exc:
        # the kind only: torch's text would tell the user to turn weights_only off
        kind = "it holds Python objects a safe load refuses" if isinstance(exc, pickle.UnpicklingError) and \
            "weights_only" in str(exc) and "Unsupported global" in str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{name} is not a valid checkpoint (truncated or not written by this toolkit): {kind}; "
            "use a checkpoint written by 'sphereface-plus train' (<out_dir>/checkpoints/*.pt) or "
            "'verify --save-model'"
        ) from None


def plain(obj: Any) -> Any:
    """``obj`` as plain JSON data: dict keys as strings, tuples as lists, numpy scalars and arrays as numbers
    and lists (reports and summaries are written as JSON)."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """The SHA-256 (hex) of a file's bytes, read in chunks (the one file-hash helper: weights, checkpoints,
    exported models, caches)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


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
    """A tqdm progress bar on a terminal; elsewhere a log line every few seconds; silent off rank 0.

    When stderr is not a terminal (a log file, a batch job, a pipe) a bar would be noise and no bar
    would be silence for minutes, so a :class:`LogProgress` logs ``desc: n/total (pct) rate, ETA``
    every ``SPHEREFACE_PLUS_PROGRESS_INTERVAL`` seconds (default 10) and once at the end. Set
    ``SPHEREFACE_PLUS_PROGRESS=1`` to force tqdm bars, ``=0`` to turn all progress output off.
    ``disable=True`` turns it off for this call.
    """
    from tqdm.auto import tqdm

    if disable is None:
        forced = os.environ.get("SPHEREFACE_PLUS_PROGRESS")
        if forced is not None:
            disable = forced == "0"
        elif not is_rank0():
            disable = True
        elif not sys.stderr.isatty():
            return LogProgress(iterable, **kwargs)
        else:
            disable = False
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)


class LogProgress:
    """The part of tqdm's interface the toolkit uses, reporting through ``logging`` at a fixed interval.

    ``disable`` is True (no bar is drawn), so callers that log their own line when there is no bar
    keep doing so.
    """

    disable = True

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[float] = None, initial: float = 0,
                 desc: str = "", unit: str = "it", interval: Optional[float] = None, **_ignored: Any):
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total, self.n, self.desc, self.unit = total, initial, desc or "progress", unit
        env = os.environ.get("SPHEREFACE_PLUS_PROGRESS_INTERVAL", "")
        self.interval = float(interval if interval is not None else (env or 10.0))
        self.postfix = ""
        self._start_n = initial
        self._t0 = self._last = time.monotonic()
        self._closed = False
        self._logger = logging.getLogger("sphereface_plus.progress")

    def __iter__(self):
        for item in self.iterable:  # type: ignore[union-attr]
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._log(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n > self._start_n:
                self._log(time.monotonic(), final=True)

    def line(self, now: Optional[float] = None, final: bool = False) -> str:
        """``desc: n/total (pct) rate unit/s, ETA m:ss [postfix]``."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._t0, 1e-9)
        rate = (self.n - self._start_n) / elapsed
        done = f"{self.n:g}"
        if self.total:
            done += f"/{self.total:g} ({100.0 * self.n / self.total:.0f}%)"
        text = f"{self.desc}: {done} {unit_rate(rate, self.unit)}"
        if final:
            text += f", done in {_clock(elapsed)}"
        elif self.total and rate > 0:
            text += f", ETA {_clock((self.total - self.n) / rate)}"
        return text + (f" [{self.postfix}]" if self.postfix else "")

    def _log(self, now: float, final: bool = False) -> None:
        self._logger.info("%s", self.line(now, final))


def unit_rate(rate: float, unit: str) -> str:
    return f"{rate:.3g} {unit}/s" if rate >= 1 or rate == 0 else f"{1.0 / rate:.3g} s/{unit}"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


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
