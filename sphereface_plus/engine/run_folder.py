"""One run-folder policy for every command that owns an output folder (``train``, ``cifar``, ``gan``, ``demo``).

A run folder holds one run. :class:`RunFolder` (a context manager, entered before anything is written
and held for the run's life) enforces it:

1. **Output locations are checked first**: the folder and its sub-folders (``checkpoints/``, ...) must
   be folders (not files) and writable, before any training starts (a path that is a file is an input
   mistake, exit status 2; a read-only or unwritable folder is the environment, exit status 1).
2. **An exclusive lock** (``<folder>/.run.lock``, ``fcntl.flock``) for the run's life: a second run
   started into the same folder is refused with the holder's pid, host and command. The kernel releases
   the lock on any exit (crash and ``kill -9`` included); a lock file still naming a process that is no
   longer running is detected on the next start, named in a warning and taken over.
3. **A folder that holds a run** (checkpoints, ``metrics.jsonl``, ``summary.json``) is refused unless the
   command was asked to resume (``--resume auto|PATH``), and the message names both ways out: resume, or
   another output folder. An elastic restart (torchrun sets ``TORCHELASTIC_RESTART_COUNT`` > 0) of the
   torchrun job that owns the folder (its ``TORCHELASTIC_RUN_ID``, recorded in ``.run.elastic`` when the
   job was accepted) resumes from the folder by itself (``--resume auto``), so ``torchrun --max-restarts N``
   never starts over, and a job refused at its first attempt is not "restarted" into someone else's run.
4. **Stale temporary files** (``.<name>.*.tmp`` of :func:`sphereface_plus.utils.atomic_open`) left by a
   writer that was killed are removed: with the lock held, no other writer can be using them.
5. On a failure before the run wrote anything, the folder is removed again if this run created it, so a
   mistake leaves nothing behind.

Under ``torch.distributed`` rank 0 checks and locks; its decision (or its error) is broadcast, so every
rank resumes (or stops with the same message) together.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from sphereface_plus.errors import RunEnvironmentError, ToolkitError, UsageError

logger = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "RUN_MARKERS", "RunFolder", "RunLock", "check_output_location", "run_files",
           "elastic_restart_count", "remove_stale_temp_files"]

LOCK_NAME = ".run.lock"
#: the ``TORCHELASTIC_RUN_ID`` of the torchrun job that owns the folder: only its restarts resume by themselves
ELASTIC_NAME = ".run.elastic"
#: files whose presence means a folder holds a run (besides ``checkpoints/*.pt``)
RUN_MARKERS = ("metrics.jsonl", "summary.json")


def elastic_restart_count() -> int:
    """How many times torchrun restarted this worker group (``TORCHELASTIC_RESTART_COUNT``; 0 outside torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def run_files(folder) -> List[Path]:
    """The files that show ``folder`` holds a run: checkpoints, ``metrics.jsonl``, ``summary.json``."""
    folder = Path(folder)
    found = sorted((folder / "checkpoints").glob("*.pt")) if (folder / "checkpoints").is_dir() else []
    found += [folder / m for m in RUN_MARKERS if (folder / m).is_file()]
    return found


def check_output_location(folder, subfolders: Sequence[str] = ("checkpoints",), what: str = "out_dir") -> None:
    """Refuse, before anything is written, an output folder that cannot hold the run's files.

    ``folder`` (and each of ``subfolders`` inside it, where they exist) must be a folder, not a file
    (:class:`UsageError`, exit status 2), and writable (:class:`RunEnvironmentError`, exit status 1); a
    folder that does not exist yet needs a writable existing parent.
    """
    folder = Path(folder)
    for p in [folder, *(folder / s for s in subfolders)]:
        if p.exists() and not p.is_dir():
            raise UsageError(f"{what} {str(folder)!r}: {str(p)!r} is a file, not a folder; move it away or choose "
                             f"another {what}")
    probe = folder
    while not probe.exists():  # the nearest existing ancestor must be a writable folder
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{what} {str(folder)!r}: {str(probe)!r} is a file, not a folder; choose another {what}")
    targets = [probe] + [folder / s for s in subfolders if (folder / s).is_dir()]
    for t in targets:
        _probe_writable(t, folder, what)


def _probe_writable(folder: Path, out: Path, what: str) -> None:
    """Create and remove a file in ``folder`` (``os.access`` is wrong for root and for read-only mounts)."""
    name = folder / f".write-probe.{os.getpid()}.tmp"
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        reason = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable (permission denied)",
                  errno.EPERM: "is not writable (operation not permitted)",
                  errno.ENOSPC: "is on a full disk", errno.EDQUOT: "is over its disk quota"}.get(
            exc.errno, f"cannot be written ({os.strerror(exc.errno or 0)})")
        raise RunEnvironmentError(f"{what} {str(out)!r}: {str(folder)!r} {reason}; choose a writable {what} "
                                  "(nothing was written)") from None


