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

__all__ = ["ToolkitError", "UsageError", "InputFileError", "MissingFileError", "CheckpointError"]


class ToolkitError(Exception):
    """Base class of every error the toolkit reports to a user in one line."""


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
