"""Training datasets of aligned face crops: image folder, list file, insightface RecordIO, packed, synthetic.

Every dataset maps an index to ``(image, label, bad)`` where ``image`` is the model input of
docs/theory.md#preprocessing (BGR as OpenCV reads it, ``(x - 127.5) / 128``, ``3 x H x W`` float32, horizontally flipped
when asked), ``label`` the class index and ``bad`` the number of unreadable samples that were replaced
to produce it. An index may be an ``int`` or an ``(index, flip)`` pair as yielded by
:class:`sphereface_plus.engine.sampler.ResumableSampler` (the flip is decided by the sampler so that
augmentation is reproducible on resume and independent of the DataLoader workers).

A missing or unreadable image never stops training: it is logged with its path and replaced,
deterministically, by the next readable sample (``index + 1``, ``index + 2``, ...); the trainer sums
the ``bad`` counts and reports them at the end.

Sources (``data.source``):

- ``folder``: ``root/<identity>/<image>``, labels in sorted folder order (docs/theory.md#sphereface-recipe, CASIA);
- ``list``: a text file of ``relative/path label`` lines, paths relative to ``root``;
- ``rec``: insightface ``train.rec`` + ``train.idx`` (MXNet RecordIO), read without MXNet (:mod:`data_prep.recordio`);
- ``packed``: the shards written by ``sphereface-plus align --pack`` (:mod:`data_prep.packed`);
- ``synthetic``: the generated identities of :mod:`data_prep.synthetic`, aligned with their known
  landmarks into a cache folder on first use, read as a ``folder``.

Which reader a recipe's ``data.source`` gets is :mod:`data_prep.training_set`'s.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from data_prep.geometry import cut_wide_crop, to_bgr
from data_prep.image_files import IMAGE_EXTENSIONS
from sphereface_plus.errors import InputFileError

logger = logging.getLogger(__name__)

__all__ = [
    "FaceDataset",
    "ImageFolderDataset",
    "ListDataset",
    "PackedDataset",
    "preprocess",
]

_MAX_REPLACEMENTS = 100
#: images decoded at construction to catch a wrong root, raw photos or a broken tree up front; a
#: bigger set is sampled evenly and the rest is checked as it is read (CASIA's 494k images would
#: take minutes to decode at start-up)
SCAN_LIMIT = 512


#: ``(v - 127.5) / 128`` for every uint8 value ``v`` (exact in float32: a half-integer over a power of two)
_NORMALISE_LUT = (np.arange(256, dtype=np.float32) - np.float32(127.5)) / np.float32(128.0)


def to_network_tensor(image_bgr: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` BGR uint8 -> ``3 x H x W`` float32 ``(x - 127.5) / 128``: the one model transform
    (docs/theory.md#preprocessing), shared by training and feature extraction.

    A uint8 image goes through a 256-entry lookup table in one ``np.take`` that also transposes to
    ``3 x H x W`` (the same float32 values as the arithmetic, in half the time: ``bench/input_pipeline.py``);
    a (mirrored) view is read in place, without a copy first."""
    if image_bgr.dtype == np.uint8 and image_bgr.ndim == 3:
        out = np.empty((image_bgr.shape[2], image_bgr.shape[0], image_bgr.shape[1]), dtype=np.float32)
        np.take(_NORMALISE_LUT, image_bgr.transpose(2, 0, 1), out=out)
        return torch.from_numpy(out)
    t = torch.from_numpy(np.ascontiguousarray(image_bgr)).permute(2, 0, 1).float()
    return t.sub_(127.5).div_(128.0)


def preprocess(image: np.ndarray, input_size: Tuple[int, int], flip: bool = False) -> torch.Tensor:
    """BGR uint8 ``H x W x 3`` -> ``3 x H x W`` float32 ``(x - 127.5) / 128`` (docs/theory.md#preprocessing).

    A 112x112 crop fed to a 112x96 model is cut to its central 96 columns
    (:func:`data_prep.geometry.cut_wide_crop`). Any other size mismatch is an error (the data was
    aligned for another template).
    """
    image = to_bgr(image)
    h, w = input_size
    fitted = cut_wide_crop(image, input_size)
    if fitted is None:
        raise InputFileError(f"image is {image.shape[1]}x{image.shape[0]} (WxH), the model expects {w}x{h}")
    if flip:
        fitted = fitted[:, ::-1]
    return to_network_tensor(fitted)


