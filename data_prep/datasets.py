"""Training datasets of aligned face crops: image folder, list file, insightface RecordIO, packed, synthetic.

Every dataset maps an index to ``(image, label, bad)`` where ``image`` is the model input of SPEC
section 3 (BGR as OpenCV reads it, ``(x - 127.5) / 128``, ``3 x H x W`` float32, horizontally flipped
when asked), ``label`` the class index and ``bad`` the number of unreadable samples that were replaced
to produce it. An index may be an ``int`` or an ``(index, flip)`` pair as yielded by
:class:`sphereface_plus.engine.sampler.ResumableSampler` (the flip is decided by the sampler so that
augmentation is reproducible on resume and independent of the DataLoader workers).

A missing or unreadable image never stops training: it is logged with its path and replaced,
deterministically, by the next readable sample (``index + 1``, ``index + 2``, ...); the trainer sums
the ``bad`` counts and reports them at the end.

Sources (``data.source``):

- ``folder``: ``root/<identity>/<image>``, labels in sorted folder order (SPEC section 2, CASIA);
- ``list``: a text file of ``relative/path label`` lines, paths relative to ``root``;
- ``rec``: insightface ``train.rec`` + ``train.idx`` (MXNet RecordIO), read without MXNet;
- ``packed``: the shards written by ``sphereface-plus align --pack`` (:mod:`data_prep.packed`);
- ``synthetic``: the generated identities of :mod:`data_prep.synthetic`, aligned with their known
  landmarks into a cache folder on first use.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from data_prep.geometry import cut_wide_crop, to_bgr

logger = logging.getLogger(__name__)

__all__ = [
    "FaceDataset",
    "ImageFolderDataset",
    "ListDataset",
    "RecordIODataset",
    "PackedDataset",
    "prepare_synthetic",
    "build_train_dataset",
    "preprocess",
    "read_recordio_index",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
RECORDIO_MAGIC = 0xCED7230A
_IRHEADER = struct.Struct("<IfQQ")  # flag, label, id, id2 (mxnet.recordio.IRHeader)
_MAX_REPLACEMENTS = 100


def to_network_tensor(image_bgr: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` BGR uint8 -> ``3 x H x W`` float32 ``(x - 127.5) / 128``: the one model transform
    (SPEC section 3), shared by training and feature extraction."""
    t = torch.from_numpy(np.ascontiguousarray(image_bgr)).permute(2, 0, 1).float()
    return t.sub_(127.5).div_(128.0)


def preprocess(image: np.ndarray, input_size: Tuple[int, int], flip: bool = False) -> torch.Tensor:
    """BGR uint8 ``H x W x 3`` -> ``3 x H x W`` float32 ``(x - 127.5) / 128`` (SPEC section 3).

    A 112x112 crop fed to a 112x96 model is cut to its central 96 columns
    (:func:`data_prep.geometry.cut_wide_crop`). Any other size mismatch is an error (the data was
    aligned for another template).
    """
    image = to_bgr(image)
    h, w = input_size
    fitted = cut_wide_crop(image, input_size)
    if fitted is None:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} (WxH), the model expects {w}x{h}")
    if flip:
        fitted = fitted[:, ::-1]
    return to_network_tensor(fitted)


def _decode(data: bytes) -> Optional[np.ndarray]:
    import cv2

    arr = np.frombuffer(data, dtype=np.uint8)
    return cv2.imdecode(arr, cv2.IMREAD_COLOR) if arr.size else None


class FaceDataset(Dataset):
    """Base class: subclasses provide ``__len__``, ``num_classes``, ``label(i)``, ``read(i)``, ``describe(i)``."""

    num_classes: int = 0

    def __init__(self, input_size: Sequence[int] = (112, 96)):
        self.input_size = (int(input_size[0]), int(input_size[1]))

    def __len__(self) -> int:
        raise TypeError(f"{type(self).__name__} must define __len__")

    def label(self, index: int) -> int:
        raise TypeError(f"{type(self).__name__} must define label()")

    def read(self, index: int) -> Optional[np.ndarray]:
        """The BGR uint8 image, or None when it cannot be read."""
        raise TypeError(f"{type(self).__name__} must define read()")

    def describe(self, index: int) -> str:
        return f"{type(self).__name__}[{index}]"

    def _try(self, index: int, flip: bool) -> Optional[torch.Tensor]:
        try:
            image = self.read(index)
            if image is None:
                raise ValueError("missing or not a decodable image")
            return preprocess(image, self.input_size, flip)
        except Exception as exc:  # any unreadable sample is replaced, never fatal
            logger.warning("unreadable training image %s: %s (replaced by the next sample)", self.describe(index), exc)
            return None

    def __getitem__(self, item: Any) -> Tuple[torch.Tensor, int, int]:
        index, flip = item if isinstance(item, tuple) else (item, False)
        n = len(self)
        for bad in range(min(n, _MAX_REPLACEMENTS)):
            i = (int(index) + bad) % n
            x = self._try(i, bool(flip))
            if x is not None:
                return x, self.label(i), bad
        raise RuntimeError(
            f"{_MAX_REPLACEMENTS} consecutive unreadable images from {self.describe(index)} on: "
            "the dataset root is probably wrong"
        )


