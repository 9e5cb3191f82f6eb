"""``sphereface-plus verify``: face verification accuracy on LFW, any pairs file, .bin packs, a folder, IJB.

Pairs sources:

  lfw     LFW View 2: --pairs pairs.txt, 10 person-disjoint folds of 300 + 300 pairs
  pairs   a generic pairs file: 'path1 path2 same [fold]' per line (tab/space or comma separated)
  bin     an insightface verification pack (lfw.bin, cfp_fp.bin, agedb_30.bin...): --pack FILE
  packs   every standard pack in --dir (lfw, cfp_fp, cfp_ff, agedb_30, calfw, cplfw, vgg2_fp .bin): one table
  folder  identity folders under --root: seeded, balanced, person-disjoint pairs
  ijb     IJB-B / IJB-C templates (insightface's protocol): 1:1 TAR@FAR and, with --task 1:N|both, 1:N
          identification (TPIR@FPIR, rank-1/5/10) on galleries G1 and G2 separately: --root IJBC --dataset IJBC

Protocols (--protocol; every report, JSON and table names the one used; docs/verification.md):

  sphereface   SphereFace's evaluation.m (default for lfw, pairs, folder): crop + mirror features
               concatenated, centred on the other 9 folds' mean, L2-normalised, cosine; the threshold
               (1e-4 grid on [-1, 1], strict inequalities, mean of tied best) chosen on the other folds.
               Comparable to the SphereFace / SphereFace+ papers. --no-flip / --no-mean-sub switch steps off.
  insightface  insightface's verification.py (default for bin, packs): crop + mirror features summed, then
               L2-normalised; squared L2 distance; thresholds 0, 0.01, ..., 3.99; the first best threshold on
               the other folds; 10 contiguous folds; plus VAL@FAR=1e-3. Comparable to the published
               LFW / CFP-FP / AgeDB-30 / CALFW / CPLFW tables (ArcFace, CosFace, insightface's model zoo).
  dlib         dlib's decision rule: raw descriptors (crop + mirror halves averaged), same person when their
               Euclidean distance is below the fixed 0.6; nothing learned from the other folds. Comparable
               to dlib's published LFW figures (99.13%; 99.38% with --jitter 100).

A model imported with flip policy 'none' (dlib's) embeds the crop alone; --jitter N embeds the mean over
N random jitters of each crop (dlib's num_jitters: shifts, zooms, rotations and mirror images).

Reports also carry the oracle-threshold accuracy (threshold picked on the test pairs themselves, what
OpenSphere reports), always labelled as such: it is not the k-fold accuracy.

Features come from a training checkpoint (--checkpoint, images under --root: aligned crops, or raw
images aligned on the fly with --landmarks), or from an .npz with 'paths' and 'features'
(--features; one written by --save-features records that its rows are crop + mirror halves).

examples:
  sphereface-plus verify lfw --checkpoint runs/x/checkpoints/last.pt --root lfw-112x96 --pairs pairs.txt \\
      --json lfw.json --plot lfw_roc.png
  sphereface-plus verify lfw --checkpoint last.pt --root lfw/images --landmarks lfw_landmark.txt --pairs pairs.txt
  sphereface-plus verify lfw --checkpoint dlib_resnet.pt --root lfw-150x150 --pairs pairs.txt --protocol dlib
  sphereface-plus verify lfw --features feats.npz --pairs pairs.txt --json lfw.json --protocol insightface
  sphereface-plus verify lfw --checkpoint last.pt --root lfw-112x96 --pairs pairs.txt --report-dir reports/lfw
  sphereface-plus verify bin --checkpoint last.pt --pack agedb_30.bin
  sphereface-plus verify packs --dir faces_emore --checkpoint sphere20.onnx --json packs.json
  sphereface-plus verify folder --checkpoint last.pt --root my-faces-112x96 --num-pairs 2000
  sphereface-plus verify ijb --root IJBC --dataset IJBC --checkpoint sphere20.onnx --json ijbc.json --plot ijbc.png
  sphereface-plus verify ijb --root IJBC --features ijbc.npz --task both --detector-score
  sphereface-plus verify lfw --checkpoint last.pt --root lfw-112x96 --pairs pairs.txt --save-model model.pt

--report-dir DIR writes DIR/report.md (what ran, the fold table, the summary), report.json, roc.png and
hardest_errors.png: the --hardest K false accepts and false rejects of the test folds scored furthest
on the wrong side of their fold's threshold, each pair side by side with its score (docs/verify.md).
The images come from --root (aligned on the fly with --landmarks) or the pack; with --features and no
--root, the report lists the pairs without the grid.

--save-model OUT.pt stores the model with the threshold this run found (chosen on plain cosine
scores, as 'compare' scores a single pair), so 'sphereface-plus compare --checkpoint OUT.pt' can
decide same/different.

exit status: 0 done; 2 usage or input error (one 'error:' line; --debug for the traceback).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from eval import features as F
from eval import ijb as J
from eval import ijb_1n as I
from eval import packs as K
from eval import pairs as P
from eval.lfw import evaluate_features
from eval.protocols import PROTOCOLS, resolve_protocol
from eval.report import format_report, plot_roc, verification_markdown, write_json_report
from eval.runtime import load_inference_model
from sphereface_plus.commands.options import add_inference_arguments
from sphereface_plus.engine.checkpoint import load_checkpoint, write_checkpoint
from sphereface_plus.errors import InputFileError, UsageError, require_dir, require_file
from sphereface_plus.utils import atomic_write_bytes

logger = logging.getLogger(__name__)

HELP = "verification accuracy (LFW 10-fold, pairs file, insightface .bin packs, identity folders, IJB)"
DESCRIPTION = __doc__

#: where the pairs come from (the positional argument of ``verify``); the protocols are eval.protocols.PROTOCOLS
SOURCES = ("lfw", "pairs", "bin", "packs", "folder", "ijb")
#: the files --report-dir writes
REPORT_NAME, GRID_NAME = "report.md", "hardest_errors.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", choices=SOURCES, metavar="{" + ",".join(SOURCES) + "}",
                        help="where the pairs come from")
    src = parser.add_argument_group("features (one of)")
    src.add_argument("--checkpoint", help="training checkpoint (.pt) or exported model (.onnx) that embeds the images")
    src.add_argument("--features", help=".npz with 'paths' (relative image paths) and 'features' (N x D)")
    data = parser.add_argument_group("data")
    data.add_argument("--pairs", help="lfw: pairs.txt; pairs: a 'path1 path2 same [fold]' file")
    data.add_argument("--pack", help="bin: an insightface verification pack")
    data.add_argument("--dir", help="packs: the folder holding the standard packs (lfw.bin, cfp_fp.bin, ...)")
    data.add_argument("--packs", help="packs: only these, comma separated (default: every standard pack in --dir)")
    data.add_argument("--root", help="folder holding the images at the pairs' relative paths (folder: the "
                                     "identity folders)")
    data.add_argument("--landmarks", help="landmark file ('relative/path x1 y1 ... x5 y5'): align raw images "
                                          "under --root on the fly")
    data.add_argument("--ext", default=".jpg", help="lfw: image extension of the crops, png or .png (default .jpg)")
    data.add_argument("--folds", type=int, default=10, help="pairs/bin/packs/folder: number of folds (default 10)")
    data.add_argument("--num-pairs", type=int, default=6000, help="folder: pairs to draw (default 6000)")
    data.add_argument("--seed", type=int, default=0, help="folder: seed of the pair draw (default 0)")
    proto = parser.add_argument_group("protocol")
    proto.add_argument("--protocol", choices=PROTOCOLS, default=None,
                       help="sphereface (evaluation.m; default for lfw, pairs, folder), insightface "
                            "(verification.py; default for bin, packs) or dlib (Euclidean distance < 0.6)")
    proto.add_argument("--no-mean-sub", action="store_true",
                       help="sphereface protocol: do not centre features on the other folds' mean")
    proto.add_argument("--no-flip", action="store_true", help="embed the crop only, not crop + mirror")
    proto.add_argument("--jitter", type=int, default=0, metavar="N",
                       help="the feature of a crop is the mean over N random jitters of it (dlib's num_jitters; "
                            "N times the embedding time; 0 or 1: none, the default); replaces the mirror")
    proto.add_argument("--jitter-seed", type=int, default=0, help="seed of the jitter draws (default 0)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", help="write the report (fold accuracies, mean, std, EER, AUC, TAR@FAR, ROC) here")
    out.add_argument("--plot", help="write the ROC curve (PNG) here")
    out.add_argument("--report-dir", metavar="DIR",
                     help="lfw/pairs/folder/bin: write report.md, report.json, roc.png and hardest_errors.png (the "
                          "hardest false accepts and false rejects as image pairs) into DIR (made if needed; one "
                          "that already holds a report.md is refused)")
    out.add_argument("--hardest", type=int, default=8, metavar="K",
                     help="with --report-dir: how many false accepts and false rejects to show (default 8)")
    out.add_argument("--save-features", help="also save the computed features to this .npz")
    out.add_argument("--save-model", metavar="OUT.pt",
                     help="with --checkpoint: write a copy of the model that stores the threshold found here "
                          "(what 'compare' uses); the input checkpoint is not changed")
    run_ = parser.add_argument_group("runtime")
    run_.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    run_.add_argument("--workers", type=int, default=2, help="DataLoader workers reading images (default 2)")
    run_.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    add_inference_arguments(run_)
    add_ijb_arguments(parser)


def _check_args(args) -> None:
    """Options and input files, checked before anything is computed or written."""
    if bool(args.checkpoint) == bool(args.features):
        raise UsageError("give exactly one of --checkpoint and --features")
    if args.source in ("lfw", "pairs") and not args.pairs:
        raise UsageError(f"verify {args.source} needs --pairs")
    if args.protocol == "insightface" and args.no_mean_sub:
        raise UsageError("--no-mean-sub switches off a step of the sphereface protocol; the insightface protocol "
                         "subtracts no mean (drop one of --no-mean-sub and --protocol insightface)")
    if args.source == "bin":
        if not args.pack:
            raise UsageError("verify bin needs --pack FILE")
        if args.features:
            raise UsageError("verify bin embeds the pack's images: use --checkpoint, not --features")
    if args.source == "folder" and not args.root:
        raise UsageError("verify folder needs --root (the identity folders)")
    if args.checkpoint and args.source != "bin" and not args.root:
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
    if args.jitter < 0:
        raise UsageError(f"--jitter {args.jitter}: give the number of jitters (0 or 1 for none, e.g. 100)")
    if args.features and args.jitter > 1:
        raise UsageError("--jitter embeds the images: use --checkpoint, not --features")
    check_report_dir(args)


def check_report_dir(args) -> None:
    """``--report-dir`` / ``--hardest``: usable, and never another run's report."""
    if args.hardest < 0:
        raise UsageError(f"--hardest {args.hardest}: give a count >= 0")
    if not args.report_dir:
        return
    if args.source in ("packs", "ijb"):
        raise UsageError(f"--report-dir is for verify lfw, pairs, folder and bin (verify {args.source}: use --json and "
                         f"--plot)")
    out = Path(args.report_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--report-dir {out} is a file; give a folder")
    if (out / REPORT_NAME).exists():
        raise UsageError(f"--report-dir {out} already holds a {REPORT_NAME} (another run's); choose another folder")


def build_pairs(args):
    """The pairs of the chosen protocol (and the pack images for ``bin``)."""
    if args.source == "lfw":
        return P.parse_lfw_pairs(args.pairs, ext=args.ext), None
    if args.source == "pairs":
        return P.parse_pairs_file(args.pairs, num_folds=args.folds), None
    if args.source == "folder":
        return P.folder_pairs(args.root, num_pairs=args.num_pairs, num_folds=args.folds, seed=args.seed), None
    images, issame = P.load_bin_pack(args.pack)
    return P.bin_pack_pairs(issame, num_folds=args.folds), images


def _evaluate(paths, feats, pairs, source, **kwargs) -> Dict:
    """:func:`eval.lfw.evaluate_features`; features it cannot score (NaN, all equal) are refused naming the file
    they came from (a checkpoint whose weights give them, or a features file)."""
    try:
        return evaluate_features(paths, feats, pairs, source=source, **kwargs)
    except InputFileError as e:
        if str(source) in str(e):
            raise
        raise InputFileError(f"{source}: {e}") from None


def compute_features(args, pairs, pack_images) -> Tuple[List[str], np.ndarray, bool, Optional[dict]]:
    """``(paths, features, flip_halves, info)`` of every image in ``pairs``, from the checkpoint or the .npz;
    ``flip_halves``: the rows are ``[f(crop), f(mirror)]`` (extracted with flip, or an .npz that says so);
    ``info``: the model's (input size, template...; None for an .npz)."""
    if args.features:
        paths, feats = F.load_features_npz(args.features)
        return paths, feats, F.features_layout(args.features) == F.CROP_MIRROR_LAYOUT, None
    model, info = load_inference_model(args.checkpoint, args.device, args.precision, args.runtime)
    jitter = args.jitter if args.jitter > 1 else 0
    flip = not args.no_flip and not jitter and info.get("flip_policy") != "none"
    if not args.no_flip and not flip:
        logger.info("embedding the crop alone: %s", "the jitters include mirror images" if jitter else
                    "the model's flip policy is 'none'")
    if pack_images is not None:
        K.check_pack_size(K.LoadedPack("pack", Path(args.pack), pack_images, np.zeros(0, bool)), info["input_size"])
        images = F.EncodedImages(pack_images, info["input_size"], args.pack)
        feats = F.extract_from_dataset(model, images, args.batch_size, flip, args.device, args.workers,
                                       precision=args.precision, jitter=jitter, jitter_seed=args.jitter_seed)
        return [str(i) for i in range(len(pack_images))], feats, flip, info
    paths = P.pairs_to_arrays(pairs)[0]
    landmarks = F.read_landmarks(args.landmarks) if args.landmarks else None
    feats = F.extract_features(model, args.root, paths, batch_size=args.batch_size, flip=flip, device=args.device,
                               num_workers=args.workers, input_size=info["input_size"], landmarks=landmarks,
                               template=info["template"], precision=args.precision, jitter=jitter,
                               jitter_seed=args.jitter_seed)
    return paths, feats, flip, info


def run(args) -> int:
    if args.source in ("ijb", "packs") and args.jitter > 1:
        raise UsageError(f"--jitter belongs to verify lfw|pairs|bin|folder, not verify {args.source}")
    if args.source == "ijb":
        return run_ijb(args)
    if args.source == "packs":
        return run_packs(args)
    # input mistakes raise ToolkitErrors: the command line prints them as one 'error:' line, exit 2
    args.protocol = resolve_protocol(args.protocol, args.source)
    _check_args(args)
    pairs, pack_images = build_pairs(args)
    P.check_protocol_pairs(pairs, args.pairs or args.pack or args.root)
    logger.info("%d pairs (%d same) in %d folds", len(pairs), sum(p.same for p in pairs),
                len({p.fold for p in pairs}))
    paths, feats, flip_halves, info = compute_features(args, pairs, pack_images)
    if args.save_features:
        F.save_features_npz(args.save_features, paths, feats, layout=F.CROP_MIRROR_LAYOUT if flip_halves else None)
        logger.info("features saved to %s", args.save_features)
    source = args.features or args.checkpoint or "the extracted features"
    report = _evaluate(paths, feats, pairs, source, mean_sub=not args.no_mean_sub, protocol=args.protocol,
                       flip_halves=flip_halves)
    if args.save_model:
        # compare scores one pair by plain cosine (no dataset mean to subtract): store that threshold
        same = args.no_mean_sub and args.protocol == "sphereface"
        plain = report if same else _evaluate(paths, feats, pairs, source, mean_sub=False)
        threshold = float(plain["threshold"])
        how = (f"verify {args.source}, {len(pairs)} pairs, plain cosine, "
               f"{'crop only' if args.no_flip else 'crop + mirror'}")
        save_model_with_threshold(args.checkpoint, args.save_model, threshold, how)
        report["compare_threshold"] = threshold
        print(f"model with threshold {threshold:.4f}: {args.save_model} "
              f"(sphereface-plus compare A B --checkpoint {args.save_model})")
    report = {"pairs_from": args.source, **report, "flip": flip_halves if args.checkpoint else None,
              "jitter": args.jitter if args.checkpoint and args.jitter > 1 else 0,
              "source": args.checkpoint or args.features}
    print(format_report(report))
    if args.json:
        write_json_report(report, args.json)
        print(f"report: {args.json}")
    if args.plot:
        plot_roc({args.source: report}, args.plot, title=f"verify {args.source} ({args.protocol} protocol)")
        print(f"ROC plot: {args.plot}")
    if args.report_dir:
        write_report_dir(args, report, pairs, paths, feats, flip_halves, pack_images, info)
        print(f"report: {Path(args.report_dir) / REPORT_NAME}")
    return 0


def write_report_dir(args, report, pairs, paths, feats, flip_halves: bool, pack_images, info) -> None:
    """``--report-dir``: report.md (linking roc.png and hardest_errors.png), report.json, the plots."""
    import shlex
    import sys

    from eval.hard_errors import draw_error_grid, errors_markdown, hardest_errors
    from eval.lfw import pair_features
    from eval.protocols import pair_outcomes

    outcomes = pair_outcomes(args.protocol, *pair_features(paths, feats, pairs), flip_halves=flip_halves,
                             mean_sub=not args.no_mean_sub)
    picked = hardest_errors(outcomes, args.hardest)
    unit = "distance" if args.protocol == "insightface" else "cosine"
    if pack_images is not None:
        def names(i):
            return f"pack image {pairs[i].path1}", f"pack image {pairs[i].path2}"
    else:
        def names(i):
            return pairs[i].path1, pairs[i].path2
    crops = shown_crops(args, pairs, picked, pack_images, info)
    title = f"verify {args.source}: hardest errors ({args.protocol} protocol)"
    out = Path(args.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    if crops is not None:
        draw_error_grid(out / GRID_NAME, picked, outcomes, names, crops.__getitem__, unit, title=title)
    extra = errors_markdown(picked, outcomes, names, unit, GRID_NAME if crops is not None else None)
    write_json_report(report, out / "report.json")
    plot_roc({args.source: report}, out / "roc.png", title=f"verify {args.source} ({args.protocol} protocol)")
    if sys.argv[1:2] == ["verify"]:
        command = "sphereface-plus " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    else:  # called as a library (cli.main(argv)): the options that say what was scored
        given = [(k, getattr(args, k)) for k in ("checkpoint", "features", "pairs", "pack", "root", "landmarks",
                                                 "protocol")]
        command = f"sphereface-plus verify {args.source} " + " ".join(f"--{k} {shlex.quote(str(v))}"
                                                                      for k, v in given if v)
    text = verification_markdown(report, f"Verification: {args.source} ({args.protocol} protocol)", command,
                                 "roc.png", extra)
    atomic_write_bytes(out / REPORT_NAME, text.encode())


def shown_crops(args, pairs, picked, pack_images, info):
    """``{pair index: (crop 1, crop 2)}`` of the pairs ``picked`` shows, as the network saw them (aligned BGR
    crops of its size), or None when there are no images (``--features`` without ``--root``)."""
    shown = sorted({int(i) for idx in picked.values() for i in idx})
    size = None if info is None else info["input_size"]
    if pack_images is not None:
        images = F.EncodedImages(pack_images, size, args.pack)
        return {i: (images.crop(int(pairs[i].path1)), images.crop(int(pairs[i].path2))) for i in shown}
    if not args.root:
        return None
    rel = sorted({p for i in shown for p in (pairs[i].path1, pairs[i].path2)})
    landmarks = F.read_landmarks(args.landmarks) if args.landmarks else None
    template = info["template"] if info is not None else "112x96"
    images = F.ImageFiles(args.root, rel, input_size=size, landmarks=landmarks, template=template)
    at = {p: k for k, p in enumerate(rel)}
    return {i: (images.crop(at[pairs[i].path1]), images.crop(at[pairs[i].path2])) for i in shown}


def save_model_with_threshold(checkpoint, out, threshold: float, source: str = "") -> Path:
    """Write a copy of ``checkpoint``'s model with ``threshold`` stored, atomically.

    The copy has the model part of a training checkpoint (docs/interfaces.md): ``model`` (backbone
    state dict), ``head``, ``config``, ``iteration`` (and an imported model's ``preprocessing`` and
    ``imported_from``) as stored, plus ``threshold`` (the cosine threshold ``compare`` uses) and
    ``threshold_source`` (how it was found). No optimiser state, so it cannot ``--resume`` a run, but
    ``train.init_from`` and every evaluation command accept it, and it loads with
    ``torch.load(weights_only=True)``.
    """
    state = load_checkpoint(checkpoint)
    # an imported model's input convention and provenance travel with it (docs/import.md)
    keep = ("model", "head", "config", "iteration", "preprocessing", "imported_from")
    copy = {k: state[k] for k in keep if k in state}
    copy["threshold"] = float(threshold)
    copy["threshold_source"] = str(source)
    out = write_checkpoint(out, copy)
    logger.info("wrote %s (threshold %.4f from %s)", out, threshold, source or "verification")
    return out


# --------------------------------------------------------------------------- verify ijb


def add_ijb_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``verify ijb`` (it also uses --root, --checkpoint, --features, --json, --plot...)."""
    g = parser.add_argument_group("ijb (IJB-B / IJB-C 1:1 and 1:N, insightface's protocol; --root is the IJB folder)")
    g.add_argument("--dataset", default="IJBC", choices=J.IJB_DATASETS,
                   help="which meta file names to read under --root/meta (default IJBC)")
    g.add_argument("--task", default="1:1", choices=J.IJB_TASKS,
                   help="1:1 template verification (TAR@FAR; default), 1:N identification (TPIR@FPIR 1e-2, 1e-1 "
                        "and rank-1/5/10 on galleries G1 and G2 (IJB-B: S1, S2) separately, from "
                        "<ds>_1N_gallery_*.csv and <ds>_1N_probe_mixed.csv), or both")
    g.add_argument("--detector-score", action="store_true",
                   help="weight each face by its detector score from <ds>_name_5pts_score.txt (insightface D1; "
                        "its published tables use it)")
    g.add_argument("--normalize-faces", action="store_true",
                   help="L2-normalise each face feature before pooling (insightface N0; default N1 keeps the "
                        "norm as a quality weight)")


def _check_ijb_args(args) -> None:
    if bool(args.checkpoint) == bool(args.features):
        raise UsageError("verify ijb: give exactly one of --checkpoint (a .pt checkpoint or an exported .onnx) "
                         "and --features (an .npz with 'paths' and 'features')")
    if not args.root:
        raise UsageError("verify ijb needs --root, the IJB folder holding meta/ and loose_crop/")
    if getattr(args, "protocol", None) not in (None, "insightface"):
        raise UsageError(f"--protocol {args.protocol}: IJB is scored with insightface's protocol only (drop --protocol)")
    if getattr(args, "plot", None) and getattr(args, "task", "1:1") == "1:N":
        raise UsageError("--plot draws the 1:1 ROC curve: use --task both (or 1:1) with --plot")
    if args.features and args.no_flip:
        logger.warning("--no-flip has no effect with --features (the features are used as they are)")


def compute_ijb(args) -> Dict[str, object]:
    """Everything ``verify ijb`` computes, as a report dict (also used by tests)."""
    _check_ijb_args(args)
    task = getattr(args, "task", "1:1")
    meta = J.load_ijb_meta(args.root, args.dataset, need_landmarks=bool(args.checkpoint or args.detector_score),
                           need_pairs=task != "1:N")
    if task != "1:1":  # the 1:N lists are read (and checked) before anything is embedded
        for key in ["probes"] + [f"gallery_{g}" for g in J.IJB_GALLERIES[args.dataset]]:
            J.read_template_subjects(meta.files[key])
    if args.features:
        names, feats = F.load_features_npz(args.features)
    else:
        # J.model_face_features embeds in float32 (it takes no precision): the runtime is chosen for that
        model, info = load_inference_model(args.checkpoint, args.device, "fp32", args.runtime)
        names, feats = J.model_face_features(model, info, meta, args.batch_size, not args.no_flip, args.device,
                                             args.workers)
        if args.save_features:
            F.save_features_npz(args.save_features, names, feats)
            logger.info("features saved to %s", args.save_features)
    source = args.features or "the extracted features"
    report: Dict[str, object] = {"protocol": "insightface", "benchmark": "ijb", "task": task, "dataset": args.dataset}
    if task != "1:N":
        report.update(J.evaluate_ijb(meta, names, feats, args.detector_score, args.normalize_faces, source=source)[0])
    if task != "1:1":
        report["identification"] = I.evaluate_ijb_1n(meta, names, feats, args.dataset, args.detector_score,
                                                     args.normalize_faces, source=source)
    report.update({"flip": (not args.no_flip) if args.checkpoint else None, "source": args.checkpoint or args.features})
    return report


def run_ijb(args) -> int:
    report = compute_ijb(args)  # bad input raises a ToolkitError: one 'error:' line, exit 2
    if "tar_at_far" in report:
        print(J.format_ijb_report(report))
    if "identification" in report:
        print(I.format_identification(report, args.dataset))
    if args.json:
        write_json_report(report, args.json)
        print(f"report: {args.json}")
    if args.plot:
        plot_roc({f"{args.dataset}": report}, args.plot, title=f"{args.dataset} 1:1 verification", xlim=(1e-6, 1e-1))
        print(f"ROC plot: {args.plot}")
    return 0


# --------------------------------------------------------------------------- verify packs


def run_packs(args) -> int:
    """``sphereface-plus verify packs --dir DIR --checkpoint CKPT|MODEL.onnx``."""
    if not args.checkpoint or args.features:
        raise UsageError("verify packs embeds the packs' images: give --checkpoint (a .pt checkpoint or an exported "
                         ".onnx), not --features")
    if not args.dir:
        raise UsageError("verify packs needs --dir, the folder holding lfw.bin, cfp_fp.bin, agedb_30.bin, ...")
    if args.no_mean_sub:
        raise UsageError("--no-mean-sub belongs to verify lfw|pairs|folder (the sphereface protocol); the packs "
                         "are scored without a mean")
    require_file(args.checkpoint, "--checkpoint")
    protocol = resolve_protocol(args.protocol, "packs")
    paths = K.pack_paths(args.dir, args.packs or None)
    packs = K.load_packs(paths)
    model, info = load_inference_model(args.checkpoint, args.device, args.precision, args.runtime)
    for p in packs:  # before anything is embedded or written
        K.check_pack_size(p, info["input_size"])
    logger.info("%d packs: %s", len(packs), ", ".join(f"{p.name} ({len(p.issame)} pairs)" for p in packs))
    feats = K.embed_packs(model, packs, info["input_size"], args.batch_size, not args.no_flip, args.device,
                          args.workers, precision=args.precision)
    if args.save_features:  # rows named <pack>/<image index in the pack>
        F.save_features_npz(args.save_features, [f"{p.name}/{i}" for p in packs for i in range(len(p.images))],
                            np.concatenate(feats), layout=None if args.no_flip else F.CROP_MIRROR_LAYOUT)
        logger.info("features saved to %s", args.save_features)
    summary = K.score_packs(packs, feats, protocol, args.folds, flip_halves=not args.no_flip)
    summary.update({"flip": not args.no_flip, "source": args.checkpoint, "oracle_note": K.oracle_note()})
    print(K.format_packs_table(summary))
    if args.json:
        write_json_report(summary, args.json)
        print(f"report: {args.json}")
    if args.plot:
        plot_roc(summary["packs"], args.plot, title=f"verify packs ({protocol} protocol)")
        print(f"ROC plot: {args.plot}")
    return 0
