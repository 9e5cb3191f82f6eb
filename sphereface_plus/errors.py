"""The toolkit's own error type: a mistake in the user's input or set-up that one line can explain.

Every command catches :class:`ToolkitError` at the top (``sphereface_plus.cli``) and prints
``error: <message>`` with exit status 2, without a traceback (``--debug`` or
``SPHEREFACE_PLUS_DEBUG=1`` shows it). So the message itself must say what is wrong, where (the
file, the line, the value) and how to fix it. Anything else that escapes is a bug of the toolkit
and keeps its traceback.

Subclasses also derive from the built-in type a caller would expect (``ValueError`` for a bad
value, ``FileNotFoundError`` for a missing file), so ``except ValueError`` keeps working.
"""
from __future__ import annotations

from pathlib import Path

__all__ = [
    "ToolkitError", "UsageError", "InputFileError", "MissingFileError", "CheckpointError",
    "RunEnvironmentError", "TrainingDiverged", "RunStopped", "require_file", "require_dir", "one_line", "short_repr",
]


class ToolkitError(Exception):
    """Base class of every error the toolkit reports to a user in one line.

    ``exit_status``: what the command exits with (2: the input or the command line is wrong; 1: the
    environment failed: disk full, permissions, a hung peer, a run that diverged).
    """

    exit_status = 2


class UsageError(ToolkitError, ValueError):
    """A command-line argument or config value that cannot work (the message names it and the fix)."""


class InputFileError(ToolkitError, ValueError):
    """An input file that exists but cannot be used: wrong format, bad line, wrong image size."""


class MissingFileError(ToolkitError, FileNotFoundError):
    """An input file or folder that does not exist."""


class CheckpointError(InputFileError):
    """A file that is not a valid checkpoint (truncated, or not written by this toolkit).

    Never suggests loading it with ``weights_only=False``: that would run code from the file.
    """


class RunEnvironmentError(ToolkitError, OSError):
    """The machine, not the input: a full disk, a read-only or unwritable folder, a peer process that
    stopped answering. Exit status 1; the message names the path (or rank) and what to do."""

    exit_status = 1


class TrainingDiverged(ToolkitError, RuntimeError):
    """The loss stayed non-finite after every allowed rollback (exit status 1, the fix in the message)."""

    exit_status = 1


class RunStopped(ToolkitError):
    """A run stopped on request (SIGTERM, SIGINT, SIGUSR1) after writing its checkpoint.

    Not an error: :func:`sphereface_plus.cli.run_guarded` prints the message (where the checkpoint is,
    how to resume) without ``error:`` and exits with ``exit_status`` (143, 130 or 0,
    :data:`sphereface_plus.engine.preempt.EXIT_STATUS`).
    """

    def __init__(self, message: str, exit_status: int, signal_name: str = "", iteration: int = -1,
                 checkpoint: str = ""):
        super().__init__(message)
        self.exit_status = int(exit_status)
        self.signal_name, self.iteration, self.checkpoint = signal_name, int(iteration), checkpoint


def require_file(path, what: str, fix: str = "") -> Path:
    """``Path(path)`` when it is a file, else :class:`MissingFileError` naming ``what`` and the fix.

    For checks made before a command writes anything (``--resume``, ``train.init_from``,
    ``--checkpoint``...): ``require_file(args.resume, "--resume", "give an existing checkpoint or 'auto'")``.
    """
    p = Path(path)
    if not p.is_file():
        where = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise MissingFileError(f"{what} {str(p)!r} {where}" + (f"; {fix}" if fix else ""))
    return p


def require_dir(path, what: str, fix: str = "") -> Path:
    """``Path(path)`` when it is a folder, else :class:`MissingFileError` naming ``what`` and the fix."""
    p = Path(path)
    if not p.is_dir():
        where = "is a file, not a folder" if p.is_file() else "does not exist"
        raise MissingFileError(f"{what} {str(p)!r} {where}" + (f"; {fix}" if fix else ""))
    return p


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line (what ``error:`` prints).

    An error raised in a DataLoader worker arrives re-raised with the worker's traceback in its
    message ("Caught X in DataLoader worker process 0. Original Traceback ..."): its last line is
    the original message, so that one is kept.
    """
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        name, sep, rest = last.partition(": ")
        text = rest if sep and name.replace(".", "").replace("_", "").isalnum() else last
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(exc).__name__


def short_repr(value) -> str:
    """``repr(value)`` cut to a few items and characters: a value in an error message may be an enormous (or
    aliased: a YAML ``*ref``, a pickle's memo references) structure whose full repr would take minutes and
    gigabytes."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, 80, 80
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 6
    return short.repr(value)
