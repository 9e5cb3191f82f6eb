"""``sphereface-plus pack-bin``: an insightface-style ``.bin`` verification pack from a pairs file and crops.

A pack is one file holding, for every pair, the two aligned crops as encoded image bytes and a
same/different flag (:func:`eval.pairs.save_bin_pack`, the layout of insightface's ``lfw.bin``,
``cfp_fp.bin``, ``agedb_30.bin``). It moves a verification set to another machine as one file and
is scored with ``sphereface-plus verify bin --pack FILE`` (or by insightface's own tools).

The crops' bytes are stored as they are (no re-encoding, so nothing changes), after ``align``'s
checks (:func:`data_prep.prepare.read_image`: complete JPEG, decodable) and a size check: every
crop must have the same size, the one of the template the pack is for.

Pairs are written fold by fold. ``verify bin`` cuts a pack into contiguous folds (as insightface's
``KFold(10, shuffle=False)``), so an LFW ``pairs.txt`` packs into the exact LFW folds; a generic pairs
file keeps its folds when they are of equal size.

examples:
  sphereface-plus pack-bin --pairs lfw/pairs.txt --root lfw-112x96 --out lfw.bin
  sphereface-plus pack-bin --pairs my_pairs.txt --format pairs --root my-crops --out mine.bin
  sphereface-plus verify bin --checkpoint last.pt --pack lfw.bin

exit status: 0 written; 2 usage or input error (missing or damaged crop, mixed sizes; nothing written).
"""
from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path
from typing import List, Sequence, Tuple

from sphereface_plus.errors import InputFileError, MissingFileError, UsageError, require_dir, require_file

logger = logging.getLogger(__name__)

HELP = "write an insightface-style .bin verification pack from a pairs file and aligned crops"
DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", required=True, help="LFW pairs.txt, or a 'path1 path2 same [fold]' file")
    parser.add_argument("--format", default="lfw", choices=("lfw", "pairs"),
                        help="lfw: LFW View 2 pairs.txt (default); pairs: a generic pairs file")
    parser.add_argument("--root", required=True, help="folder holding the aligned crops at the pairs' relative paths")
    parser.add_argument("--ext", default=".jpg", help="lfw: image extension of the crops (default .jpg)")
    parser.add_argument("--folds", type=int, default=10, help="pairs: folds when the file has no fold column (default 10)")
    parser.add_argument("--out", required=True, metavar="FILE.bin", help="the pack to write (atomically)")


def pack_pairs(pairs, root) -> Tuple[List[bytes], List[bool]]:
    """The encoded bytes of both crops of every pair (fold by fold, file order within a fold) and the labels.

    Raises :class:`~sphereface_plus.errors.MissingFileError` naming the missing crops, and
    :class:`~sphereface_plus.errors.InputFileError` for a damaged crop or crops of different sizes.
    """
    from data_prep.prepare import read_image
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


def _fold_sizes(pairs: Sequence) -> List[int]:
    c = Counter(p.fold for p in pairs)
    return [c[k] for k in sorted(c)]


def run(args: argparse.Namespace) -> int:
    from eval import pairs as P

    require_file(args.pairs, "--pairs")
    require_dir(args.root, "--root")
    out = Path(args.out)
    if out.suffix != ".bin":
        raise UsageError(f"--out {out}: a verification pack is a .bin file (e.g. --out lfw.bin)")
    pairs = P.parse_lfw_pairs(args.pairs, ext=args.ext) if args.format == "lfw" else \
        P.parse_pairs_file(args.pairs, num_folds=args.folds)
    images, issame = pack_pairs(pairs, args.root)
    sizes = _fold_sizes(pairs)
    if len(set(sizes)) > 1:
        logger.warning("the folds of %s have different sizes (%s): 'verify bin' cuts a pack into equal contiguous "
                       "folds, so its folds will not be exactly these", args.pairs, ", ".join(map(str, sizes)))
    P.save_bin_pack(out, images, issame)
    print(f"wrote {out}: {len(issame)} pairs ({sum(issame)} same) in {len(sizes)} folds, {len(images)} images; "
          f"score it with: sphereface-plus verify bin --checkpoint CKPT --pack {out} --folds {len(sizes)}")
    return 0
