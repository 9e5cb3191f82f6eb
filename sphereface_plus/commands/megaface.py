"""``sphereface-plus megaface export|score``: MegaFace Challenge 1 without the devkit.

``export`` embeds an image list into the devkit's feature files (resumable: complete files are kept, each
one's header and size checked); ``score`` computes rank-1 identification over distractor set sizes and
TAR at FAR from them (:func:`eval.megaface.evaluate`; the format and metrics are in :mod:`eval.megaface`).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from eval import features as F
from eval import megaface as M
from eval.pairs import describe_missing, missing_images
from eval.runtime import load_inference_model
from sphereface_plus.commands.options import add_inference_arguments
from sphereface_plus.errors import MissingFileError, UsageError, require_dir, require_file
from sphereface_plus.utils import atomic_write_json, progress

logger = logging.getLogger(__name__)

HELP = "MegaFace Challenge 1: export features in the devkit format, score rank-1 and TAR@FAR=1e-6"
DESCRIPTION = M.__doc__ + """
examples:
  sphereface-plus megaface export --checkpoint last.pt --list facescrub_features_list.json \\
      --root facescrub-112x96 --out feats/facescrub
  sphereface-plus megaface export --checkpoint last.pt --list megaface_features_list.json_1000000_1 \\
      --root megaface-112x96 --out feats/megaface
  sphereface-plus megaface score --probe-list facescrub_features_list.json --probe-dir feats/facescrub \\
      --distractor-list megaface_features_list.json_1000000_1 --distractor-dir feats/megaface --json mf.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    ex = sub.add_parser("export", help="write devkit feature files for an image list (resumable)",
                        description="Embed every image of a list (aligned crops, or raw images with "
                                    "--landmarks) and write <out>/<path><suffix> in the devkit format, "
                                    "L2-normalised. Complete files that exist are kept (each one's header "
                                    "and size are checked; damaged ones are redone), so an interrupted "
                                    "export resumes where it stopped; --overwrite recomputes everything.")
    ex.add_argument("--checkpoint", required=True, help="training checkpoint (.pt)")
    ex.add_argument("--list", required=True, help="image list: devkit JSON, JSON list, or 'path [label]' lines")
    ex.add_argument("--root", required=True, help="folder holding the images at the list's relative paths")
    ex.add_argument("--out", required=True, help="output folder for the feature files")
    ex.add_argument("--suffix", default=M.DEFAULT_SUFFIX, help=f"file name suffix (default {M.DEFAULT_SUFFIX})")
    ex.add_argument("--landmarks", help="landmark file to align raw images on the fly")
    ex.add_argument("--no-flip", action="store_true", help="embed the crop only (default: crop + mirror)")
    ex.add_argument("--overwrite", action="store_true", help="recompute files that already exist")
    ex.add_argument("--batch-size", type=int, default=64)
    ex.add_argument("--workers", type=int, default=2)
    ex.add_argument("--device", default="cpu")
    add_inference_arguments(ex)
    sc = sub.add_parser("score", help="rank-1 identification and TAR@FAR from feature files",
                        description="Score MegaFace Challenge 1 from devkit feature files: rank-1 with "
                                    "distractor set sizes 10 .. 1M, and TAR at FAR (default 1e-6).")
    sc.add_argument("--probe-list", required=True, help="FaceScrub list (devkit JSON with 'id', or 'path label' "
                                                        "lines; without labels the parent folder is the identity)")
    sc.add_argument("--probe-dir", required=True, help="folder with the probe feature files")
    sc.add_argument("--distractor-list", required=True, help="MegaFace distractor list")
    sc.add_argument("--distractor-dir", required=True, help="folder with the distractor feature files")
    sc.add_argument("--suffix", default=M.DEFAULT_SUFFIX, help=f"file name suffix (default {M.DEFAULT_SUFFIX})")
    sc.add_argument("--sizes", default=",".join(str(s) for s in M.DEFAULT_SIZES),
                    help="distractor set sizes for rank-1, comma separated (default 10,...,1000000)")
    sc.add_argument("--far", type=float, default=1e-6, help="false accept rate for TAR (default 1e-6)")
    sc.add_argument("--chunk", type=int, default=20000, help="distractor files read at a time (default 20000)")
    sc.add_argument("--json", help="write the results here")