def _fits(shape: Sequence[int], input_size: Tuple[int, int]) -> bool:
    h, w = input_size
    return tuple(shape[:2]) in ((h, w), (h, w + 16))


def decode_crop(data: bytes) -> np.ndarray:
    """A complete JPEG by the fast decoder (:func:`data_prep.jpeg.decode_bgr`, simplejpeg when installed);
    everything else by ``align``'s decoder and checks (:func:`data_prep.image_files.read_image`): empty file,
    JPEG without its end-of-image marker, undecodable or non-image content all raise ``ValueError`` with
    the reason."""
    from data_prep.jpeg import decode_bgr
    from data_prep.image_files import read_image

    fast = decode_bgr(data)
    return fast if fast is not None else read_image(data)[0]


class FaceDataset(Dataset):
    """Base class: subclasses provide ``__len__``, ``num_classes``, ``label(i)``, ``read(i)``, ``describe(i)``.

    Bad images (see the module docstring) are found in two places, so that a 500k-image tree starts
    in seconds and still no bad file reaches a batch:

    - at construction, :meth:`_scan` decodes a bounded, evenly spread sample (all images when there are
      at most ``scan_limit``): a tree in which nothing reads, or whose images have the wrong size
      (raw photos, another template), is one :class:`~sphereface_plus.errors.InputFileError` up front;
      the bad files it meets are left out (path datasets) or marked;
    - every read in :meth:`__getitem__` applies the same checks; a failing sample is replaced by the next
      readable one and marked in a shared-memory flag array, so marks made in DataLoader worker
      processes are seen by the main process.

    :attr:`bad_images` is the list of ``{"path", "reason"}`` found so far (for the trainer's start-up
    log and ``summary.json``).
    """

    #: ``(pairs.txt, crops folder)`` of the set's own verification pairs, where it has them (the synthetic set)
    verification_pairs = None

    num_classes: int = 0

    def __init__(self, input_size: Sequence[int] = (112, 96)):
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self._found: List[Dict[str, str]] = []  # bad files met by the up-front scan (left out or marked)
        self._reasons: Dict[int, str] = {}  # index -> reason, for marks made in this process
        self._flags: Optional[torch.Tensor] = None
        self._scan_bad: List[int] = []

    def __len__(self) -> int:
        raise TypeError(f"{type(self).__name__} must define __len__")

    def label(self, index: int) -> int:
        raise TypeError(f"{type(self).__name__} must define label()")

    def read(self, index: int) -> np.ndarray:
        """The BGR uint8 image; raises ``OSError`` / ``ValueError`` saying why it cannot be used."""
        raise TypeError(f"{type(self).__name__} must define read()")

    def describe(self, index: int) -> str:
        return f"{type(self).__name__}[{index}]"

    def where(self) -> str:
        """The data source in words, for messages."""
        return type(self).__name__

    def _load(self, index: int, flip: bool = False) -> torch.Tensor:
        image = self.read(index)
        if image is None:  # a subclass outside this module may still return None
            raise ValueError("missing or not a decodable image")
        return preprocess(image, self.input_size, flip)

    # ------------------------------------------------------------------ bad-image bookkeeping
    def _reason(self, index: int) -> Optional[str]:
        """Why sample ``index`` cannot be used, or None when it can (the full check of a training read)."""
        try:
            self._load(index)
            return None
        except FileNotFoundError:
            return "missing file"
        except (OSError, ValueError) as exc:
            return str(exc)

    def _mark(self, index: int, reason: str) -> None:
        if self._flags is not None:
            self._flags[index] = 1
        if index not in self._reasons:
            self._reasons[index] = reason
            logger.warning("bad training image %s: %s (skipped)", self.describe(index), reason)

    @property
    def bad_images(self) -> List[Dict[str, str]]:
        """Every bad file found so far, ``[{"path", "reason"}]`` in index order (scan findings first).

        Includes the samples marked by DataLoader workers: their reason is re-derived here (the check
        is deterministic), so only the few bad files are read again.
        """
        out = list(self._found)
        marked = set(self._reasons)
        if self._flags is not None:
            marked |= set(int(i) for i in torch.nonzero(self._flags).flatten().tolist())
        for i in sorted(marked):
            reason = self._reasons.get(i) or self._reason(i) or "unreadable during training (readable now)"
            out.append({"path": self.describe(i), "reason": reason})
        return out

    def _scan(self, limit: int) -> List[int]:
        """The up-front check; returns the indices found bad (raises when nothing usable is found)."""
        n = len(self)
        if n == 0:
            return []
        picks = range(n) if n <= limit else np.unique(np.linspace(0, n - 1, max(1, limit)).round().astype(np.int64))
        bad: List[Tuple[int, str]] = []
        wrong: List[Tuple[int, Tuple[int, ...]]] = []
        readable = 0
        for i in picks:
            i = int(i)
            try:
                image = self.read(i)
                if image is None:
                    raise ValueError("missing or not a decodable image")
            except FileNotFoundError:
                bad.append((i, "missing file"))
                continue
            except (OSError, ValueError) as exc:
                bad.append((i, str(exc)))
                continue
            readable += 1
            if not _fits(image.shape, self.input_size):
                wrong.append((i, tuple(image.shape[:2])))
        checked = len(picks)
        h, w = self.input_size
        if readable == 0:
            i, reason = bad[0]
            scope = f"all {checked}" if checked == n else f"all {checked} checked (of {n})"
            raise InputFileError(
                f"{self.where()}: {scope} images are unusable, e.g. {self.describe(i)}: {reason}; "
                "check data.root (and data.list_file)"
            )
        if 2 * len(wrong) > readable:  # mostly the wrong size: raw photos or another template
            i, (fh, fw) = wrong[0]
            raise InputFileError(
                f"{self.where()}: images are {fw}x{fh} (WxH, e.g. {self.describe(i)}) but the model expects "
                f"{w}x{h} aligned crops (or {w + 16}x{h}); align them first with 'sphereface-plus align "
                f"--input <photos> --output <crops> --template {h}x{w}' and train on the crops"
            )
        for i, shape in wrong:
            bad.append((i, f"image is {shape[1]}x{shape[0]} (WxH), the model expects {w}x{h}"))
        bad.sort()
        for i, reason in bad:
            self._found.append({"path": self.describe(i), "reason": reason})
            logger.warning("bad training image %s: %s (skipped)", self.describe(i), reason)
        if checked < n:
            logger.info("checked %d of %d training images up front; the others are checked as they are read",
                        checked, n)
        self._scan_bad = [i for i, _ in bad]
        return self._scan_bad

    def _enable_marks(self) -> None:
        # shared memory: a mark set in a DataLoader worker (fork or spawn) is visible here
        self._flags = torch.zeros(len(self), dtype=torch.uint8).share_memory_()

    def __getitem__(self, item: Any) -> Tuple[torch.Tensor, int, int]:
        index, flip = item if isinstance(item, tuple) else (item, False)
        n = len(self)
        for bad in range(min(n, _MAX_REPLACEMENTS)):
            i = (int(index) + bad) % n
            if self._flags is not None and self._flags[i]:
                continue  # known bad: not read again
            try:
                return self._load(i, bool(flip)), self.label(i), bad
            except FileNotFoundError:
                self._mark(i, "missing file")
            except Exception as exc:  # any unreadable sample is replaced, never fatal
                self._mark(i, str(exc))
        raise InputFileError(
            f"{_MAX_REPLACEMENTS} consecutive unusable images from {self.describe(int(index))} on in "
            f"{self.where()}: check data.root and the images (bad ones are logged above)"
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

    def read(self, index: int) -> np.ndarray:
        with open(self.root / self.paths[index], "rb") as fh:
            return decode_crop(fh.read())

    def _drop(self, indices: Sequence[int]) -> None:
        keep = np.ones(len(self.paths), dtype=bool)
        keep[list(indices)] = False
        self.paths = [p for p, k in zip(self.paths, keep) if k]
        self.labels = self.labels[keep]

    def _check(self, scan_limit: int) -> None:
        self._drop(self._scan(scan_limit))
        if not self.paths:
            raise InputFileError(f"{self.where()}: no usable training image (every one is listed above as bad)")
        self._enable_marks()


class ImageFolderDataset(_PathDataset):
    """``root/<identity>/<image>``; labels 0..C-1 in sorted order of the identity folders that hold images.

    A folder without image files is not a class (it would give the classifier a row that no sample
    ever trains): it is skipped with a warning naming it, and so is a folder whose every image the
    up-front check found bad.
    """

    def __init__(self, root, input_size=(112, 96), scan_limit: int = None):
        from sphereface_plus.errors import require_dir

        root = require_dir(root, "data.root", "give the folder of aligned crops, root/<identity>/<image> "
                                              "(made by 'sphereface-plus align')")
        folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        items = []
        for name in folders:
            for f in sorted((root / name).iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."):
                    items.append((f"{name}/{f.name}", name))
        if not items:
            raise InputFileError(
                f"data.root {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in identity folders "
                f"({len(folders)} folders found); expected root/<identity>/<image>"
            )
        super().__init__(root, [(p, 0) for p, _ in items], input_size)
        self._check(SCAN_LIMIT if scan_limit is None else scan_limit)
        # classes: identity folders with at least one image left (labels follow sorted folder names)
        ids = [p.split("/", 1)[0] for p in self.paths]
        self.classes = sorted(set(ids))
        label_of = {c: k for k, c in enumerate(self.classes)}
        self.labels = np.asarray([label_of[c] for c in ids], dtype=np.int64)
        self.num_classes = len(self.classes)
        self.empty_folders = [f for f in folders if f not in label_of]
        if self.empty_folders:
            shown = ", ".join(self.empty_folders[:10]) + (", ..." if len(self.empty_folders) > 10 else "")
            logger.warning("%d identity folders under %s have no usable image and are not classes: %s",
                           len(self.empty_folders), root, shown)

    def where(self) -> str:
        return f"data.root {str(self.root)!r}"


class ListDataset(_PathDataset):
    """A list file of ``relative/path label`` lines (paths may contain spaces; the label is the last field)."""

    def __init__(self, root, list_file, input_size=(112, 96), scan_limit: int = None):
        from sphereface_plus.errors import require_file

        list_file = require_file(list_file, "list file", "set data.list_file=<file of 'relative/path label' lines> "
                                                         "(default <data.root>/list.txt)")
        self.list_file = list_file
        items = []
        from sphereface_plus.utils import read_text

        # the list file as UTF-8 text (a stray byte: one error line naming the file and line)
        for lineno, line in enumerate(read_text(list_file, "list file").splitlines(), 1):
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
                raise InputFileError(
                    f"{list_file}:{lineno}: expected 'relative/path label' with a non-negative integer "
                    f"label, got {line!r}"
                ) from None
            items.append((parts[0], label))
        if not items:
            raise InputFileError(f"list file {str(list_file)!r} has no entries ('relative/path label' lines)")
        super().__init__(root, items, input_size)
        self._check(SCAN_LIMIT if scan_limit is None else scan_limit)

    def where(self) -> str:
        return f"list file {str(self.list_file)!r} (images under data.root {str(self.root)!r})"


# ------------------------------------------------------------------------------------------ packed
class PackedDataset(FaceDataset):
    """The memory-mapped pack of ``sphereface-plus align --pack`` (:class:`data_prep.packed.PackedReader`).

    Crops are stored decoded, so a sample is one page-cache read and no JPEG decoding.
    """

    def __init__(self, root, input_size=(112, 96), scan_limit: int = None):
        super().__init__(input_size)
        from data_prep.packed import PackedReader

        self.root = Path(root)
        self.reader = PackedReader(root)
        self.labels = self.reader.labels
        self.num_classes = int(self.reader.num_classes)
        self._scan(SCAN_LIMIT if scan_limit is None else scan_limit)  # the crop size of the pack
        self._enable_marks()
        for i in self._scan_bad:
            self._flags[i] = 1

    def where(self) -> str:
        return f"pack {str(self.reader.data_path)!r}"

    def __len__(self) -> int:
        return len(self.reader)

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def describe(self, index: int) -> str:
        return f"{self.reader.data_path} (entry {index}: {self.reader.path(index)})"

    def read(self, index: int) -> np.ndarray:
        return self.reader.read(index)
