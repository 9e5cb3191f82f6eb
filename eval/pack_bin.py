"""An insightface-style ``.bin`` verification pack from a pairs file and crops (``sphereface-plus pack-bin``).

A pack is one file holding, for every pair, the two aligned crops as encoded image bytes and a
same/different flag (:func:`eval.pairs.save_bin_pack`, the layout of insightface's ``lfw.bin``,
``cfp_fp.bin``, ``agedb_30.bin``). It moves a verification set to another machine as one file and
is scored with ``sphereface-plus verify bin --pack FILE`` (or by insightface's own tools).

The crops' bytes are stored as they are (no re-encoding, so nothing changes), after ``align``'s
checks (:func:`data_prep.image_files.read_image`: complete JPEG, decodable) and a size check: every
crop must have the same size, the one of the template the pack is for.

Pairs are written fold by fold. ``verify bin`` cuts a pack into contiguous folds (as insightface's
``KFold(10, shuffle=False)``), so an LFW ``pairs.txt`` packs into the exact LFW folds; a generic pairs
file keeps its folds when they are of equal size.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import List, Sequence, Tuple

from sphereface_plus.errors import InputFileError, MissingFileError

logger = logging.getLogger(__name__)


def pack_pairs(pairs, root) -> Tuple[List[bytes], List[bool]]:
    """The encoded bytes of both crops of every pair (fold by fold, file order within a fold) and the labels.

    Raises :class:`~sphereface_plus.errors.MissingFileError` naming the missing crops, and
    :class:`~sphereface_plus.errors.InputFileError` for a damaged crop or crops of different sizes.
    """
    from data_prep.image_files import read_image
    from eval.pairs import describe_missing, missing_images
    from sphereface_plus.utils import progress

    root = Path(root)
    ordered = sorted(pairs, key=lambda p: p.fold)  # stable: file order within each fold
    paths = list(dict.fromkeys(x for p in ordered for x in (p.path1, p.path2)))
    missing = missing_images(root, paths)
    if missing:
        raise MissingFileError(describe_missing(missing, len(paths), f"under {root}",
                                                "check --root (it must hold the aligned crops) and --ext"))
    data, sizes = {}, Counter()
    first_of = {}
    for rel in progress(paths, desc="pack-bin", unit="img"):
        raw = (root / rel).read_bytes()
        try:
            image, _ = read_image(raw)
        except ValueError as exc:
            raise InputFileError(f"{root / rel}: {exc}; re-align it (sphereface-plus align) or drop its pairs") from None
        size = image.shape[:2]
        sizes[size] += 1
        first_of.setdefault(size, rel)
        data[rel] = raw
    if len(sizes) > 1:
        (main, n), *others = sizes.most_common()
        odd = ", ".join(f"{w}x{h} (WxH, e.g. {root / first_of[(h, w)]})" for (h, w), _ in others)
        raise InputFileError(f"the crops differ in size: {n} are {main[1]}x{main[0]} but some are {odd}; a pack "
                             f"holds crops of one template (align them with sphereface-plus align)")
    images = [data[x] for p in ordered for x in (p.path1, p.path2)]
    return images, [bool(p.same) for p in ordered]


def fold_sizes(pairs: Sequence) -> List[int]:
    """The number of pairs in each fold, in fold order."""
    c = Counter(p.fold for p in pairs)
    return [c[k] for k in sorted(c)]
