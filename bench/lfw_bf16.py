"""LFW verification of one trained model with float32 and with bf16 features: accuracy is not traded.

    sphereface-plus align --input ../shared/data/lfw/images --output /tmp/lfw-112x96 \\
        --landmarks ../shared/data/lfw/lfw_landmark.txt
    .venv/bin/python bench/lfw_bf16.py --checkpoint model.pt --root /tmp/lfw-112x96 \\
        --pairs ../shared/data/lfw/pairs.txt [--threads 2]

Embeds the images of all 6,000 View 2 pairs twice with ``eval.features.extract_features`` (the
``verify`` path: crop + mirror, one forward of the doubled batch): float32 (default memory format)
and bf16 (autocast + channels_last). Runs the 10-fold protocol on each (docs/theory.md#lfw-protocol, mean
subtraction on) and reports both mean accuracies, their difference (the issue asks <= 0.2 points),
the per-pair cosine difference |cos_fp32 - cos_bf16| (plain cosine of the L2-normalised 1024-d
features), the per-image feature cosine between the two precisions, and the embedding time of each.
Writes ``bench/results/bf16_lfw.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eval.features import extract_features, load_embedding_model  # noqa: E402
from eval.lfw import evaluate_features, pair_features, parse_pairs  # noqa: E402
from eval.pairs import pairs_to_arrays  # noqa: E402
from sphereface_plus.utils import atomic_write_text  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--root", required=True, help="aligned 112x96 LFW crops (sphereface-plus align)")
    ap.add_argument("--pairs", required=True, help="LFW pairs.txt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bf16_lfw.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pairs = parse_pairs(args.pairs)
    paths = pairs_to_arrays(pairs)[0]
    feats, seconds, reports = {}, {}, {}
    for precision in ("fp32", "bf16"):
        model, info = load_embedding_model(args.checkpoint)  # a fresh model each time: bf16 converts it to NHWC
        t0 = time.perf_counter()
        feats[precision] = extract_features(model, args.root, paths, batch_size=args.batch_size,
                                            num_workers=args.workers, input_size=info["input_size"],
                                            template=info["template"], precision=precision)
        seconds[precision] = time.perf_counter() - t0
        reports[precision] = evaluate_features(paths, feats[precision], pairs, mean_sub=True)
    a, b = _unit(feats["fp32"]), _unit(feats["bf16"])
    image_cos = (a * b).sum(1)
    pair_cos = {}
    for precision, f in (("fp32", a), ("bf16", b)):
        f1, f2, _, _ = pair_features(paths, f, pairs)
        pair_cos[precision] = (f1 * f2).sum(1)
    d = np.abs(pair_cos["fp32"] - pair_cos["bf16"])
    acc = {p: 100 * reports[p]["mean_accuracy"] for p in reports}
    std = {p: 100 * reports[p]["std_accuracy"] for p in reports}
    load = os.getloadavg()
    lines = [
        "# LFW View 2 with float32 and bf16 features (one trained model)",
        "",
        f"Command: `.venv/bin/python bench/lfw_bf16.py --checkpoint {args.checkpoint} --root {args.root} "
        f"--pairs {args.pairs} --threads {args.threads}`",
        "",
        f"Model: {info['backbone']} ({args.checkpoint}, iteration {info['iteration']}); {len(pairs)} pairs, "
        f"{len(paths)} images, crop + mirror (1024-d), 10 folds, mean subtraction. "
        f"Load average at the end: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}.",
        "",
        "| features | mean accuracy | std over folds | embedding time |",
        "| --- | --- | --- | --- |",
        f"| fp32 | {acc['fp32']:.2f} % | {std['fp32']:.2f} | {seconds['fp32']:.0f} s |",
        f"| bf16 (autocast + channels_last) | {acc['bf16']:.2f} % | {std['bf16']:.2f} | {seconds['bf16']:.0f} s |",
        "",
        f"- accuracy difference bf16 - fp32: {acc['bf16'] - acc['fp32']:+.2f} points (bound: 0.2)",
        f"- fold accuracies equal in {sum(x == y for x, y in zip(reports['fp32']['fold_accuracies'], reports['bf16']['fold_accuracies']))} of 10 folds",
        f"- per-pair cosine difference |cos_fp32 - cos_bf16| over the {len(pairs)} pairs: max {d.max():.5f}, "
        f"mean {d.mean():.5f}, 99th percentile {np.percentile(d, 99):.5f}",
        f"- per-image cosine between the fp32 and bf16 feature of the same image: min {image_cos.min():.6f}, "
        f"mean {image_cos.mean():.6f}",
    ]
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