class _PathDataset(FaceDataset):
    def __init__(self, root, items: List[Tuple[str, int]], input_size=(112, 96)):
        super().__init__(input_size)
        self.root = Path(root)
        self.paths = [p for p, _ in items]
        self.labels = np.asarray([lab for _, lab in items], dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1 if len(items) else 0

    def __len__(self) -> int:
        return len(self.paths)

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def describe(self, index: int) -> str:
        return str(self.root / self.paths[index])

    def read(self, index: int) -> Optional[np.ndarray]:
        import cv2

        return cv2.imread(str(self.root / self.paths[index]), cv2.IMREAD_COLOR)


class ImageFolderDataset(_PathDataset):
    """``root/<identity>/<image>``; labels 0..C-1 in sorted identity-folder order."""

    def __init__(self, root, input_size=(112, 96)):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root {str(root)!r} is not a folder (expected root/<identity>/<image>)")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        items = []
        for label, name in enumerate(classes):
            for f in sorted((root / name).iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    items.append((f"{name}/{f.name}", label))
        if not items:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}/<identity>/")
        self.classes = classes
        super().__init__(root, items, input_size)
        self.num_classes = len(classes)


class ListDataset(_PathDataset):
    """A list file of ``relative/path label`` lines (paths may contain spaces; the label is the last field)."""

    def __init__(self, root, list_file, input_size=(112, 96)):
        list_file = Path(list_file)
        if not list_file.is_file():
            raise FileNotFoundError(f"list file {str(list_file)!r} does not exist (set data.list_file=...)")
        items = []
        with open(list_file, "r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.rsplit(None, 1)
                try:
                    if len(parts) != 2:
                        raise ValueError
                    label = int(parts[1])
                    if label < 0:
                        raise ValueError
                except ValueError:
                    raise ValueError(
                        f"{list_file}:{lineno}: expected 'relative/path label' with a non-negative integer "
                        f"label, got {line!r}"
                    ) from None
                items.append((parts[0], label))
        if not items:
            raise ValueError(f"list file {str(list_file)!r} has no entries")
        super().__init__(root, items, input_size)


# ---------------------------------------------------------------------------------------- RecordIO
def read_recordio_index(idx_path) -> List[Tuple[int, int]]:
    """``train.idx``: ``key<TAB>byte offset`` per line -> sorted ``[(key, offset)]``."""
    out = []
    with open(idx_path, "r", encoding="ascii") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{idx_path}:{lineno}: expected 'key<TAB>offset', got {line.rstrip()!r}")
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

    def __init__(self, root, input_size=(112, 96)):
        super().__init__(input_size)
        root = Path(root)
        rec = root if root.suffix == ".rec" else root / "train.rec"
        idx = rec.with_suffix(".idx")
        for p in (rec, idx):
            if not p.is_file():
                raise FileNotFoundError(f"{str(p)!r} does not exist (data.source=rec wants train.rec + train.idx)")
        self.rec_path = rec
        self._fd: Optional[int] = None
        self._pid: Optional[int] = None
        offsets = dict(read_recordio_index(idx))
        first = min(offsets)
        flag, labels, _ = self._parse_header(self._read_record(offsets[first]))
        if flag > 0 and first == 0 and len(labels) >= 2 and labels[0] >= 1:
            a, b = int(labels[0]), int(labels[1])
            keys = [k for k in range(1, a) if k in offsets]
            self.num_classes = b - a
        else:
            keys = sorted(offsets)
            self.num_classes = -1
        self.offsets = np.asarray([offsets[k] for k in keys], dtype=np.int64)
        self.keys = np.asarray(keys, dtype=np.int64)
        # read every image record's label once (header bytes only, fast) for sampling/statistics
        self.labels = np.asarray([self._read_label(int(o)) for o in self.offsets], dtype=np.int64)
        if self.num_classes < 0:
            self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self._close()

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
        parts = []
        pos = offset
        while True:
            head = os.pread(fd, 8, pos)
            if len(head) < 8:
                raise ValueError(f"truncated record header at byte {pos}")
            magic, lrec = struct.unpack("<II", head)
            if magic != RECORDIO_MAGIC:
                raise ValueError(f"bad RecordIO magic 0x{magic:08x} at byte {pos} (expected 0x{RECORDIO_MAGIC:08x})")
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
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
            labels = list(struct.unpack_from(f"<{flag}f", body))
            return flag, labels, body[n:]
        return flag, [label], body

    def _read_label(self, offset: int) -> int:
        fd = self._file()
        head = os.pread(fd, 8 + _IRHEADER.size + 4, offset)
        flag, label, _, _ = _IRHEADER.unpack_from(head, 8)
        if flag > 0:
            (label,) = struct.unpack_from("<f", head, 8 + _IRHEADER.size)
        return int(label)

    def read(self, index: int) -> Optional[np.ndarray]:
        _, _, body = self._parse_header(self._read_record(int(self.offsets[index])))
        return _decode(body)


# ------------------------------------------------------------------------------------------ packed
class PackedDataset(FaceDataset):
    """The memory-mapped pack of ``sphereface-plus align --pack`` (:class:`data_prep.packed.PackedReader`).

    Crops are stored decoded, so a sample is one page-cache read and no JPEG decoding.
    """

    def __init__(self, root, input_size=(112, 96)):
        super().__init__(input_size)
        from data_prep.packed import PackedReader

        self.root = Path(root)
        self.reader = PackedReader(root)
        self.labels = self.reader.labels
        self.num_classes = int(self.reader.num_classes)

    def __len__(self) -> int:
        return len(self.reader)

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def describe(self, index: int) -> str:
        return f"{self.reader.data_path} (entry {index}: {self.reader.path(index)})"

    def read(self, index: int) -> Optional[np.ndarray]:
        return self.reader.read(index)


# --------------------------------------------------------------------------------------- synthetic
def prepare_synthetic(
    cache_dir,
    num_identities: int,
    images_per_identity: int,
    seed: int,
    template: str = "112x96",
    pairs_per_fold: int = 60,
) -> Path:
    """Generate the synthetic identities (:mod:`data_prep.synthetic`) and align them with their known landmarks.

    Returns the cache folder: ``raw/`` (``images/``, ``landmarks.txt``, ``pairs.txt``) and ``aligned/``
    (crops mirroring ``raw/images``, so ``raw/pairs.txt`` applies to ``aligned/``). Both steps are
    skipped when a finished cache with the same parameters exists.
    """
    import cv2

    from data_prep.geometry import align_face
    from data_prep.synthetic import ensure_synthetic_dataset
    from sphereface_plus.utils import atomic_write_bytes, atomic_write_json, progress

    cache = Path(cache_dir)
    params = {"num_identities": int(num_identities), "images_per_identity": int(images_per_identity),
              "seed": int(seed), "template": template, "pairs_per_fold": int(pairs_per_fold)}
    stamp = cache / "aligned.json"
    if stamp.is_file() and (cache / "raw" / "pairs.txt").is_file():
        try:
            if json.loads(stamp.read_text()) == params:
                return cache
        except ValueError:
            pass
    syn = ensure_synthetic_dataset(cache / "raw", num_identities, images_per_identity, seed, pairs_per_fold=pairs_per_fold)
    for rel, pts in progress(sorted(syn.landmarks.items()), desc="align synthetic", unit="img", leave=False):
        image = cv2.imread(str(syn.images / rel), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"synthetic image {syn.images / rel} was not written")
        crop = align_face(image, pts, template=template)
        ok, enc = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise RuntimeError(f"could not encode the aligned crop of {rel}")
        atomic_write_bytes(cache / "aligned" / rel, enc.tobytes())
    atomic_write_json(stamp, params)
    return cache


#: the values of ``data.source`` (one owner: the readers below; config validation and docs read it here)
DATA_SOURCES = ("synthetic", "folder", "list", "rec", "packed")


def check_data_config(data_cfg) -> Tuple[int, int]:
    """Check ``data.source`` and ``data.template`` before anything is written; the crop size ``(H, W)``."""
    from sphereface_plus.config import ConfigError

    from data_prep.geometry import TEMPLATES, template_size

    if data_cfg.source not in DATA_SOURCES:
        raise ConfigError(f"data.source={data_cfg.source!r} is not valid; choose one of {', '.join(DATA_SOURCES)}")
    if data_cfg.template not in TEMPLATES:
        raise ConfigError(f"data.template={data_cfg.template!r} is not valid; choose one of {', '.join(TEMPLATES)}")
    if data_cfg.source != "synthetic" and not data_cfg.root:
        raise ConfigError(f"data.source={data_cfg.source!r} needs data.root=<folder>; "
                          "or use data.source=synthetic for the generated demo identities")
    return template_size(data_cfg.template)


def build_train_dataset(data_cfg, input_size: Sequence[int], synthetic_cache=None) -> FaceDataset:
    """The dataset named by ``data.source`` (see the module docstring).

    ``synthetic_cache``: the folder for ``source=synthetic`` (default ``data.synthetic.cache_dir``).
    """
    source = data_cfg.source
    if source == "synthetic":
        s = data_cfg.synthetic
        cache = Path(synthetic_cache or s.cache_dir or "synthetic")
        prepare_synthetic(cache, s.num_identities, s.images_per_identity, s.seed, data_cfg.template, s.pairs_per_fold)
        return ImageFolderDataset(cache / "aligned", input_size)
    if source == "folder":
        return ImageFolderDataset(data_cfg.root, input_size)
    if source == "list":
        list_file = data_cfg.list_file or str(Path(data_cfg.root) / "list.txt")
        return ListDataset(data_cfg.root, list_file, input_size)
    if source == "rec":
        return RecordIODataset(data_cfg.root, input_size)
    if source == "packed":
        return PackedDataset(data_cfg.root, input_size)
    raise ValueError(f"data.source={source!r}: choose one of {', '.join(DATA_SOURCES)}")
