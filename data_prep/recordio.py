"""insightface's training sets: ``train.rec`` + ``train.idx`` (MXNet RecordIO), read without MXNet
(``data.source: rec``). The record layout is :class:`RecordIODataset`'s docstring; every length and offset
is checked against the file's size before it is read.
"""
from __future__ import annotations

import logging
import math
import os
import struct
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from data_prep.datasets import SCAN_LIMIT, FaceDataset, decode_crop
from sphereface_plus.errors import InputFileError

logger = logging.getLogger(__name__)

__all__ = ["RECORDIO_MAGIC", "RecordIODataset", "read_recordio_index"]

RECORDIO_MAGIC = 0xCED7230A
_IRHEADER = struct.Struct("<IfQQ")  # flag, label, id, id2 (mxnet.recordio.IRHeader)


def read_recordio_index(idx_path) -> List[Tuple[int, int]]:
    """``train.idx``: ``key<TAB>byte offset`` per line -> sorted ``[(key, offset)]`` (non-negative integers)."""
    from sphereface_plus.utils import read_text

    out = []
    for lineno, line in enumerate(read_text(idx_path, "RecordIO index").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not all(p.isdigit() and len(p) <= 18 for p in parts):
            raise InputFileError(f"{idx_path}:{lineno}: expected 'key<TAB>offset' (two non-negative integers), got "
                                 f"{line.strip()[:80]!r}")
        out.append((int(parts[0]), int(parts[1])))
    return sorted(out)


class RecordIODataset(FaceDataset):
    """insightface ``train.rec`` + ``train.idx`` without MXNet.

    Record layout (dmlc-core RecordIO): ``uint32 magic 0xced7230a``, ``uint32 lrecord`` whose upper
    3 bits are the continuation flag (0 whole record, 1 first / 2 middle / 3 last part of a record
    that was split where its payload contained the magic word) and lower 29 bits the part length; the
    payload is padded to 4 bytes. A payload starts with the ``IRHeader`` ``<IfQQ`` (flag, label, id,
    id2); when ``flag > 0``, ``flag`` float32 labels follow and the first one is the class. The image
    (JPEG) bytes come last.

    insightface sets open with a header record (key 0, ``flag > 0``) whose labels ``(a, b)`` say that
    image records are keys ``1 .. a-1`` and identity records ``a .. b-1``, so there are ``b - a``
    classes; without it every record is an image and the class count is ``max(label) + 1``.
    """

    def __init__(self, root, input_size=(112, 96), scan_limit: int = None):
        from sphereface_plus.errors import require_file

        super().__init__(input_size)
        root = Path(root)
        rec = root if root.suffix == ".rec" else root / "train.rec"
        idx = rec.with_suffix(".idx")
        for p in (rec, idx):
            require_file(p, "data.root: RecordIO file", "data.source=rec wants a folder with train.rec + train.idx")
        self.rec_path = rec
        self._fd: Optional[int] = None
        self._pid: Optional[int] = None
        offsets = dict(read_recordio_index(idx))
        if not offsets:
            raise InputFileError(f"{idx} lists no records")
        first = min(offsets)
        try:
            flag, labels, _ = self._parse_header(self._read_record(offsets[first]))
        except ValueError as exc:
            raise InputFileError(f"{rec} is not an insightface RecordIO file: {exc}") from None
        if flag > 0 and first == 0 and len(labels) >= 2 and labels[0] >= 1:
            a, b = labels[0], labels[1]
            if not (math.isfinite(a) and math.isfinite(b) and a == int(a) and b == int(b) and 1 <= a < b):
                raise InputFileError(f"{rec}: its header record says image keys 1..{a:g} and identities {a:g}..{b:g}; "
                                     "not an insightface RecordIO header (expected 1 <= a < b, integers)")
            a, b = int(a), int(b)
            keys = [k for k in sorted(offsets) if 1 <= k < a]
            self.num_classes = b - a
        else:
            keys = sorted(offsets)
            self.num_classes = -1
        self.offsets = np.asarray([offsets[k] for k in keys], dtype=np.int64)
        self.keys = np.asarray(keys, dtype=np.int64)
        # read every image record's label once (header bytes only, fast) for sampling/statistics
        labels = []
        for key, offset in zip(keys, self.offsets):
            try:
                labels.append(self._read_label(int(offset)))
            except ValueError as exc:
                raise InputFileError(f"{rec} (record key {key}, offset {int(offset)}): {exc}") from None
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.num_classes > 0 and len(self.labels) and int(self.labels.max()) >= self.num_classes:
            raise InputFileError(f"{rec}: a record has label {int(self.labels.max())} but the header says "
                                 f"{self.num_classes} identities")
        if self.num_classes < 0:
            self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self._scan(SCAN_LIMIT if scan_limit is None else scan_limit)
        self._enable_marks()
        for i in self._scan_bad:
            self._flags[i] = 1
        self._close()

    def where(self) -> str:
        return f"RecordIO file {str(self.rec_path)!r}"

    def __len__(self) -> int:
        return len(self.offsets)

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def describe(self, index: int) -> str:
        return f"{self.rec_path} (record key {int(self.keys[index])}, offset {int(self.offsets[index])})"

    # each DataLoader worker opens its own descriptor (a forked one would share the file position)
    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def _close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, None
        return state

    def _read_record(self, offset: int) -> bytes:
        fd = self._file()
        size = os.fstat(fd).st_size
        parts = []
        pos = offset
        while True:
            head = os.pread(fd, 8, pos) if pos < size else b""
            if len(head) < 8:
                raise ValueError(f"truncated record header at byte {pos}")
            magic, lrec = struct.unpack("<II", head)
            if magic != RECORDIO_MAGIC:
                raise ValueError(f"bad RecordIO magic 0x{magic:08x} at byte {pos} (expected 0x{RECORDIO_MAGIC:08x})")
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            if pos + 8 + length > size:  # checked before the read allocates ``length`` bytes
                raise ValueError(f"truncated record at byte {pos}: {max(size - pos - 8, 0)} of {length} bytes")
            data = os.pread(fd, length, pos + 8)
            if len(data) < length:
                raise ValueError(f"truncated record at byte {pos}: {len(data)} of {length} bytes")
            parts.append(data)
            pos += 8 + ((length + 3) & ~3)
            if cflag in (0, 3):
                break
            if cflag not in (1, 2):
                raise ValueError(f"bad RecordIO continuation flag {cflag} at byte {pos}")
        # the writer split the record where the magic word occurred; put it back between the parts
        return struct.pack("<I", RECORDIO_MAGIC).join(parts)

    @staticmethod
    def _parse_header(payload: bytes) -> Tuple[int, List[float], bytes]:
        if len(payload) < _IRHEADER.size:
            raise ValueError(f"record of {len(payload)} bytes is shorter than its IRHeader")
        flag, label, _id, _id2 = _IRHEADER.unpack_from(payload)
        body = payload[_IRHEADER.size :]
        if flag > 0:
            n = 4 * flag
            if n > len(body):
                raise ValueError(f"record header says {flag} labels, but only {len(body)} bytes follow it")
            labels = list(struct.unpack_from(f"<{flag}f", body))
            return flag, labels, body[n:]
        return flag, [label], body

    def _read_label(self, offset: int) -> int:
        """The class of the record at ``offset`` (its first label); ValueError for a cut or non-integer one."""
        fd = self._file()
        head = os.pread(fd, 8 + _IRHEADER.size + 4, offset)
        if len(head) < 8 + _IRHEADER.size:
            raise ValueError("the record is cut short before its label")
        flag, label, _, _ = _IRHEADER.unpack_from(head, 8)
        if flag > 0:
            if len(head) < 8 + _IRHEADER.size + 4:
                raise ValueError("the record is cut short before its label")
            (label,) = struct.unpack_from("<f", head, 8 + _IRHEADER.size)
        if not (math.isfinite(label) and label == int(label) and 0 <= label < 2 ** 31):
            raise ValueError(f"label {label:g} is not a class index")
        return int(label)

    def read(self, index: int) -> np.ndarray:
        _, _, body = self._parse_header(self._read_record(int(self.offsets[index])))
        return decode_crop(body)
