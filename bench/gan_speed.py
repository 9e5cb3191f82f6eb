"""MHE-GAN training speed on CPU: iterations/s of the four published variants and the MHE overhead.

One process, one network pair per variant (baseline, SN, MHE, SN+MHE), batch 64 (the original's), random
real batches. The variants are interleaved in each repeat (so a change in machine load hits all of them),
each repeat times ``--iters`` full iterations (G step + D step, ``train_iteration``) after one warm-up;
the best and the median over ``--repeats`` are reported, and the MHE overhead as the ratio of the
baseline's time to the MHE variant's (same SN setting).

    PYTHONPATH=. python bench/gan_speed.py --threads 1 --out bench/results/gan_speed.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from sphereface_plus.gan import Discriminator, Generator, make_optimizers, train_iteration
from sphereface_plus.gan.losses import MHE_MAGNITUDE
from sphereface_plus.utils import atomic_write_text

VARIANTS = (
    ("baseline", False, 0.0),
    ("SN", True, 0.0),
    ("MHE", False, MHE_MAGNITUDE["no_sn"]),
    ("SN+MHE", True, MHE_MAGNITUDE["sn"]),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=2, help="timed iterations per variant and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/gan_speed.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = args.batch_size
    nets = {}
    for name, sn, mag in VARIANTS:
        g, d = Generator(), Discriminator(spectral_norm=sn)
        nets[name] = (g, d, *make_optimizers(g, d), mag)
    real = torch.rand(b, 3, 32, 32) * 2 - 1

    def run(name: str, n: int) -> float:
        g, d, og, od, mag = nets[name]
        t0 = time.perf_counter()
        for _ in range(n):
            train_iteration(g, d, og, od, real, torch.randn(b, 128), torch.randn(b, 128), mhe_magnitude=mag)
        return (time.perf_counter() - t0) / n

    for name, *_ in VARIANTS:
        run(name, 1)  # warm-up
    times = {name: [] for name, *_ in VARIANTS}
    for _ in range(args.repeats):
        for name, *_ in VARIANTS:
            times[name].append(run(name, args.iters))
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    load = os.getloadavg()
    lines = [
        "# MHE-GAN training speed (CPU)",
        "",
        f"`bench/gan_speed.py`: batch {b}, {args.threads} thread(s), {args.repeats} interleaved repeats of "
        f"{args.iters} iterations (G step + D step) per variant, after one warm-up; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}; load average at the end {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} on {os.cpu_count()} cores (a shared machine: absolute figures are pessimistic, "
        "the ratios are the point).",
        "",
        "| variant | it/s (best) | it/s (median) | s/it (best) | time vs baseline of same SN (best) |",
        "|---|---|---|---|---|",
    ]
    ref = {"baseline": "baseline", "SN": "SN", "MHE": "baseline", "SN+MHE": "SN"}
    for name, *_ in VARIANTS:
        ratio = best[name] / best[ref[name]]
        lines.append(f"| {name} | {1 / best[name]:.3f} | {1 / med[name]:.3f} | {best[name]:.2f} | {ratio:.3f} |")
    lines += [
        "",
        f"MHE overhead (time with MHE / without, best): {best['MHE'] / best['baseline']:.3f} without SN, "
        f"{best['SN+MHE'] / best['SN']:.3f} with SN. SN overhead: {best['SN'] / best['baseline']:.3f}.",
        "",
    ]
    text = "\n".join(lines)
    atomic_write_text(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()
