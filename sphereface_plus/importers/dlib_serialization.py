"""dlib's binary serialisation (``dlib/serialize.h``, ``dlib/float_details.h``, ``dlib/cuda/tensor.h``),
read without dlib and bounded by the bytes the file has.

The encodings a DNN file uses (docs/import.md#dlib-file-format):

- an integer is one control byte then ``n`` little-endian magnitude bytes: ``n = byte & 0x0F`` and the
  sign bit ``0x80`` for a signed type; ``n = byte & 0x8F`` for an unsigned one. ``n`` must lie in
  ``1..sizeof(type)`` (``int`` 4, ``long`` / ``long long`` / ``size_t`` 8 on the 64-bit Linux that writes
  the released files);
- a ``bool`` is the character ``'0'`` or ``'1'``;
- a floating-point number is a ``float_details``: a signed 64-bit mantissa and a signed 16-bit exponent,
  ``value = mantissa * 2**exponent`` (exponents 32000 / 32001 / 32002 stand for +inf / -inf / NaN). The
  older ASCII encoding (a control byte with a bit of ``0x70`` set) is refused;
- a string is its length (an unsigned integer) then its bytes; layers name their format with one
  (``"con_4"``, ``"affine_"``...);
- a tensor (``resizable_tensor``) is the version 2, four ``long long`` dimensions (samples, k, rows,
  columns) and that many little-endian IEEE float32 values; an ``alias_tensor`` (a view into a layer's
  parameter tensor) is the version 1 and four dimensions, no data.

:class:`DlibStream` reads them from a ``bytes`` object. Every length, count and dimension is checked
against the bytes that remain before anything is allocated, so a truncated or altered file costs at most
its own size in memory and ends in one :class:`~sphereface_plus.errors.CheckpointError` that names the
byte offset and what was being read.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np

from sphereface_plus.errors import CheckpointError

__all__ = ["DlibStream", "INT_BYTES", "LONG_BYTES"]

#: ``sizeof`` of the C++ types the DNN files use (LP64: the released files come from 64-bit Linux)
INT_BYTES, LONG_BYTES = 4, 8
#: ``float_details`` exponents that encode +inf, -inf and NaN
_IS_INF, _IS_NINF, _IS_NAN = 32000, 32001, 32002


class DlibStream:
    """A cursor over the bytes of a dlib-serialised object; ``name`` goes into every error."""

    def __init__(self, data: bytes, name: str):
        self.data = memoryview(data)
        self.pos = 0
        self.name = name

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def fail(self, what: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.name}: {problem} at byte {self.pos} of {len(self.data)} while reading "
                               f"{what}: not a dlib model this toolkit can import (truncated or altered?)")

    def _take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining:
            raise self.fail(what, f"{n} bytes needed, {self.remaining} left")
        view = self.data[self.pos:self.pos + n]
        self.pos += n
        return view

    def integer(self, what: str, size: int = INT_BYTES, signed: bool = True) -> int:
        """A packed integer of a C++ type of ``size`` bytes (``ser_helper::unpack_int``)."""
        control = self._take(1, what)[0]
        n = control & (0x0F if signed else 0x8F)
        if not 1 <= n <= size:
            self.pos -= 1
            raise self.fail(what, f"integer control byte 0x{control:02x} (a {size}-byte "
                                  f"{'signed' if signed else 'unsigned'} integer)")
        value = int.from_bytes(self._take(n, what), "little")
        return -value if signed and control & 0x80 else value

    def count(self, what: str, limit: int) -> int:
        """An unsigned ``long`` that must lie in ``0..limit``."""
        value = self.integer(what, LONG_BYTES, signed=False)
        if value > limit:
            raise self.fail(what, f"a count of {value} where at most {limit} fit")
        return value

    def boolean(self, what: str) -> bool:
        ch = self._take(1, what)[0]
        if ch not in (0x30, 0x31):
            self.pos -= 1
            raise self.fail(what, f"byte 0x{ch:02x} where a bool ('0' or '1') belongs")
        return ch == 0x31

    def real(self, what: str) -> float:
        """A ``float_details`` as a Python float (its exact value: mantissa * 2**exponent)."""
        if self.remaining and self.data[self.pos] & 0x70:
            raise self.fail(what, "a number in dlib's old ASCII format (not supported)")
        mantissa = self.integer(what, LONG_BYTES)
        exponent = self.integer(what, 2)
        if exponent == _IS_INF:
            return math.inf
        if exponent == _IS_NINF:
            return -math.inf
        if exponent >= _IS_NAN:
            return math.nan
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:
            raise self.fail(what, f"a number out of range (mantissa {mantissa}, exponent {exponent})") from None

    def string(self, what: str) -> str:
        n = self.count(what, self.remaining)
        raw = bytes(self._take(n, what))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            self.pos -= n
            raise self.fail(what, f"a {n}-byte string that is not ASCII ({raw[:16]!r}...)") from None

    def version(self, what: str, accepted) -> str:
        """A layer's format string, which must be one of ``accepted``."""
        start = self.pos
        got = self.string(what)
        if got not in accepted:
            self.pos = start
            raise self.fail(what, f"format {got!r} where {' or '.join(map(repr, accepted))} belongs")
        return got

    def expect_int(self, what: str, accepted, size: int = INT_BYTES) -> int:
        start = self.pos
        value = self.integer(what, size)
        if value not in accepted:
            self.pos = start
            raise self.fail(what, f"version {value} where {' or '.join(map(str, accepted))} belongs")
        return value

    def _dims(self, what: str) -> Tuple[int, int, int, int]:
        dims = tuple(self.integer(what, LONG_BYTES) for _ in range(4))
        if min(dims) < 0:
            raise self.fail(what, f"negative tensor dimensions {dims}")
        return dims  # type: ignore[return-value]

    def tensor(self, what: str) -> np.ndarray:
        """A ``resizable_tensor``: float32 array of shape (samples, k, rows, columns)."""
        self.expect_int(what, (2,))
        dims = self._dims(what)
        n = math.prod(dims)
        if 4 * n > self.remaining:  # checked before anything is allocated
            raise self.fail(what, f"a tensor of {dims[0]}x{dims[1]}x{dims[2]}x{dims[3]} floats ({4 * n} bytes) "
                                  f"where {self.remaining} bytes are left")
        return np.frombuffer(self._take(4 * n, what), dtype="<f4").astype(np.float32).reshape(dims)

    def alias_tensor(self, what: str) -> Tuple[int, int, int, int]:
        """An ``alias_tensor``: only its shape (samples, k, rows, columns)."""
        self.expect_int(what, (1,))
        return self._dims(what)
