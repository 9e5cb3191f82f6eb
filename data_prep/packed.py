"""Packed aligned crops: every crop in one memory-mappable uint8 array, for fast training I/O.

``sphereface-plus align --pack`` writes, next to the aligned folder tree:

``packed.npy``
    A standard NumPy ``.npy`` file (format 1.0, C order) holding one ``uint8`` array of shape
    ``N x H x W x 3``: the BGR crops (as ``cv2.imread`` returns them) in the order of the training
    list. ``np.load(path, mmap_mode='r')`` opens it without reading it; a crop is one contiguous
    ``H * W * 3`` byte slice, so random access costs one page-cache read and no JPEG decoding.
``packed.json``
    The index::

        {"format": "sphereface-plus-pack", "version": 1, "data": "packed.npy",
         "shape": [N, H, W, 3], "template": "112x96", "classes": [<identity folder names>],
         "paths": [<crop paths relative to the aligned root>], "labels": [<int>, ...]}

    ``labels[i]`` is the class of crop ``i`` and ``classes[labels[i]]`` its identity folder (labels
    follow sorted folder order, like the list file). The index also holds
    ``"checksum": {"algorithm": "sha256", "chunk_items": K, "chunks": [<hex>, ...]}``: the SHA-256 of
    the bytes of every run of ``K`` consecutive crops. :class:`PackedReader` verifies a chunk the
    first time it reads a crop of it (in each process), so flipped bytes are refused with a line
    naming the file and the crops, never trained on; ``sphereface-plus check DIR`` verifies a whole
    pack before a long run. Packs written before (no ``checksum``) are read with a warning.

Both files are written to temporary names and moved into place (array first, index last), so a
reader never sees a partial pack: the index only appears once the array it describes is complete.
Crops take ``H*W*3`` bytes each uncompressed (32 KiB for 112x96): CASIA-WebFace (~0.49M crops) is
about 16 GB, which the OS page cache serves far faster than decoding as many JPEGs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from multiprocessing import get_context
from pathlib import Path
from tokenize import TokenError  # numpy parses a .npy header with tokenize
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from sphereface_plus.errors import InputFileError, MissingFileError

logger = logging.getLogger(__name__)

FORMAT = "sphereface-plus-pack"
VERSION = 1
DATA_NAME = "packed.npy"
INDEX_NAME = "packed.json"
#: crops per checksummed chunk: 256 crops of 112x96 are 8 MiB, verified in a few milliseconds
CHUNK_ITEMS = 256


class PackWriter:
    """Stream ``count`` crops of ``height x width x 3`` into ``<directory>/packed.npy`` + index.

    Use as a context manager; :meth:`add` appends one BGR uint8 crop. On a clean exit the array and
    then the index are moved into place; on an exception the temporary files are removed and any
    previous pack is left as it was.
    """

    def __init__(self, directory, count: int, height: int, width: int, data_name: str = DATA_NAME,
                 index_name: str = INDEX_NAME):
        self.directory = Path(directory)
        self.count, self.shape = int(count), (int(height), int(width), 3)
        self.data_path = self.directory / data_name
        self.index_path = self.directory / index_name
        self._tmp = self.directory / f".{data_name}.{os.getpid()}.tmp"
        self._fh = None
        self.written = 0
        self._chunks: List[str] = []
        self._hash = None

    def __enter__(self) -> "PackWriter":
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fh = open(self._tmp, "wb")
        np.lib.format.write_array_header_1_0(
            self._fh, {"descr": "|u1", "fortran_order": False, "shape": (self.count, *self.shape)}
        )
        return self

    def add(self, image: np.ndarray) -> None:
        if image.shape != self.shape or image.dtype != np.uint8:
            raise ValueError(
                f"crop {self.written} is {image.shape} {image.dtype}, the pack holds {self.shape} uint8 crops "
                "(all crops of one pack must come from one template)"
            )
        if self.written >= self.count:
            raise ValueError(f"more than the announced {self.count} crops")
        data = np.ascontiguousarray(image).tobytes()
        self._fh.write(data)
        if self._hash is None:
            self._hash = hashlib.sha256()
        self._hash.update(data)
        self.written += 1
        if self.written % CHUNK_ITEMS == 0:
            self._chunks.append(self._hash.hexdigest())
            self._hash = None

    def finish(self, paths: Sequence[str], labels: Sequence[int], classes: Sequence[str], template: str) -> None:
        """Check completeness, then publish the array and the index (call inside the ``with``)."""
        from sphereface_plus.utils import atomic_write_text

        if self.written != self.count or len(paths) != self.count or len(labels) != self.count:
            raise ValueError(
                f"pack incomplete: announced {self.count} crops, wrote {self.written}, "
                f"{len(paths)} paths, {len(labels)} labels"
            )
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        # the index names the array; remove a stale index first so that no reader pairs it with the new data
        if self.index_path.exists():
            self.index_path.unlink()
        os.replace(self._tmp, self.data_path)
        index = {
            "format": FORMAT,
            "version": VERSION,
            "data": self.data_path.name,
            "shape": [self.count, *self.shape],
            "template": template,
            "classes": list(classes),
            "paths": list(paths),
            "labels": [int(v) for v in labels],
            "checksum": {"algorithm": "sha256", "chunk_items": CHUNK_ITEMS,
                         "chunks": self._chunks + ([self._hash.hexdigest()] if self._hash is not None else [])},
        }
        atomic_write_text(self.index_path, json.dumps(index, separators=(",", ":")) + "\n")

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tmp.exists():
            self._tmp.unlink()


def _read_crop(task: Tuple[str, str]) -> Tuple[str, Optional[np.ndarray]]:
    from data_prep.image_files import read_image_file

    root, rel = task
    return rel, read_image_file(os.path.join(root, rel))


def _init_reader_worker() -> None:
    import cv2

    cv2.setNumThreads(1)


def pack_folder(
    root,
    entries: Sequence[Tuple[str, int]],
    classes: Sequence[str],
    template: str,
    height: int,
    width: int,
    out_dir=None,
    workers: int = 1,
) -> Path:
    """Read the aligned crops ``root/<rel>`` of ``entries`` ((rel, label) in list order) into a pack.

    Writes ``<out_dir or root>/packed.npy`` and ``packed.json``; returns the index path. A crop that
    cannot be read or has the wrong size is an error naming it (the crops were just written by
    ``align``, so this means the folder was changed underneath).
    """
    from sphereface_plus.utils import progress

    root = Path(root)
    out = Path(out_dir) if out_dir is not None else root
    tasks = [(str(root), rel) for rel, _ in entries]
    with PackWriter(out, len(entries), height, width) as writer:
        bar = progress(total=len(tasks), desc="pack", unit="img")
        if workers > 1 and len(tasks) >= 64:
            ctx = get_context("fork") if "fork" in _start_methods() else get_context()
            with ctx.Pool(workers, initializer=_init_reader_worker) as pool:
                it: Iterable = pool.imap(_read_crop, tasks, chunksize=64)
                _consume(it, writer, bar)
        else:
            _consume(map(_read_crop, tasks), writer, bar)
        bar.close()
        writer.finish([rel for rel, _ in entries], [lab for _, lab in entries], classes, template)
    logger.info("packed %d crops into %s", len(entries), writer.data_path)
    return writer.index_path


def _start_methods() -> List[str]:
    import multiprocessing

    return multiprocessing.get_all_start_methods()


def _consume(results: Iterable, writer: PackWriter, bar) -> None:
    for rel, img in results:
        if img is None:
            raise ValueError(f"cannot pack {rel}: the aligned crop is missing or unreadable")
        writer.add(img)
        bar.update(1)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_index_fields(index: dict, path: Path) -> None:
    """The types and ranges of a pack index's fields (module docstring), before any of them is used."""
    problems = []
    if not (isinstance(index.get("data"), str) and index["data"] and Path(index["data"]).name == index["data"]):
        problems.append(f"data={index.get('data')!r} must be a file name next to the index")
    shape = index.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(_is_int(v) and v >= 0 for v in shape) and shape[3] == 3):
        problems.append(f"shape={shape!r} must be [N, H, W, 3]")
    for key, kind in (("classes", str), ("paths", str), ("labels", int)):
        value = index.get(key)
        if not (isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)):
            problems.append(f"{key} must be a list of {kind.__name__}")
    if not _is_int(index.get("version", 0)):
        problems.append(f"version={index.get('version')!r} must be an integer")
    checksum = index.get("checksum")
    if checksum is not None and not (isinstance(checksum, dict) and _is_int(checksum.get("chunk_items"))
                                     and isinstance(checksum.get("chunks"), list)
                                     and all(isinstance(c, str) for c in checksum["chunks"])):
        problems.append("checksum must be {'algorithm', 'chunk_items': int, 'chunks': [hex digests]}")
    if problems:
        raise InputFileError(f"{path} is not a valid pack index: {'; '.join(problems)}; re-pack with "
                             "'sphereface-plus align ... --pack'")


