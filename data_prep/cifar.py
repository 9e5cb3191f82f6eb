"""Loaders for the CIFAR-10 / CIFAR-100 "python version" pickles (docs/theory.md#cifar-setup).

The official archives unpack to

- CIFAR-100: ``cifar-100-python/{train,test,meta}``; ``train``/``test`` are dicts with ``data``
  (N x 3072 uint8), ``fine_labels`` and ``coarse_labels``; ``meta`` holds ``fine_label_names``.
- CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``; each batch has ``data``
  and ``labels``; ``batches.meta`` holds ``label_names``.

The files were written by Python 2, so their keys load as ``bytes`` under ``encoding='bytes'`` (and as
``str`` under ``'latin1'``); files re-written by Python 3 have ``str`` keys. Both are accepted: every
file is read with ``encoding='bytes'`` and keys/names are decoded afterwards.

Security: the pickles come from outside, so they are read with the restricted unpickler of
:mod:`sphereface_plus.safe_pickle`, which resolves only what a numpy array needs
(``NUMPY_ARRAY_GLOBALS``); any other global (``os.system``, ``builtins.eval``, ...) raises
:class:`~sphereface_plus.safe_pickle.UnsafePickleError` before anything is imported or called.

Pixel layout: each row of ``data`` is channel-planar RGB (1024 red values, then 1024 green, then 1024
blue, each plane row-major 32 x 32). The loaders return ``N x 32 x 32 x 3`` uint8 arrays in **RGB**
order. Note this differs from the face pipeline's BGR convention (docs/interfaces.md): the CIFAR
network is trained on RGB, as the MHE reference code did, and never meets OpenCV-read images.

Nothing is downloaded: a missing dataset is an error that says which files are expected where.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from sphereface_plus.cifar.config import CIFAR_CLASSES
from sphereface_plus.errors import MissingFileError
from sphereface_plus.safe_pickle import NUMPY_ARRAY_GLOBALS, UnsafePickleError, restricted_load

__all__ = [
    "DATASETS",
    "CifarDataError",
    "find_cifar_dir",
    "load_cifar",
    "load_cifar_split",
    "load_cifar_class_names",
    "decode_cifar_rows",
    "read_cifar_pickle",
]

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
ROW_BYTES = 3 * IMAGE_SIZE * IMAGE_SIZE  # 3072

# dataset -> (folder name inside the archive, files per split, label key, meta file, names key, classes)
DATASETS: Dict[str, Dict[str, Any]] = {
    "cifar100": {
        "folder": "cifar-100-python",
        "splits": {"train": ["train"], "test": ["test"]},
        "label_key": "fine_labels",
        "meta": "meta",
        "names_key": "fine_label_names",
        "num_classes": CIFAR_CLASSES["cifar100"],
        "archive": "cifar-100-python.tar.gz",
    },
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "splits": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "label_key": "labels",
        "meta": "batches.meta",
        "names_key": "label_names",
        "num_classes": CIFAR_CLASSES["cifar10"],
        "archive": "cifar-10-python.tar.gz",
    },
}


#: the dataset names the loaders know (the recipe's, sphereface_plus.cifar.config.CIFAR_CLASSES)
CIFAR_DATASETS = tuple(DATASETS)


class CifarDataError(MissingFileError):
    """The CIFAR files are missing or malformed; the message names the file and how to fix it."""


def _spec(dataset: str) -> Dict[str, Any]:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise ValueError(f"unknown CIFAR dataset {dataset!r}; choose one of {sorted(DATASETS)}") from None


def _required_files(dataset: str) -> List[str]:
    spec = _spec(dataset)
    return [name for files in spec["splits"].values() for name in files]


def find_cifar_dir(root, dataset: str) -> Path:
    """The folder holding the pickles: ``root`` itself or ``root/<archive folder>``.

    ``root`` may be the unpacked archive folder (``cifar-100-python``) or the folder it was unpacked
    into. Raises :class:`CifarDataError` listing the expected files when neither has them all.
    """
    spec = _spec(dataset)
    root = Path(root).expanduser()
    required = _required_files(dataset)
    candidates = [root, root / spec["folder"]]
    for cand in candidates:
        if all((cand / name).is_file() for name in required):
            return cand
    # the best partial match makes the message precise about what is missing
    best = max(candidates, key=lambda c: sum((c / n).is_file() for n in required))
    missing = [n for n in required if not (best / n).is_file()]
    raise CifarDataError(
        f"{dataset} not found under {root}: expected the files {', '.join(required)} "
        f"(plus {spec['meta']} for class names) either directly in {root} or in {root / spec['folder']}; "
        f"missing in {best}: {', '.join(missing)}. Download {spec['archive']} from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html and unpack it there (nothing is downloaded "
        f"automatically)."
    )


def _text(value: Any) -> Any:
    """Decode Python-2 ``bytes`` keys/names; leave everything else alone."""
    if isinstance(value, bytes):
        return value.decode("latin1")
    return value


def read_cifar_pickle(path) -> Dict[str, Any]:
    """Read one CIFAR pickle with the restricted unpickler; keys come back as ``str``.

    Raises :class:`CifarDataError` naming the file for anything that is not a CIFAR dict, and lets
    :class:`~sphereface_plus.safe_pickle.UnsafePickleError` through (with the file name added) for a
    pickle that names a forbidden global.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            obj = restricted_load(fh, allowed=NUMPY_ARRAY_GLOBALS, encoding="bytes")
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except FileNotFoundError:
        raise CifarDataError(f"{path}: file not found") from None
    except Exception as exc:  # truncated / not a pickle at all
        raise CifarDataError(
            f"{path}: cannot read it as a CIFAR python pickle ({type(exc).__name__}: {exc}); the file may "
            f"be truncated or not from the 'python version' archive"
        ) from None
    if not isinstance(obj, dict):
        raise CifarDataError(f"{path}: expected a dict in the pickle, found {type(obj).__name__}")
    return {_text(k): v for k, v in obj.items()}


