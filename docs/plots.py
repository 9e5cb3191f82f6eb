"""Draw the benchmark figures of docs/benchmarks.md from the committed results in bench/results/*.md.

Run by ``make docs`` before ``mkdocs build``; writes PNGs into ``docs/img/bench/`` (not tracked: the
figures are always drawn from the results that are committed, so they cannot drift from the tables).
Reads only the markdown tables the benchmark scripts write; a table that is missing or whose columns
changed stops the build with a message naming the file and the column, rather than drawing a wrong plot.

    python docs/plots.py [--out docs/img/bench]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def tables(name: str) -> List[List[Dict[str, str]]]:
    """Every markdown table of ``bench/results/<name>`` as a list of rows (dicts keyed by the header)."""
    path = RESULTS / name
    if not path.is_file():
        sys.exit(f"docs/plots.py: {path} is missing (run the benchmark that writes it)")
    found, header, rows = [], None, []
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(dict(zip(header, cells)))
        elif header is not None:
            found.append(rows)
            header, rows = None, []
    return found


def table(name: str, first_column: str, index: int = 0) -> List[Dict[str, str]]:
    """The ``index``-th table of ``name`` whose first column is ``first_column``."""
    matching = [t for t in tables(name) if t and next(iter(t[0])) == first_column]
    if len(matching) <= index:
        sys.exit(f"docs/plots.py: no table starting with column {first_column!r} in bench/results/{name}")
    return matching[index]


def num(text: str) -> float:
    """The first number in a cell ('1,298', '83.33% ± 4.94', '1.92x', '1334.9 (one pass)')."""
    m = re.search(r"-?[0-9][0-9,]*\.?[0-9]*(?:e-?[0-9]+)?", text)
    if not m:
        raise ValueError(f"no number in table cell {text!r}")
    return float(m.group(0).replace(",", ""))


def column(rows, key: str, name: str) -> List[str]:
    if rows and key not in rows[0]:
        sys.exit(f"docs/plots.py: bench/results/{name} has no column {key!r} (columns: {list(rows[0])})")
    return [r[key] for r in rows]


def save(fig, out: Path, stem: str) -> None:
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    plt.close(fig)


def plot_mhe(out: Path) -> None:
    rows = [r for r in table("mhe.md", "case") if num(r["C"]) == 10572]
    labels = [r["case"].replace("classifier_mhe ", "").replace("`", "").replace(" (C x C Gram, autograd)", "") for r in rows]
    xs = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in ((axes[0], "wall time (s)", "wall time of fwd + bwd (s)"),
                           (axes[1], "peak extra memory (MiB)", "peak extra memory (MiB)")):
        vals = [num(v) for v in column(rows, key, "mhe.md")]
        ax.bar(xs, vals, color=["#888"] + ["#2a7"] * (len(rows) - 1))
        ax.set_xticks(list(xs), labels, rotation=15)
        ax.set_yscale("log")
        ax.set_title(title)
    fig.suptitle("SphereFace+ MHE term, C = 10,572, d = 512, B = 512 (bench/mhe.py)")
    save(fig, out, "mhe")


def plot_bf16(out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, name, title in ((axes[0], "embed_throughput.md", "embedding, sphere20, crop + mirror"),
                            (axes[1], "train_throughput.md", "training step, sphere20, batch 16")):
        rows = table(name, "variant")
        vals = [num(v) for v in column(rows, "images/s (median)", name)]
        ax.barh(range(len(rows)), vals, color="#37a")
        ax.set_yticks(range(len(rows)), [r["variant"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("images/s (median), 2-core CPU")
        ax.set_title(title)
    save(fig, out, "bf16")


def plot_sharded(out: Path) -> None:
    rows = table("sharded_classifier.md", "head")
    sharded = [r for r in rows if r["head"] == "sharded"]
    replicated = [r for r in rows if r["head"] == "replicated"][0]
    procs = [num(r["processes"]) for r in sharded]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in ((axes[0], "peak memory per rank (MiB)", "peak memory per rank (MiB)"),
                           (axes[1], "step CPU per rank (s)", "step CPU time per rank (s)")):
        ax.plot(procs, [num(r[key]) for r in sharded], "o-", label="sharded")
        ax.axhline(num(replicated[key]), color="#888", ls="--", label="replicated, 1 process")
        ax.set_xlabel("processes")
        ax.set_xticks(procs)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("Row-sharded classifier, C = 1,000,000, d = 512 (bench/sharded_classifier.py)")
    save(fig, out, "sharded")


def plot_lfw(out: Path) -> None:
    rows = table("lfw_fold_experiment.md", "variant")
    acc = [num(r["fold-1 accuracy"]) for r in rows]
    std = [num(r["fold-1 accuracy"].split("±")[1]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh(range(len(rows)), acc, xerr=std, color="#a63", capsize=3)
    ax.set_yticks(range(len(rows)), [r["variant"].replace(" (initial weights, no training)", "") for r in rows],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(50, 95)
    ax.set_xlabel("LFW fold-1 accuracy (%), mean ± std over 10 sub-folds")
    ax.set_title("sphere4, 1000 iterations on LFW folds 2-10 (bench/lfw_fold_experiment.py)")
    save(fig, out, "lfw_fold")


def plot_gan(out: Path) -> None:
    rows = table("gan_experiment.md", "variant")
    series: Dict[str, List[tuple]] = {}
    current = None
    for r in rows:
        current = r["variant"] or current
        series.setdefault(current, []).append((num(r["iteration"]), num(r["FID test"])))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("FID against the test images")
    ax.set_title("MHE-GAN, 450 CPU iterations, seed 0 (bench/gan_experiment.py)")
    ax.legend(fontsize=8)
    save(fig, out, "gan_fid")


def plot_cifar(out: Path) -> None:
    rows = table("cifar.md", "setting")
    vals = [num(v.split("/")[0]) for v in column(rows, "MHE overhead (x baseline), best / median", "cifar.md")]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(len(rows)), vals, color="#76a")
    ax.axhline(1.0, color="#888", ls="--")
    ax.set_xticks(range(len(rows)), [r["setting"] for r in rows])
    ax.set_ylabel("step time / baseline (best)")
    ax.set_title("CNN-9 step with MHE on all 11 layers (bench/cifar_speed.py)")
    save(fig, out, "cifar")


PLOTS = (plot_mhe, plot_bf16, plot_sharded, plot_lfw, plot_gan, plot_cifar)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "bench")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for plot in PLOTS:
        plot(args.out)
    print(f"docs/plots.py: wrote {len(PLOTS)} figures to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
