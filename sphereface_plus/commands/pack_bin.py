"""``sphereface-plus pack-bin``: write an insightface-style ``.bin`` verification pack.

The work is :func:`eval.pack_bin.pack_pairs` and :func:`eval.pairs.save_bin_pack` (the module docstring
of :mod:`eval.pack_bin` says what a pack holds and how its folds are kept).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from eval import pack_bin as B
from eval import pairs as P
from sphereface_plus.errors import UsageError, require_dir, require_file

logger = logging.getLogger(__name__)

HELP = "write an insightface-style .bin verification pack from a pairs file and aligned crops"
DESCRIPTION = B.__doc__ + """
examples:
  sphereface-plus pack-bin --pairs lfw/pairs.txt --root lfw-112x96 --out lfw.bin
  sphereface-plus pack-bin --pairs my_pairs.txt --format pairs --root my-crops --out mine.bin
  sphereface-plus verify bin --checkpoint last.pt --pack lfw.bin

exit status: 0 written; 2 usage or input error (missing or damaged crop, mixed sizes; nothing written).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", required=True, help="LFW pairs.txt, or a 'path1 path2 same [fold]' file")
    parser.add_argument("--format", default="lfw", choices=("lfw", "pairs"),
                        help="lfw: LFW View 2 pairs.txt (default); pairs: a generic pairs file")
    parser.add_argument("--root", required=True, help="folder holding the aligned crops at the pairs' relative paths")
    parser.add_argument("--ext", default=".jpg", help="lfw: image extension of the crops (default .jpg)")
    parser.add_argument("--folds", type=int, default=10, help="pairs: folds when the file has no fold column (default 10)")
    parser.add_argument("--out", required=True, metavar="FILE.bin", help="the pack to write (atomically)")


def run(args: argparse.Namespace) -> int:
    require_file(args.pairs, "--pairs")
    require_dir(args.root, "--root")
    out = Path(args.out)
    if out.suffix != ".bin":
        raise UsageError(f"--out {out}: a verification pack is a .bin file (e.g. --out lfw.bin)")
    pairs = P.parse_lfw_pairs(args.pairs, ext=args.ext) if args.format == "lfw" else \
        P.parse_pairs_file(args.pairs, num_folds=args.folds)
    images, issame = B.pack_pairs(pairs, args.root)
    sizes = B.fold_sizes(pairs)
    if len(set(sizes)) > 1:
        logger.warning("the folds of %s have different sizes (%s): 'verify bin' cuts a pack into equal contiguous "
                       "folds, so its folds will not be exactly these", args.pairs, ", ".join(map(str, sizes)))
    P.save_bin_pack(out, images, issame)
    print(f"wrote {out}: {len(issame)} pairs ({sum(issame)} same) in {len(sizes)} folds, {len(images)} images; "
          f"score it with: sphereface-plus verify bin --checkpoint CKPT --pack {out} --folds {len(sizes)}")
    return 0