class PackedReader:
    """Random access to a pack: ``reader[i] -> (BGR uint8 H x W x 3 crop, label)``.

    ``path`` is the folder holding ``packed.json`` (the ``align --output`` folder), or the index or
    data file itself. The array is memory-mapped on first access, in each process separately (the
    reader pickles without its map, so DataLoader workers can share it).

    Attributes: ``labels`` (int64 array), ``num_classes``, ``classes`` (identity names),
    ``paths`` (crop paths relative to the aligned root), ``template``, ``image_shape`` (H, W, 3).
    """

    def __init__(self, path):
        p = Path(path)
        if p.is_dir():
            p = p / INDEX_NAME
        elif p.suffix == ".npy":
            p = p.with_suffix(".json")
        if not p.is_file():
            raise MissingFileError(
                f"no pack index at {p}: create one with 'sphereface-plus align ... --pack' "
                "(or pass the folder that holds packed.json)"
            )
        from sphereface_plus.utils import read_text

        try:
            index = json.loads(read_text(p, "pack index"))
        except (ValueError, RecursionError) as exc:
            raise InputFileError(f"{p} is not a valid pack index (its JSON does not parse: {exc})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise InputFileError(f"{p} is not a {FORMAT} index (format field: {index.get('format') if isinstance(index, dict) else None!r})")
        _check_index_fields(index, p)
        if index.get("version", 0) > VERSION:
            raise InputFileError(f"{p} is pack version {index['version']}; this toolkit reads up to version {VERSION}")
        self.index_path = p
        self.data_path = p.parent / index["data"]
        self.shape = tuple(int(v) for v in index["shape"])
        self.template = index.get("template", "")
        self.classes: List[str] = list(index["classes"])
        self.paths: List[str] = list(index["paths"])
        try:  # a label beyond int64 is refused here; the range check below names the valid ones
            self.labels = np.asarray(index["labels"], dtype=np.int64)
        except OverflowError:
            raise InputFileError(f"{p}: labels outside 0..{len(self.classes) - 1}") from None
        if not (len(self.paths) == len(self.labels) == self.shape[0]):
            raise InputFileError(f"{p}: {len(self.paths)} paths, {len(self.labels)} labels but {self.shape[0]} crops")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise InputFileError(f"{p}: labels outside 0..{len(self.classes) - 1}")
        self.num_classes = len(self.classes)
        self._array: Optional[np.ndarray] = None
        checksum = index.get("checksum")
        self.chunk_items = int(checksum["chunk_items"]) if checksum else 0
        self.chunk_digests: List[str] = list(checksum["chunks"]) if checksum else []
        if checksum and (checksum.get("algorithm") != "sha256" or self.chunk_items <= 0
                         or len(self.chunk_digests) != -(-self.shape[0] // self.chunk_items)):
            raise InputFileError(f"{p}: its checksum entry does not describe {self.shape[0]} crops; re-pack with "
                                 "'sphereface-plus align ... --pack'")
        if not checksum:
            logger.warning("%s has no checksums (written by an older toolkit): damaged bytes would go unnoticed; "
                           "re-pack with 'sphereface-plus align ... --pack' to add them", p)
        self._verified: set = set()
        self._failed: set = set()

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return self.shape[1], self.shape[2], self.shape[3]

    @property
    def array(self) -> np.ndarray:
        """The memory-mapped ``N x H x W x 3`` uint8 array (read-only)."""
        if self._array is None:
            if not self.data_path.is_file():
                raise MissingFileError(f"pack data {self.data_path} (named by {self.index_path}) is missing")
            try:  # the header's shape is checked against the file's size by the mapping itself
                arr = np.load(self.data_path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OverflowError, EOFError, OSError, SyntaxError, MemoryError, TokenError) as exc:
                raise InputFileError(f"{self.data_path} is not a readable .npy array of crops ({str(exc)[:120]}); "
                                     "re-pack with 'sphereface-plus align ... --pack'") from None
            if arr.shape != self.shape or arr.dtype != np.uint8:
                raise InputFileError(
                    f"{self.data_path} holds {arr.shape} {arr.dtype}, its index {self.index_path} says {self.shape} uint8"
                )
            self._array = arr
        return self._array

    def __len__(self) -> int:
        return self.shape[0]

    def verify_chunk(self, chunk: int) -> None:
        """Check the SHA-256 of chunk ``chunk`` (once per process); InputFileError naming the crops on a mismatch."""
        if not self.chunk_items or chunk in self._verified:
            return
        lo, hi = chunk * self.chunk_items, min((chunk + 1) * self.chunk_items, self.shape[0])
        if chunk in self._failed or hashlib.sha256(np.ascontiguousarray(self.array[lo:hi]).data).hexdigest() \
                != self.chunk_digests[chunk]:
            self._failed.add(chunk)
            raise InputFileError(f"{self.data_path}: crops {lo}..{hi - 1} (chunk {chunk}) fail their checksum: the "
                                 "file was damaged after it was written; re-pack it with 'sphereface-plus align ... "
                                 "--pack' (or restore a copy)")
        self._verified.add(chunk)

    def verify(self, progress_bar: bool = False) -> int:
        """Verify every chunk; returns how many were checked (0 for a pack without checksums)."""
        for c in range(len(self.chunk_digests)):
            self.verify_chunk(c)
        return len(self.chunk_digests)

    def read(self, index: int) -> np.ndarray:
        """Crop ``index`` as a writable BGR uint8 copy (its chunk verified on first use)."""
        i = int(index)
        if self.chunk_items:
            self.verify_chunk(i // self.chunk_items)
        return np.array(self.array[i])

    def __getitem__(self, index: int) -> Tuple[np.ndarray, int]:
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"pack index {index} out of range 0..{len(self) - 1}")
        return self.read(i), int(self.labels[i])

    def path(self, index: int) -> str:
        return self.paths[int(index)]

    def read_bytes(self, index: int) -> bytes:
        """Crop ``index`` encoded as an (uncompressed, lossless) BMP, for readers that decode bytes."""
        import cv2

        ok, buf = cv2.imencode(".bmp", self.read(index))
        if not ok:
            raise RuntimeError(f"could not encode pack entry {index}")
        return buf.tobytes()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_array"] = None  # each process maps the file itself
        return state
