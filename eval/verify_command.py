"""``sphereface-plus verify``: face verification accuracy on LFW, any pairs file, a .bin pack or a folder.

Protocols (SPEC section 8; the defaults are the original SphereFace evaluation):

  lfw     LFW View 2: --pairs pairs.txt, 10 person-disjoint folds of 300 + 300 pairs
  pairs   a generic pairs file: 'path1 path2 same [fold]' per line (tab/space or comma separated)
  bin     an insightface verification pack (lfw.bin, cfp_fp.bin, agedb_30.bin...): --pack FILE
  folder  identity folders under --root: seeded, balanced, person-disjoint pairs
  ijb     IJB-B / IJB-C 1:1 templates (insightface's protocol, TAR@FAR 1e-6..1e-1): --root IJBC --dataset IJBC
          (see eval/ijb.py and the README for the pipeline and its options)

Features come from a training checkpoint (--checkpoint, images under --root: aligned crops, or raw
images aligned on the fly with --landmarks), or from an .npz with 'paths' and 'features'
(--features). Each image's feature is the embedding of the crop and of its mirror concatenated; for
each fold the features are centred on the mean of the other 9 folds, L2-normalised and compared by
cosine; the threshold (1e-4 grid on [-1, 1], strict inequalities, mean of tied best) is chosen on
the other folds. --no-flip and --no-mean-sub switch those steps off to compare with other toolkits.

examples:
  sphereface-plus verify lfw --checkpoint runs/x/checkpoints/last.pt --root lfw-112x96 --pairs pairs.txt \\
      --json lfw.json --plot lfw_roc.png
  sphereface-plus verify lfw --checkpoint last.pt --root lfw/images --landmarks lfw_landmark.txt --pairs pairs.txt
  sphereface-plus verify lfw --features feats.npz --pairs pairs.txt --json lfw.json
  sphereface-plus verify bin --checkpoint last.pt --pack agedb_30.bin
  sphereface-plus verify folder --checkpoint last.pt --root my-faces-112x96 --num-pairs 2000
  sphereface-plus verify ijb --root IJBC --dataset IJBC --checkpoint sphere20.onnx --json ijbc.json --plot ijbc.png
  sphereface-plus verify lfw --checkpoint last.pt --root lfw-112x96 --pairs pairs.txt --save-model model.pt

--save-model OUT.pt stores the model with the threshold this run found (chosen on plain cosine
scores, as 'compare' scores a single pair), so 'sphereface-plus compare --checkpoint OUT.pt' can
decide same/different.

exit status: 0 done; 2 usage or input error (one 'error:' line; --debug for the traceback).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Tuple

import numpy as np

from sphereface_plus.errors import UsageError, require_dir, require_file

logger = logging.getLogger(__name__)

HELP = "verification accuracy (LFW 10-fold, pairs file, insightface .bin pack, identity folders)"
DESCRIPTION = __doc__

PROTOCOLS = ("lfw", "pairs", "bin", "folder", "ijb")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("protocol", choices=PROTOCOLS, help="where the pairs come from")
    src = parser.add_argument_group("features (one of)")
    src.add_argument("--checkpoint", help="training checkpoint (.pt) or exported model (.onnx) that embeds the images")
    src.add_argument("--features", help=".npz with 'paths' (relative image paths) and 'features' (N x D)")
    data = parser.add_argument_group("data")
    data.add_argument("--pairs", help="lfw: pairs.txt; pairs: a 'path1 path2 same [fold]' file")
    data.add_argument("--pack", help="bin: an insightface verification pack")
    data.add_argument("--root", help="folder holding the images at the pairs' relative paths (folder: the "
                                     "identity folders)")
    data.add_argument("--landmarks", help="landmark file ('relative/path x1 y1 ... x5 y5'): align raw images "
                                          "under --root on the fly")
    data.add_argument("--ext", default=".jpg", help="lfw: image extension of the crops (default .jpg)")
    data.add_argument("--folds", type=int, default=10, help="pairs/bin/folder: number of folds (default 10)")
    data.add_argument("--num-pairs", type=int, default=6000, help="folder: pairs to draw (default 6000)")
    data.add_argument("--seed", type=int, default=0, help="folder: seed of the pair draw (default 0)")
    proto = parser.add_argument_group("protocol")
    proto.add_argument("--no-mean-sub", action="store_true", help="do not centre features on the other folds' mean")
    proto.add_argument("--no-flip", action="store_true", help="embed the crop only, not crop + mirror")
    out = parser.add_argument_group("output")
    out.add_argument("--json", help="write the report (fold accuracies, mean, std, EER, AUC, TAR@FAR, ROC) here")
    out.add_argument("--plot", help="write the ROC curve (PNG) here")
    out.add_argument("--save-features", help="also save the computed features to this .npz")
    out.add_argument("--save-model", metavar="OUT.pt",
                     help="with --checkpoint: write a copy of the model that stores the threshold found here "
                          "(what 'compare' uses); the input checkpoint is not changed")
    run_ = parser.add_argument_group("runtime")
    run_.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    run_.add_argument("--workers", type=int, default=2, help="DataLoader workers reading images (default 2)")
    run_.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    from eval.features import add_precision_argument

    add_precision_argument(run_)
    from eval.ijb import add_ijb_arguments

    add_ijb_arguments(parser)


def _check_args(args) -> None:
    """Options and input files, checked before anything is computed or written."""
    if bool(args.checkpoint) == bool(args.features):
        raise UsageError("give exactly one of --checkpoint and --features")
    if args.protocol in ("lfw", "pairs") and not args.pairs:
        raise UsageError(f"verify {args.protocol} needs --pairs")
    if args.protocol == "bin":
        if not args.pack:
            raise UsageError("verify bin needs --pack FILE")
        if args.features:
            raise UsageError("verify bin embeds the pack's images: use --checkpoint, not --features")
    if args.protocol == "folder" and not args.root:
        raise UsageError("verify folder needs --root (the identity folders)")
    if args.checkpoint and args.protocol != "bin" and not args.root:
        raise UsageError("--checkpoint needs --root, the folder holding the images")
    if args.save_model:
        if not args.checkpoint:
            raise UsageError("--save-model copies the model of --checkpoint: give --checkpoint, not --features")
        if Path(args.save_model).resolve() == Path(args.checkpoint).resolve():
            raise UsageError(f"--save-model {args.save_model} is the --checkpoint itself; write the copy to "
                             "another file (the training checkpoint keeps the optimiser state for --resume)")
    for flag in ("checkpoint", "features", "pairs", "pack", "landmarks"):
        if getattr(args, flag):
            require_file(getattr(args, flag), f"--{flag}")
    if args.root:
        require_dir(args.root, "--root")
    if args.features and args.no_flip:
        logger.warning("--no-flip has no effect with --features (the features are used as they are)")


def build_pairs(args):
    """The pairs of the chosen protocol (and the pack images for ``bin``)."""
    from eval import pairs as P

    if args.protocol == "lfw":
        return P.parse_lfw_pairs(args.pairs, ext=args.ext), None
    if args.protocol == "pairs":
        return P.parse_pairs_file(args.pairs, num_folds=args.folds), None
    if args.protocol == "folder":
        return P.folder_pairs(args.root, num_pairs=args.num_pairs, num_folds=args.folds, seed=args.seed), None
    images, issame = P.load_bin_pack(args.pack)
    return P.bin_pack_pairs(issame, num_folds=args.folds), images


def compute_features(args, pairs, pack_images) -> Tuple[List[str], np.ndarray]:
    """``(paths, features)`` of every image in ``pairs``, from the checkpoint or the .npz."""
    from eval import features as F
    from eval.pairs import pairs_to_arrays

    if args.features:
        return F.load_features_npz(args.features)
    model, info = F.load_embedding_model(args.checkpoint, device=args.device)
    flip = not args.no_flip
    if pack_images is not None:
        feats = F.extract_from_dataset(model, F.EncodedImages(pack_images, info["input_size"]), args.batch_size,
                                       flip, args.device, args.workers, precision=args.precision)
        return [str(i) for i in range(len(pack_images))], feats
    paths = pairs_to_arrays(pairs)[0]
    landmarks = F.read_landmarks(args.landmarks) if args.landmarks else None
    feats = F.extract_features(model, args.root, paths, batch_size=args.batch_size, flip=flip, device=args.device,
                               num_workers=args.workers, input_size=info["input_size"], landmarks=landmarks,
                               template=info["template"], precision=args.precision)
    return paths, feats


def run(args) -> int:
    if args.protocol == "ijb":
        from eval.ijb import run_ijb

        return run_ijb(args)
    from eval.lfw import evaluate_features
    from eval.report import format_report, plot_roc, write_json_report

    # input mistakes raise ToolkitErrors: the command line prints them as one 'error:' line, exit 2
    _check_args(args)
    pairs, pack_images = build_pairs(args)
    logger.info("%d pairs (%d same) in %d folds", len(pairs), sum(p.same for p in pairs),
                len({p.fold for p in pairs}))
    paths, feats = compute_features(args, pairs, pack_images)
    if args.save_features:
        from eval.features import save_features_npz

        save_features_npz(args.save_features, paths, feats)
        logger.info("features saved to %s", args.save_features)
    source = args.features or "the extracted features"
    report = evaluate_features(paths, feats, pairs, mean_sub=not args.no_mean_sub, source=source)
    if args.save_model:
        # compare scores one pair by plain cosine (no dataset mean to subtract): store that threshold
        plain = report if args.no_mean_sub else evaluate_features(paths, feats, pairs, mean_sub=False, source=source)
        threshold = float(plain["threshold"])
        how = (f"verify {args.protocol}, {len(pairs)} pairs, plain cosine, "
               f"{'crop only' if args.no_flip else 'crop + mirror'}")
        save_model_with_threshold(args.checkpoint, args.save_model, threshold, how)
        report["compare_threshold"] = threshold
        print(f"model with threshold {threshold:.4f}: {args.save_model} "
              f"(sphereface-plus compare A B --checkpoint {args.save_model})")
    report = {"protocol": args.protocol, **report, "flip": not args.no_flip if args.checkpoint else None,
              "source": args.checkpoint or args.features}
    print(format_report(report))
    if args.json:
        write_json_report(report, args.json)
        print(f"report: {args.json}")
    if args.plot:
        plot_roc({args.protocol: report}, args.plot, title=f"verify {args.protocol}")
        print(f"ROC plot: {args.plot}")
    return 0


def save_model_with_threshold(checkpoint, out, threshold: float, source: str = "") -> Path:
    """Write a copy of ``checkpoint``'s model with ``threshold`` stored, atomically.

    The copy has the model part of a training checkpoint (docs/interfaces.md): ``model`` (backbone
    state dict), ``head``, ``config`` and ``iteration`` as stored, plus ``threshold`` (the cosine
    threshold ``compare`` uses) and ``threshold_source`` (how it was found). No optimiser state, so it
    cannot ``--resume`` a run, but ``train.init_from`` and every evaluation command accept it, and it
    loads with ``torch.load(weights_only=True)``.
    """
    from sphereface_plus.engine.checkpoint import load_checkpoint, serialize
    from sphereface_plus.utils import atomic_write_bytes

    state = load_checkpoint(checkpoint)
    copy = {k: state[k] for k in ("model", "head", "config", "iteration") if k in state}
    copy["threshold"] = float(threshold)
    copy["threshold_source"] = str(source)
    out = Path(out)
    atomic_write_bytes(out, serialize(copy))
    logger.info("wrote %s (threshold %.4f from %s)", out, threshold, source or "verification")
    return out