def remove_stale_temp_files(folders: Iterable[Path]) -> List[Path]:
    """Remove ``.*.tmp`` files of interrupted atomic writes (call with the folder's lock held)."""
    removed = []
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for p in Path(folder).glob(".*.tmp"):
            try:
                p.unlink()
                removed.append(p)
            except OSError:  # pragma: no cover - vanished or not ours to remove
                pass
    if removed:
        logger.warning("removed %d temporary file(s) of a write that was interrupted (a killed run): %s",
                       len(removed), ", ".join(str(p) for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    return True


class RunLock:
    """An exclusive ``flock`` on ``<folder>/.run.lock``, holding ``{"pid", "host", "command", "started"}``.

    ``name`` (the lock file), ``holder`` and ``busy_fix`` (the refusal's words) let another kind of folder
    use the same lock: a gallery's writers (``eval.gallery_store``).

    The kernel drops the lock when the process ends, however it ends; the file's content then names a
    process that no longer holds it (a stale lock), which :meth:`acquire` reports and takes over.
    """

    def __init__(self, folder, command: str = "", name: str = LOCK_NAME, holder: str = "another run",
                 busy_fix: str = "wait for it to finish or stop it, or choose another output folder"):
        self.folder, self.command = Path(folder), command
        self.path = self.folder / name
        self.holder, self.busy_fix = holder, busy_fix
        self._fd: Optional[int] = None
        self.stale: Optional[dict] = None

    def acquire(self) -> "RunLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UsageError(f"{self.folder} is in use by {self.holder} ({holder}); {self.busy_fix}") from None
            raise
        previous = _read_holder(fd)
        if previous:
            pid = previous.get("pid")
            same_host = previous.get("host") == socket.gethostname()
            state = ("no longer running" if same_host and isinstance(pid, int) and not _pid_alive(pid)
                     else "no longer holding it")
            self.stale = previous
            logger.warning("stale lock in %s: %s is %s (killed or crashed); taking the folder over",
                           self.path, _describe(previous), state)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)  # an empty lock file: a clean end, nothing stale
        except OSError:  # pragma: no cover - e.g. the disk went read-only
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"command": "unknown"}


def _describe(info: dict) -> str:
    if not info:
        return "a process that left no details"
    parts = [f"process {info.get('pid', '?')} on {info.get('host', '?')}"]
    if info.get("started"):
        parts.append(f"started {info['started']}")
    if info.get("command"):
        parts.append(f"'{info['command']}'")
    return ", ".join(parts)


