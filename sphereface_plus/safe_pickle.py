"""Restricted unpickling for files that come from outside (CIFAR pickles, insightface .bin packs).

``pickle.load`` on an untrusted file runs arbitrary code (any callable can be named in the stream).
This unpickler resolves only the globals in an explicit allow-list; anything else raises
``UnsafePickleError`` before it is imported, so nothing is executed.
"""
from __future__ import annotations

import io
import pickle
from typing import Any, Collection, Tuple

from sphereface_plus.errors import InputFileError

GlobalName = Tuple[str, str]

# What numpy arrays need to be rebuilt from a pickle (numpy 1.x and 2.x module names).
NUMPY_ARRAY_GLOBALS: frozenset = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # Python 2 pickles of byte strings loaded with encoding='bytes' or 'latin1'
        ("_codecs", "encode"),
    }
)


class UnsafePickleError(InputFileError, pickle.UnpicklingError):
    """The pickle names a global that is not on the allow-list."""


#: the encodings under which ``_codecs.encode`` spells a byte string in a protocol-2 pickle (one byte per char)
_BYTES_ENCODINGS = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"})


def _latin1_bytes(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """What ``_codecs.encode`` is allowed to be in a pickle: a str made bytes, one byte per character.

    Python 3 writes ``bytes`` into protocol-2 pickles as ``_codecs.encode(text, 'latin1')``. The real function
    takes any codec, and some of them grow their input (``hex``, ``base64``, ``uu``): nested calls turn a few
    hundred bytes of pickle into gigabytes. Here only a str and a Latin-1 spelling are accepted, so the result
    is never longer than the text the file holds."""
    if not isinstance(text, str) or str(encoding).lower() not in _BYTES_ENCODINGS or errors != "strict":
        raise UnsafePickleError(f"refusing _codecs.encode({type(text).__name__}, {str(encoding)[:20]!r}): a pickle "
                                "spells bytes as _codecs.encode(<str>, 'latin1') only; it may be corrupt or malicious")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: Collection[GlobalName] = (), **kwargs: Any):
        super().__init__(file, **kwargs)
        self._allowed = frozenset(allowed)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            if (module, name) == ("_codecs", "encode"):
                return _latin1_bytes
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to unpickle global {module}.{name}: this file may only contain "
            f"{self._describe()}; it may be corrupt or malicious"
        )

    def _describe(self) -> str:
        if not self._allowed:
            return "plain Python data (bytes, str, numbers, lists, tuples, dicts, bools)"
        names = ", ".join(sorted(f"{m}.{n}" for m, n in self._allowed))
        return f"plain Python data and {names}"


def restricted_load(file, allowed: Collection[GlobalName] = (), encoding: str = "ASCII") -> Any:
    """Unpickle from an open binary file, resolving only ``allowed`` globals."""
    return RestrictedUnpickler(file, allowed=allowed, encoding=encoding).load()


def restricted_loads(data: bytes, allowed: Collection[GlobalName] = (), encoding: str = "ASCII") -> Any:
    """Unpickle from bytes, resolving only ``allowed`` globals."""
    return restricted_load(io.BytesIO(data), allowed=allowed, encoding=encoding)
