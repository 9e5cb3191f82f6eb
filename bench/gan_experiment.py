"""A small real MHE-GAN experiment: the four published variants at the same budget and seed.

Runs ``sphereface-plus gan --config configs/gan_<variant>.yaml`` for baseline, SN, MHE and SN+MHE on
the CIFAR-10 subset (``../shared/data/cifar10-subset``: 10k training images), ``--jobs`` at a time,
one torch thread each, then writes ``bench/results/gan_experiment.md``: FID and KID against the
subset's test images and against as many of its training images (``--real_limit``, the first N of
each split, so both reference sets have the same size and FID's sample-size bias is the same) at each
evaluation, next to the published Inception Scores (200k iterations, full CIFAR-10); the sample grids
stay in the run folders (``<out>/<variant>/samples_<iteration>.png``, not tracked). The real statistics are
computed once up front (cached, all threads) so the runs do not each compute them. Each run is
resumable (``--resume``), so an interrupted experiment continues where it stopped::

    python bench/gan_experiment.py                    # 450 iterations per variant: ~20 CPU-minutes of training
    python bench/gan_experiment.py --seeds 1 --variants baseline sn   # seed controls: how far the seed alone moves FID
    python bench/gan_experiment.py --report-only      # rebuild the table from bench/out/gan_experiment

The table is the first of ``--seeds`` (run folder ``<out>/<variant>`` for seed 0,
``<out>/<variant>_seed<k>`` otherwise); every other seed found there goes into a last-row table per
(variant, seed).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sphereface_plus.gan.config import DEFAULT_STATS_CACHE, PUBLISHED_IS  # noqa: E402
from sphereface_plus.engine.run_log import read_jsonl  # noqa: E402

VARIANTS = ("baseline", "sn", "mhe", "sn_mhe")
LABELS = {"baseline": "GAN", "sn": "GAN + SN", "mhe": "GAN + MHE (1e-6)", "sn_mhe": "GAN + SN + MHE (1e-7)"}


def run_dir(args, variant: str, seed: int) -> Path:
    return Path(args.out) / (variant if seed == 0 else f"{variant}_seed{seed}")


def launch(variant: str, seed: int, args) -> subprocess.Popen:
    out = run_dir(args, variant, seed)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "sphereface_plus", "gan", "--config", str(ROOT / "configs" / "gan" / f"{variant}.yaml"),
           "--data", args.data, "--out", str(out), "--resume", "--threads", "1", "--device", "cpu",
           f"iterations={args.iterations}", f"eval_every={args.eval_every}", f"eval_samples={args.eval_samples}",
           f"seed={seed}", f"real_stats={args.real_stats}", f"real_limit={args.real_limit}",
           f"stats_cache={args.stats_cache}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=open(out / "stdout.log", "w"), stderr=subprocess.STDOUT, env=env)


def prepare_real_stats(args) -> Dict[str, object]:
    """The real-image Inception statistics of every split, cached where the runs read them (a second
    call reads the cache and runs no network)."""
    from data_prep.cifar import load_cifar_split
    from sphereface_plus.gan.inception_metrics import InceptionPool3, real_stats

    net = InceptionPool3()
    stats = {}
    for split in args.real_stats.split(","):
        x = load_cifar_split(args.data, "cifar10", split)[0]
        stats[split] = real_stats(x[: args.real_limit] if args.real_limit else x, net, Path(args.stats_cache).expanduser())
    return stats


def real_floor(args) -> str:
    """FID/KID of the train reference set against the test one: what a perfect generator would score
    against the test images at these sample sizes (FID is biased upward at 2k images; KID is not)."""
    from sphereface_plus.gan.inception_metrics import compare_stats

    stats = prepare_real_stats(args)
    if set(stats) != {"test", "train"}:
        return ""
    r = compare_stats(stats["test"], stats["train"])
    return (f"Real against real (the floor at these sizes): the {r['n_fake']} train images against the "
            f"{r['n_real']} test images score FID {r['fid']:.1f}, KID x1e3 {1e3 * r['kid']:.1f} ± {1e3 * r['kid_std']:.1f}.")


def _scores(r: dict, suffix: str) -> str:
    if f"fid{suffix}" not in r:
        return "- | -"
    return f"{r[f'fid{suffix}']:.1f} | {1e3 * r[f'kid{suffix}']:.1f} ± {1e3 * r[f'kid_std{suffix}']:.1f}"


def seed_table(args) -> List[str]:
    """The last evaluation of every (variant, seed) run found in ``--out``, when more than one seed was run."""
    runs = []
    for v in VARIANTS:
        for d in sorted(Path(args.out).glob(f"{v}*")):
            if d.name != v and not d.name.startswith(f"{v}_seed"):
                continue  # sn_mhe under sn*
            rows = read_jsonl(d / "metrics.jsonl") if (d / "metrics.jsonl").is_file() else []
            if rows:
                runs.append((v, 0 if d.name == v else int(d.name[len(f"{v}_seed"):]), rows[-1]))
    if len({seed for _, seed, _ in runs}) < 2:
        return []
    lines = ["", "Seed controls, last evaluation of each run (same budget; only the seed differs):", "",
             "| variant | seed | iteration | FID test | KID test x1e3 | FID train | KID train x1e3 |",
             "|---|---|---|---|---|---|---|"]
    for v, seed, r in runs:
        lines.append(f"| {LABELS[v]} | {seed} | {r['iteration']} | {_scores(r, '')} | {_scores(r, '_train')} |")
    return lines


def report(args, wall: Dict[str, float]) -> str:
    seed = args.seeds[0]
    lines = [
        "# MHE-GAN: a small CPU experiment (CIFAR-10 subset)",
        "",
        f"`bench/gan_experiment.py --iterations {args.iterations} --eval_every {args.eval_every} "
        f"--eval_samples {args.eval_samples} --jobs {args.jobs}`: the four recipes `configs/gan_*.yaml` at the same "
        f"seed ({seed}) and budget, batch 64, on `cifar10-subset` (10k training images), one torch thread per "
        f"run, {args.jobs} runs at a time on a 2-core machine. FID and KID (x1e3, mean ± std over 100 subsets) of "
        f"{args.eval_samples} generated images (G in eval mode, noise seed 0) against the first "
        f"{args.real_limit or 'all'} images of the subset's {' and '.join(args.real_stats.split(','))} split, "
        f"in the TF-2015 Inception pool3 space. `elapsed s`: wall time of the run at that row, evaluations included.",
        "",
        "| variant | published IS (200k it., CIFAR-10) | iteration | FID test | KID test x1e3 | FID train | "
        "KID train x1e3 | d_loss | g_loss | mhe term | elapsed s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        path = run_dir(args, v, seed) / "metrics.jsonl"
        rows = read_jsonl(path) if path.is_file() else []
        if not rows:
            lines.append(f"| {LABELS[v]} | {PUBLISHED_IS[v]:.2f} | not run | | | | | | | | |")
            continue
        for i, r in enumerate(rows):
            name, pub = (LABELS[v], f"{PUBLISHED_IS[v]:.2f}") if i == 0 else ("", "")
            lines.append(f"| {name} | {pub} | {r['iteration']} | {_scores(r, '')} | {_scores(r, '_train')} | "
                         f"{r['d_loss']:.3f} | {r['g_loss']:.3f} | {r['mhe']:.3g} | {r['elapsed_s']:.0f} |")
    lines += seed_table(args)
    floor = real_floor(args)
    if floor:
        lines += ["", floor]
    if wall:
        lines += ["", "Wall time (s): " + ", ".join(f"{v} {t:.0f}" for v, t in wall.items()) + "."]
    lines.append("")
    return "\n".join(lines)


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "cifar10-subset"))
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "gan_experiment"))
    p.add_argument("--iterations", type=int, default=450, help="per variant (450: ~20 CPU-minutes of training)")
    p.add_argument("--eval_every", type=int, default=150)
    p.add_argument("--eval_samples", type=int, default=1000)
    p.add_argument("--real_stats", default="test,train", choices=("test", "train", "test,train"))
    p.add_argument("--real_limit", type=int, default=2000, help="first N images of each split (0: all)")
    p.add_argument("--stats_cache", default=DEFAULT_STATS_CACHE)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run (the table shows the first)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    wall: Dict[str, float] = {}
    if not args.report_only:
        if args.eval_samples:
            t = time.perf_counter()
            prepare_real_stats(args)
            wall["real statistics"] = time.perf_counter() - t
            print(f"real statistics: {wall['real statistics']:.0f} s", flush=True)
        pending = [(v, seed) for seed in args.seeds for v in args.variants]
        running = {}
        while pending or running:
            while pending and len(running) < args.jobs:
                v, seed = pending.pop(0)
                name = run_dir(args, v, seed).name
                running[name] = (launch(v, seed, args), time.perf_counter())
            time.sleep(2)
            for v, (proc, t) in list(running.items()):
                if proc.poll() is not None:
                    wall[v] = time.perf_counter() - t
                    print(f"{v}: exit {proc.returncode} after {wall[v]:.0f} s", flush=True)
                    del running[v]
    text = report(args, wall)
    (ROOT / "bench" / "results" / "gan_experiment.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