class RunFolder:
    """The policy of the module docstring, as a context manager held for the run's life.

    ``resume``: what the user asked (None/False: a fresh run; ``"auto"``/True or a path: continue).
    After ``__enter__``, :attr:`resume` is the decision: None (fresh start), ``"auto"`` (the user's, or an
    elastic restart's) or the path. ``resume_hint`` / ``out_hint`` are the command's spellings of the two
    ways out, for the refusal message. ``is_main``: this process checks and locks (rank 0);
    ``distributed``: broadcast rank 0's decision to the other ranks.
    """

    def __init__(self, folder, resume=None, *, command: str = "", is_main: bool = True, distributed: bool = False,
                 subfolders: Sequence[str] = ("checkpoints",), temp_folders: Sequence[str] = ("", "checkpoints", "eval"),
                 resume_hint: str = "--resume auto", out_hint: str = "out_dir=<another folder>", what: str = "out_dir"):
        self.folder = Path(folder)
        self.requested = resume
        self.resume = None
        self.command, self.is_main, self.distributed = command, is_main, distributed
        self.subfolders, self.temp_folders = tuple(subfolders), tuple(temp_folders)
        self.resume_hint, self.out_hint, self.what = resume_hint, out_hint, what
        self.lock: Optional[RunLock] = None
        self._created: List[Path] = []
        self.elastic_restart = elastic_restart_count()

    def __enter__(self) -> "RunFolder":
        decision, error = None, None
        if self.is_main:
            try:
                decision = self._enter_main()
            except ToolkitError as exc:
                error = exc
            except OSError as exc:  # e.g. mkdir refused: one line (exit 1), and the other ranks learn it too
                error = RunEnvironmentError(f"{self.what} {str(self.folder)!r}: {os.strerror(exc.errno or 0)} "
                                            f"({exc.filename or self.folder}); choose a writable {self.what}")
        if self.distributed:
            from sphereface_plus.engine.dist import broadcast_object

            payload = broadcast_object((decision, None if error is None else (type(error), str(error))))
            decision = payload[0]
            if payload[1] is not None and error is None:  # rank 0 refused: every rank stops with its message
                cls, message = payload[1]
                error = cls(message) if issubclass(cls, ToolkitError) else UsageError(message)
        if error is not None:
            self.__exit__(type(error), error, None)  # __exit__ does not run when __enter__ raises
            raise error
        self.resume = decision
        return self

    def _enter_main(self):
        check_output_location(self.folder, self.subfolders, self.what)
        missing = []
        p = self.folder
        while not p.exists():
            missing.append(p)
            p = p.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = list(reversed(missing))
        self.lock = RunLock(self.folder, self.command).acquire()
        remove_stale_temp_files(self.folder / t if t else self.folder for t in self.temp_folders)
        requested = self.requested
        if requested is True:
            requested = "auto"
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
        marker = self.folder / ELASTIC_NAME
        if not requested and self.elastic_restart > 0 and run_id and _read(marker) == run_id:
            logger.warning("elastic restart %d (TORCHELASTIC_RESTART_COUNT): resuming %s from its newest checkpoint",
                           self.elastic_restart, self.folder)
            return "auto"
        if not requested:
            found = run_files(self.folder)
            if found:
                names = ", ".join(str(p.relative_to(self.folder)) for p in found[:3]) + (" ..." if len(found) > 3 else "")
                raise UsageError(f"{self.folder} already holds a run ({names}); continue it with {self.resume_hint}, "
                                 f"or start the new run in another folder ({self.out_hint})")
        if run_id:  # this torchrun job owns the folder: its restarts resume it (and only its restarts)
            marker.write_text(run_id)
        return requested or None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._cleanup_after_failure()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _cleanup_after_failure(self) -> None:
        """Remove what this run created when it failed before writing anything (only the lock file)."""
        if not self._created or not self._created[0].exists():
            return
        top = self._created[0]
        try:
            leftover = [p for p in top.rglob("*") if p.is_file() and p.name not in (LOCK_NAME, ELASTIC_NAME)]
        except OSError:  # pragma: no cover
            return
        if leftover:
            return
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        for p in sorted(top.rglob("*"), key=lambda q: len(q.parts), reverse=True):
            try:
                p.unlink() if p.is_file() else p.rmdir()
            except OSError:  # pragma: no cover
                return
        try:
            top.rmdir()
        except OSError:  # pragma: no cover
            pass
