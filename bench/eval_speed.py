"""Speed of the LFW 10-fold protocol: eval.verification_metrics (sorted scores + searchsorted over the 20,001
thresholds) against a per-threshold loop written here (a direct port of evaluation.m's getThreshold),
on the same numbers: 6,000 pairs with the real LFW fold structure, 1024-d features.

Both run the full protocol (per-fold mean subtraction, L2 normalisation, cosine, threshold choice on
the other 9 folds) and must give identical fold accuracies. Prints a markdown table and writes it
to bench/results/eval.md.

    .venv/bin/python bench/eval_speed.py [--pairs ../shared/data/lfw/pairs.txt] [--repeats 3]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.verification_metrics import fold_scores, kfold_accuracy  # noqa: E402
from eval.pairs import pairs_to_arrays, parse_lfw_pairs  # noqa: E402

DEFAULT_PAIRS = ROOT.parent / "shared" / "data" / "lfw" / "pairs.txt"


def loop_protocol(f1, f2, issame, folds):
    """The protocol with one numpy accuracy evaluation per threshold (evaluation.m, line by line)."""
    thresholds = np.arange(-10000, 10001) / 10000.0
    accs = []
    for k in range(10):
        train, test = folds != k, folds == k
        mu = np.concatenate([f1[train], f2[train]]).mean(0)
        a = f1 - mu
        b = f2 - mu
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        s = (a * b).sum(1)
        st, yt = s[train], issame[train]
        acc = np.empty(thresholds.size)
        for i, t in enumerate(thresholds):
            acc[i] = ((st[yt] > t).sum() + (st[~yt] < t).sum()) / st.size
        thr = thresholds[acc == acc.max()].mean()
        sv, yv = s[test], issame[test]
        accs.append(((sv[yv] > thr).sum() + (sv[~yv] < thr).sum()) / sv.size)
    return np.array(accs)


def loop_thresholds(scores, issame, folds):
    """Threshold choice and fold accuracy only, one numpy evaluation per threshold."""
    thresholds = np.arange(-10000, 10001) / 10000.0
    accs = []
    for k in range(10):
        train, test = folds != k, folds == k
        st, yt = scores[k][train], issame[train]
        acc = np.empty(thresholds.size)
        for i, t in enumerate(thresholds):
            acc[i] = ((st[yt] > t).sum() + (st[~yt] < t).sum()) / st.size
        thr = thresholds[acc == acc.max()].mean()
        sv, yv = scores[k][test], issame[test]
        accs.append(((sv[yv] > thr).sum() + (sv[~yv] < thr).sum()) / sv.size)
    return np.array(accs)


def vectorised_thresholds(scores, issame, folds):
    return kfold_accuracy(scores, issame, folds)["fold_accuracies"]


def vectorised_protocol(f1, f2, issame, folds):
    _, scores = fold_scores(f1, f2, folds, mean_sub=True)
    return kfold_accuracy(scores, issame, folds)["fold_accuracies"]


def make_data(pairs_path: Path, dim: int, seed: int):
    if pairs_path.is_file():
        pairs = parse_lfw_pairs(pairs_path)
        source = "real LFW pairs.txt (10 folds of 300 + 300 pairs, 7,701 images)"
    else:  # same structure: 10 folds x (300 matched + 300 mismatched), made-up names
        from eval.pairs import Pair

        pairs = [Pair(f"p{k}_{i}/a", f"p{k}_{i}/b", True, k) for k in range(10) for i in range(300)] + \
                [Pair(f"q{k}_{i}/a", f"r{k}_{i}/a", False, k) for k in range(10) for i in range(300)]
        source = "synthetic pairs with the LFW fold structure (pairs.txt not found)"
    paths, i1, i2, issame, folds = pairs_to_arrays(pairs)
    rng = np.random.default_rng(seed)
    centres = {}
    feats = np.empty((len(paths), dim))
    for j, p in enumerate(paths):
        person = p.split("/")[0]
        if person not in centres:
            centres[person] = rng.normal(size=dim)
        feats[j] = centres[person] + 3.0 * rng.normal(size=dim) + 0.5  # about 95% accuracy at 1024-d
    return feats[i1], feats[i2], issame, folds, source


def best_time(fn, repeats, *a):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*a)
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval.md")
    args = ap.parse_args(argv)

    f1, f2, issame, folds, source = make_data(args.pairs, args.dim, 0)
    t_vec, acc_vec = best_time(vectorised_protocol, args.repeats, f1, f2, issame, folds)
    t_loop, acc_loop = best_time(loop_protocol, 1, f1, f2, issame, folds)
    scores = fold_scores(f1, f2, folds)[1]
    t_vthr, acc_vthr = best_time(vectorised_thresholds, args.repeats, scores, issame, folds)
    t_lthr, acc_lthr = best_time(loop_thresholds, 1, scores, issame, folds)
    identical = bool(np.array_equal(acc_vec, acc_loop) and np.array_equal(acc_vthr, acc_lthr)
                     and np.array_equal(acc_vec, acc_vthr))
    rows = [
        "| LFW 10-fold protocol, 6,000 pairs, 1024-d | time (s) | speed-up |",
        "| --- | ---: | ---: |",
        f"| per-threshold loop (20,001 thresholds x 10 folds, numpy per threshold) | {t_loop:.3f} | 1.0x |",
        f"| `eval.verification_metrics` (sort once, searchsorted, integer counts) | {t_vec:.4f} | {t_loop / t_vec:.0f}x |",
        f"| threshold choice only, per-threshold loop (scores given) | {t_lthr:.3f} | 1.0x |",
        f"| threshold choice only, `eval.verification_metrics.kfold_accuracy` | {t_vthr:.4f} | {t_lthr / t_vthr:.0f}x |",
    ]
    text = "\n".join([
        "# Verification protocol speed",
        "",
        f"Data: {source}; synthetic identity features, dim {args.dim}. Best of {args.repeats} runs for the",
        "vectorised protocol, one run for the loop (both include mean subtraction and scoring).",
        f"Fold accuracies identical: {identical} (mean {100 * acc_vec.mean():.2f}%).",
        f"Machine: {platform.processor() or platform.machine()}, numpy {np.__version__}, python "
        f"{platform.python_version()}.",
        "",
        *rows,
        "",
        "Reproduce: `.venv/bin/python bench/eval_speed.py`",
        "",
    ])
    print(text)
    from sphereface_plus.utils import atomic_write_text

    atomic_write_text(args.out, text)
    if not identical:
        print("ERROR: the two implementations disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