def decode_cifar_rows(data: np.ndarray) -> np.ndarray:
    """``N x 3072`` channel-planar RGB rows -> ``N x 32 x 32 x 3`` RGB uint8 (a contiguous copy)."""
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != ROW_BYTES:
        raise ValueError(f"expected N x {ROW_BYTES} rows, got shape {data.shape}")
    return np.ascontiguousarray(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))


def _batch_arrays(path: Path, label_key: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    d = read_cifar_pickle(path)
    for key in ("data", label_key):
        if key not in d:
            raise CifarDataError(
                f"{path}: no {key!r} entry (keys: {', '.join(map(str, d))}); is this the right dataset? "
                f"CIFAR-100 files have 'fine_labels', CIFAR-10 batches have 'labels'"
            )
    data = d["data"]
    if isinstance(data, (bytes, bytearray)):  # tolerate a raw byte string of rows
        data = np.frombuffer(data, dtype=np.uint8).reshape(-1, ROW_BYTES)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
        raise CifarDataError(
            f"{path}: 'data' must be an N x {ROW_BYTES} uint8 array, got {data.dtype} {data.shape}"
        )
    labels = np.asarray(d[label_key]).reshape(-1)
    if labels.shape[0] != data.shape[0]:
        raise CifarDataError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise CifarDataError(f"{path}: labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise CifarDataError(f"{path}: label {bad} outside [0, {num_classes}) in {label_key!r}")
    return data, labels


def load_cifar_split(root, dataset: str = "cifar100", split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split.

    Args:
        root: the unpacked archive folder or its parent (see :func:`find_cifar_dir`).
        dataset: ``'cifar100'`` (fine labels, 100 classes) or ``'cifar10'``.
        split: ``'train'`` or ``'test'``.

    Returns:
        ``(images, labels)``: ``N x 32 x 32 x 3`` uint8 **RGB** and ``N`` int64, in file order
        (CIFAR-10 training batches concatenated 1..5).
    """
    spec = _spec(dataset)
    if split not in spec["splits"]:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    folder = find_cifar_dir(root, dataset)
    rows, labels = [], []
    for name in spec["splits"][split]:
        data, lab = _batch_arrays(folder / name, spec["label_key"], spec["num_classes"])
        rows.append(data)
        labels.append(lab)
    data = np.concatenate(rows) if len(rows) > 1 else rows[0]
    images = decode_cifar_rows(data)
    labels_all = np.concatenate(labels) if len(labels) > 1 else labels[0]
    log.debug("loaded %s %s: %d images from %s", dataset, split, len(images), folder)
    return images, labels_all


def load_cifar(root, dataset: str = "cifar100") -> Dict[str, np.ndarray]:
    """Both splits: ``{'train_images', 'train_labels', 'test_images', 'test_labels'}`` (RGB uint8, int64)."""
    out: Dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        images, labels = load_cifar_split(root, dataset, split)
        out[f"{split}_images"] = images
        out[f"{split}_labels"] = labels
    return out


def load_cifar_class_names(root, dataset: str = "cifar100") -> List[str]:
    """Class names from ``meta`` / ``batches.meta``; ``class_<i>`` placeholders when the file is absent."""
    spec = _spec(dataset)
    folder = find_cifar_dir(root, dataset)
    path = folder / spec["meta"]
    if not path.is_file():
        log.warning("%s not found; naming classes class_0..class_%d", path, spec["num_classes"] - 1)
        return [f"class_{i}" for i in range(spec["num_classes"])]
    meta = read_cifar_pickle(path)
    if spec["names_key"] not in meta:
        raise CifarDataError(f"{path}: no {spec['names_key']!r} entry (keys: {', '.join(map(str, meta))})")
    names = [str(_text(n)) for n in meta[spec["names_key"]]]
    if len(names) != spec["num_classes"]:
        raise CifarDataError(f"{path}: {len(names)} class names, expected {spec['num_classes']}")
    return names


# ----------------------------------------------------------------------------------------------------
# augmentation and network input of the MHE CIFAR recipe (docs/theory.md#cifar-setup), on whole batches in torch


def _symmetric_index(pos, size: int):
    """Map positions in ``[-size, 2*size)`` onto ``[0, size)`` by edge-including mirroring.

    This is numpy's ``np.pad(mode='symmetric')``: ``-1 -> 0``, ``-2 -> 1``, ``size -> size - 1``.
    (``torch.nn.functional.pad(mode='reflect')`` would exclude the edge: ``-1 -> 1``.)
    """
    pos = torch.where(pos < 0, -pos - 1, pos)
    return torch.where(pos >= size, 2 * size - 1 - pos, pos)


def random_pad_crop_flip(images, generator=None, pad: int = 4):
    """Symmetric padding by ``pad``, a random crop back to the input size, a random horizontal flip.

    The reference did this image by image in numpy (``np.pad(..., 'symmetric')``, ``randint(9)``
    offsets, ``fliplr`` with probability 1/2); here the three steps are folded into one gather over
    the batch: each output pixel ``(b, y, x)`` reads the input at ``(row[b, y], col[b, x])``.

    Args:
        images: ``B x H x W x C`` tensor (any dtype, any device), ``pad <= min(H, W)``.
        generator: a CPU ``torch.Generator`` for the offsets and flips (None: the global one).

    Returns:
        ``B x H x W x C`` tensor of the same dtype and device.
    """
    b, h, w = images.shape[:3]
    if pad > min(h, w):
        raise ValueError(f"symmetric padding of {pad} needs images of at least {pad} pixels, got {h}x{w}")
    off_y = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    off_x = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    flip = torch.randint(0, 2, (b, 1), generator=generator).bool()
    rows = _symmetric_index(off_y + torch.arange(h) - pad, h)
    cols = off_x + torch.arange(w) - pad
    cols = _symmetric_index(torch.where(flip, cols.flip(1), cols), w)
    dev = images.device
    bidx = torch.arange(b, device=dev).view(b, 1, 1)
    return images[bidx, rows.to(dev).view(b, h, 1), cols.to(dev).view(b, 1, w)]


def to_network_input(images):
    """``B x 32 x 32 x 3`` uint8 RGB -> ``B x 3 x 32 x 32`` float32 ``(x - 127.5) / 128`` (docs/theory.md#cifar-setup)."""
    return images.permute(0, 3, 1, 2).float().sub_(127.5).div_(128.0).contiguous()


class CifarData:
    """The MHE CIFAR recipe's data, as the trainer reads them (docs/theory.md#cifar-setup).

    ``batch(update)``: the training batch of an update, a function of ``(seed, update)`` alone, so a resumed
    run draws what the uninterrupted one drew: each epoch a fresh permutation, ``floor(N / batch)``
    batches (the last partial batch is dropped, as the reference's 390 batches of 128 per epoch were),
    then :func:`random_pad_crop_flip` and :func:`to_network_input`. ``test_batches(batch_size)``: the test
    set, network-ready. On a GPU the training images (150 MB for CIFAR-100) stay on it and are augmented there.
    """

    def __init__(self, root, dataset: str, batch_size: int, iterations: int, seed: int, device) -> None:
        from sphereface_plus.engine.sampler import ResumableSampler, derive_seed

        arrays = load_cifar(root, dataset)
        self.device, self.seed = torch.device(device), int(seed)
        self.train_x, self.train_y = torch.from_numpy(arrays["train_images"]), torch.from_numpy(arrays["train_labels"])
        self.test_x, self.test_y = torch.from_numpy(arrays["test_images"]), torch.from_numpy(arrays["test_labels"])
        if self.device.type == "cuda":
            self.train_x, self.train_y = self.train_x.to(self.device), self.train_y.to(self.device)
        self.sampler = ResumableSampler(self.train_x.shape[0], batch_size, iterations, seed=self.seed, flip=False,
                                        drop_last=True, epoch_seed=lambda e: derive_seed(self.seed, 1, e))

    def batch(self, update: int):
        from sphereface_plus.engine.sampler import step_generator

        idx = self.sampler.batch_indices(update)
        x = random_pad_crop_flip(self.train_x[idx.to(self.train_x.device)], step_generator(self.seed, 2, update))
        return (to_network_input(x.to(self.device, non_blocking=True)),
                self.train_y[idx.to(self.train_y.device)].to(self.device))

    def test_batches(self, batch_size: int):
        for s in range(0, self.test_x.shape[0], batch_size):
            yield (to_network_input(self.test_x[s: s + batch_size].to(self.device, non_blocking=True)),
                   self.test_y[s: s + batch_size].to(self.device, non_blocking=True))