def _resume_todo(paths: Sequence[str], out: Path, suffix: str, dim: Optional[int]) -> Tuple[List[str], List[str]]:
    """``(to do, damaged)``: images without a complete feature file; damaged files are named in the log."""
    todo, damaged = [], []
    for p in progress(paths, desc="check existing", unit="file"):
        f = M.feature_path(out, p, suffix)
        if not f.is_file():
            todo.append(p)
            continue
        problem = M.feature_file_problem(f, dim)
        if problem:
            todo.append(p)
            damaged.append(p)
            logger.warning("redoing %s: %s", f, problem)
    return todo, damaged


def export(args) -> int:
    require_file(args.checkpoint, "--checkpoint")
    require_dir(args.root, "--root")
    paths, _ = M.read_image_list(args.list)
    out = Path(args.out)
    model, info = load_inference_model(args.checkpoint, args.device, args.precision, args.runtime)  # before any write
    landmarks = F.read_landmarks(args.landmarks) if args.landmarks else None
    dim = _feature_dim(model, info, not args.no_flip)
    damaged: List[str] = []
    if args.overwrite:
        todo = list(paths)
    else:
        todo, damaged = _resume_todo(paths, out, args.suffix, dim)
    logger.info("%d images in %s, %d already exported, %d to do (%d damaged files redone)", len(paths), args.list,
                len(paths) - len(todo), len(todo), len(damaged))
    if not todo:
        print(f"all {len(paths)} features already in {out} (each file's header and size checked); "
              f"--overwrite recomputes them")
        return 0
    missing = missing_images(args.root, todo)
    if missing:
        raise MissingFileError(describe_missing(missing, len(todo), f"under {args.root}", "check --root"))
    dataset = F.ImageFiles(args.root, todo, input_size=info["input_size"], landmarks=landmarks,
                           template=info["template"])
    F.check_first_image(dataset)  # raw photos: one clear error here, not a worker traceback
    for start, feats in F.iter_embeddings(model, dataset, args.batch_size, not args.no_flip, args.device,
                                          args.workers, desc="export", precision=args.precision):
        for rel, v in zip(todo[start:start + feats.shape[0]], feats):
            M.write_feature(M.feature_path(out, rel, args.suffix), v, normalize=True)
    redone = f", {len(damaged)} of them replacing damaged files" if damaged else ""
    print(f"wrote {len(todo)} feature files to {out} ({len(paths)} in the list{redone}); "
          f"--overwrite recomputes all")
    return 0


def _feature_dim(model, info, flip: bool) -> int:
    """The length of this model's feature vectors (doubled by the mirror), from one dummy forward."""
    h, w = info["input_size"]
    device = next(model.parameters(), torch.zeros(0)).device  # an onnxruntime model has none: its input is on CPU
    with torch.inference_mode():
        d = int(model(torch.zeros(1, 3, h, w, device=device)).shape[1])
    return 2 * d if flip else d


def score(args) -> int:
    probe_paths, labels = M.read_image_list(args.probe_list)
    if labels is None:
        labels = M.labels_from_folders(probe_paths)
    dist_paths, _ = M.read_image_list(args.distractor_list)
    try:
        sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    probes = M.read_features(args.probe_dir, probe_paths, args.suffix, desc="probes")
    missing = [p for p in dist_paths if not M.feature_path(args.distractor_dir, p, args.suffix).is_file()]
    if missing:
        raise MissingFileError(describe_missing(missing, len(dist_paths), f"in {args.distractor_dir}",
                                                 "run 'sphereface-plus megaface export' for this list first"))
    res = M.evaluate(probes, labels, M.iter_feature_chunks(args.distractor_dir, dist_paths, args.suffix, args.chunk),
                     far=args.far, sizes=sizes, num_distractors=len(dist_paths))
    print(f"probes {res['num_probes']} ({res['num_identities']} identities, {res['num_trials']} trials), "
          f"distractors {res['num_distractors']}")
    print("distractors  rank-1")
    for n, r in res["rank1_by_size"].items():
        print(f"{int(n):>11}  {100 * r:6.2f}%")
    print(f"TAR@FAR={args.far:g}: {100 * res['tar']:.2f}% (threshold {res['threshold']:.4f}, FAR reached "
          f"{res['far']:.2e})")
    if args.json:
        atomic_write_json(args.json, res)
        print(f"results: {args.json}")
    return 0


def run(args) -> int:
    # input mistakes raise ToolkitErrors: the command line prints them as one 'error:' line, exit 2
    return export(args) if args.action == "export" else score(args)
