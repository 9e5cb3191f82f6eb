"""The face trainer's training set, built from a recipe's ``data`` section: the one place a source name
(``data.source``, :data:`DATA_SOURCES`) becomes a reader of :mod:`data_prep.datasets`.

- :func:`check_data_config`: the source, the template and the root, checked before anything is written;
  returns the crops' size (the template's, :data:`sphereface_plus.templates.TEMPLATE_SIZES`);
- :func:`build_train_dataset`: the reader of the source (folder, list, RecordIO, packed) or the synthetic
  identities, generated and aligned once into a cache (:func:`prepare_synthetic`);
- :func:`build_training_set`: the same for a run (``cfg`` a face recipe): rank 0 prepares the data first
  (the synthetic set is written once), the bad images are named at start-up.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence, Tuple

import torch

from data_prep.datasets import FaceDataset, ImageFolderDataset, ListDataset, PackedDataset
from data_prep.recordio import RecordIODataset
from sphereface_plus.config import ConfigError
from sphereface_plus.errors import UsageError, require_dir
from sphereface_plus.templates import TEMPLATE_SIZES
from sphereface_plus.utils import atomic_write_bytes, atomic_write_json, progress

logger = logging.getLogger(__name__)

__all__ = ["DATA_SOURCES", "check_data_config", "prepare_synthetic", "synthetic_cache", "build_train_dataset",
           "build_training_set"]


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
    from data_prep.image_files import read_image_file
    from data_prep.synthetic import ensure_synthetic_dataset

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
        image = read_image_file(syn.images / rel)
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
    if data_cfg.source not in DATA_SOURCES:
        raise ConfigError(f"data.source={data_cfg.source!r} is not valid; choose one of {', '.join(DATA_SOURCES)}")
    if data_cfg.template not in TEMPLATE_SIZES:
        raise ConfigError(f"data.template={data_cfg.template!r} is not valid; choose one of {', '.join(TEMPLATE_SIZES)}")
    if data_cfg.source != "synthetic" and not data_cfg.root:
        raise ConfigError(f"data.source={data_cfg.source!r} needs data.root=<folder>; "
                          "or use data.source=synthetic for the generated demo identities")
    return TEMPLATE_SIZES[data_cfg.template]


def build_train_dataset(data_cfg, input_size: Sequence[int], synthetic_cache=None) -> FaceDataset:
    """The dataset named by ``data.source`` (see the module docstring), its inputs checked.

    ``synthetic_cache``: the folder for ``source=synthetic`` (default ``data.synthetic.cache_dir``); the synthetic
    set's dataset carries ``verification_pairs`` (its ``pairs.txt`` and the aligned crops it refers to).
    Raises a :class:`~sphereface_plus.errors.ToolkitError` (one line: what, where, how to fix) for an
    unset or missing ``data.root``, an empty tree, a list naming only missing images, raw (unaligned)
    photos; nothing is written for the real-data sources, so a caller that builds the dataset first
    leaves no ``out_dir`` behind on such a mistake.
    """
    source = data_cfg.source
    if source == "synthetic":
        s = data_cfg.synthetic
        cache = Path(synthetic_cache or s.cache_dir or "synthetic")
        prepare_synthetic(cache, s.num_identities, s.images_per_identity, s.seed, data_cfg.template, s.pairs_per_fold)
        ds = ImageFolderDataset(cache / "aligned", input_size)
        ds.verification_pairs = (cache / "raw" / "pairs.txt", cache / "aligned")  # its own person-disjoint pairs
        return ds
    if source not in ("folder", "list", "rec", "packed"):
        raise UsageError(f"data.source={source!r}: choose synthetic, folder, list, rec or packed")
    if not data_cfg.root:
        raise UsageError(f"data.source={source} needs data.root=<folder> (the aligned crops made by "
                         "'sphereface-plus align'), or use data.source=synthetic")
    if source == "folder":
        return ImageFolderDataset(data_cfg.root, input_size)
    if source == "list":
        require_dir(data_cfg.root, "data.root", "give the folder the list file's paths are relative to")
        list_file = data_cfg.list_file or str(Path(data_cfg.root) / "list.txt")
        return ListDataset(data_cfg.root, list_file, input_size)
    if source == "rec":
        if not str(data_cfg.root).endswith(".rec"):
            require_dir(data_cfg.root, "data.root", "give the folder holding train.rec + train.idx")
        return RecordIODataset(data_cfg.root, input_size)
    if source == "packed":
        require_dir(data_cfg.root, "data.root", "give the folder of 'sphereface-plus align --pack' (packed.json)")
        return PackedDataset(data_cfg.root, input_size)
    raise ValueError(f"data.source={source!r}: choose one of {', '.join(DATA_SOURCES)}")


def synthetic_cache(cfg) -> Path:
    """Where a run's synthetic identities are generated and aligned (``data.synthetic.cache_dir``, default
    ``<out_dir>/synthetic``)."""
    return Path(cfg.data.synthetic.cache_dir) if cfg.data.synthetic.cache_dir else Path(cfg.out_dir) / "synthetic"


def build_training_set(cfg, dist) -> FaceDataset:
    """The training set of a face recipe ``cfg`` at its template's crop size; under torch.distributed rank 0
    prepares it first (the synthetic set is written once) and the others then read it."""
    size, cache = check_data_config(cfg.data), synthetic_cache(cfg)
    if dist.distributed and not dist.is_main:
        torch.distributed.barrier()
    ds = build_train_dataset(cfg.data, size, cache)
    if dist.distributed and dist.is_main:
        torch.distributed.barrier()
    logger.info("training set: %d images of %d identities (%s)", len(ds), ds.num_classes, cfg.data.source)
    bad = list(getattr(ds, "bad_images", []))
    if bad:  # named at start-up (and in summary.json), never trained on
        logger.warning("%d bad training image(s) skipped: %s", len(bad),
                       "; ".join(f"{b['path']} ({b['reason']})" for b in bad))
    return ds
