"""Training speed of the MHE CIFAR recipe: iterations/s with and without MHE, and the MHE overhead.

Every setting runs the real training step of ``sphereface-plus cifar`` (batch augmentation on the
device, CNN-9 forward, the reference loss, the MHE terms over 10 hidden layers + the output layer,
backward, SGD step) on random uint8 images, in the same process. The settings take turns one step at a
time (baseline, mhe s=2, ..., then again), so a change of machine load hits all of them alike; the
table gives each setting's best and median seconds per iteration, and the MHE overhead as the ratio to
the baseline's (best to best, median to median).

    python bench/cifar_speed.py                       # CPU, batch 128; CUDA too when present
    python bench/cifar_speed.py --iters 10 --threads 1 --out bench/results/cifar.md

The markdown table goes to ``--out`` (default bench/results/cifar.md).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.cifar import random_pad_crop_flip, to_network_input  # noqa: E402
from sphereface_plus import cifar  # noqa: E402
from sphereface_plus.utils import atomic_write_text  # noqa: E402

SETTINGS = [
    ("baseline", "0"),
    ("mhe", "2"),
    ("mhe", "a0"),
    ("half_mhe", "2"),
    ("half_mhe", "a0"),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_runner(model_name: str, power: str, device: torch.device, batch: int, images: torch.Tensor, labels,
                clock=time.perf_counter):
    cfg = cifar.CifarConfig(model_name=model_name, mhe_power=power, dataset="cifar100", batch_size=batch)
    model = cifar.build_model(100, seed=0).to(device)
    reg = cifar.build_regularizer(model, cfg)
    opt = cifar.build_optimizer(model, cifar.CifarConfig(lr=0.01))
    gen = torch.Generator().manual_seed(0)
    n = images.shape[0]

    def step() -> float:
        idx = torch.randint(0, n, (batch,), generator=gen)
        t = clock()
        x = to_network_input(random_pad_crop_flip(images[idx.to(images.device)], gen))
        cifar.train_step(model, reg, opt, x, labels[idx.to(labels.device)], cfg)
        _sync(device)
        return clock() - t

    return cfg.setting, step


def measure(device: torch.device, batch: int, iters: int, warmup: int, clock=time.perf_counter):
    """Round-robin: one step of each setting in turn, ``iters`` times, after ``warmup`` untimed steps each.

    Returns rows ``(setting, best s/it, median s/it, overhead from best, overhead from median)``; the
    best (minimum) time is the least disturbed by other processes on a shared machine.
    """
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2048, 32, 32, 3), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 100, (2048,), generator=g).to(device)
    runners = [make_runner(m, s, device, batch, images, labels, clock) for m, s in SETTINGS]
    times = {name: [] for name, _ in runners}
    for name, step in runners:
        for _ in range(warmup):
            step()
    for i in range(iters):
        for name, step in runners:
            times[name].append(step())
        print(f"[{device}] pass {i + 1}/{iters}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()),
              flush=True)
    base_best, base_med = min(times["baseline"]), statistics.median(times["baseline"])
    rows = []
    for name, _ in runners:
        best, med = min(times[name]), statistics.median(times[name])
        rows.append((name, best, med, best / base_best, med / base_med))
    return rows


def table(rows, device_desc: str) -> str:
    out = [
        f"**{device_desc}**",
        "",
        "| setting | iterations/s (best) | s/iteration best / median | MHE overhead (x baseline), best / median |",
        "| --- | --- | --- | --- |",
    ]
    for name, best, med, r_best, r_med in rows:
        out.append(f"| {name} | {1.0 / best:.3f} | {best:.3f} / {med:.3f} | {r_best:.2f} / {r_med:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=128, help="default: 128, the recipe's")
    p.add_argument("--iters", type=int, default=6, help="timed iterations per setting, round-robin (CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per setting first (CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: CPU time of the calling thread, which with --threads 1 is "
                        "the step's whole compute and is not inflated by other processes on a shared machine")
    p.add_argument("--cuda_iters", type=int, default=50, help="timed iterations per setting on CUDA")
    p.add_argument("--no_cuda", action="store_true", help="skip the CUDA section even when a GPU is present")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cifar.md"))
    args = p.parse_args(argv)

    cmd = "python bench/cifar_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = [
        "# MHE CIFAR training speed",
        "",
        f"Command: `{cmd.strip()}`. One training step of `sphereface-plus cifar` (augmentation, CNN-9 "
        f"forward/backward, reference loss, MHE on 10 hidden layers + score, SGD) at batch {args.batch_size}, "
        "CIFAR-100 head; the settings take turns step by step in one process; best (minimum) and median "
        "seconds per iteration; overhead = setting / baseline.",
        "",
        f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}.",
        "",
    ]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        p.error("--clock cpu needs --threads 1 (other threads' work would not be counted)")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    cpu_rows = measure(torch.device("cpu"), args.batch_size, args.iters, args.warmup, clock)
    try:
        load = "1/5/15-min load average %.1f / %.1f / %.1f at the end of the run" % os.getloadavg()
    except OSError:
        load = "load average unknown"
    what = "CPU time of the thread (iterations per CPU-second)" if args.clock == "cpu" else "wall-clock time"
    cpu_desc = (f"CPU: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {what}, {load} (on a "
                f"shared machine wall-clock numbers are noisy; the ratios, measured step by step in turns, less so)")
    parts.append(table(cpu_rows, cpu_desc))
    if torch.cuda.is_available() and not args.no_cuda:
        dev = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        rows = measure(dev, args.batch_size, args.cuda_iters, 5)
        parts.append(table(rows, f"CUDA: {torch.cuda.get_device_name(dev)}"))
    else:
        parts.append("CUDA: no GPU was available for this run.\n")
    text = "\n".join(parts)
    atomic_write_text(args.out, text)
    print(text)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
