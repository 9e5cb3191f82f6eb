"""Training speed of the MHE CIFAR recipe: iterations/s with and without MHE, and the MHE overhead.

Every setting runs the real training step of ``sphereface-plus cifar`` (batch augmentation on the
device, CNN-9 forward, the reference loss, the MHE terms over 10 hidden layers + the output layer,
backward, SGD step) on random uint8 images, in the same process; the settings are measured in
interleaved rounds (baseline, mhe s=2, ..., then again) so that a change of machine load hits all of
them alike, and each setting's time is the median over its timed iterations. The MHE overhead is the
ratio of a setting's seconds per iteration to the baseline's in the same round.

    python bench/cifar_speed.py                       # CPU, batch 128; CUDA too when present
    python bench/cifar_speed.py --iters 10 --rounds 3 --out bench/results/cifar.md

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


def make_runner(model_name: str, power: str, device: torch.device, batch: int, images: torch.Tensor, labels):
    cfg = cifar.CifarConfig(model_name=model_name, power_s=power, dataset="cifar100", batch_size=batch)
    model = cifar.build_model(100, seed=0).to(device)
    reg = cifar.build_regularizer(model, cfg)
    opt = cifar.build_optimizer(model, 0.01)
    gen = torch.Generator().manual_seed(0)
    n = images.shape[0]

    def step() -> float:
        idx = torch.randint(0, n, (batch,), generator=gen)
        t = time.perf_counter()
        x = cifar.to_network_input(cifar.random_pad_crop_flip(images[idx.to(images.device)], gen))
        cifar.train_step(model, reg, opt, x, labels[idx.to(labels.device)], cfg)
        _sync(device)
        return time.perf_counter() - t

    return cfg.setting, step


def measure(device: torch.device, batch: int, iters: int, warmup: int, rounds: int):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2048, 32, 32, 3), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 100, (2048,), generator=g).to(device)
    runners = [make_runner(m, s, device, batch, images, labels) for m, s in SETTINGS]
    times = {name: [] for name, _ in runners}
    ratios = {name: [] for name, _ in runners}
    for name, step in runners:
        for _ in range(warmup):
            step()
    for r in range(rounds):
        med = {}
        for name, step in runners:
            ts = [step() for _ in range(iters)]
            times[name].extend(ts)
            med[name] = statistics.median(ts)
        for name in med:
            ratios[name].append(med[name] / med["baseline"])
        print(f"[{device}] round {r + 1}/{rounds}: " + ", ".join(f"{k} {v:.3f}s" for k, v in med.items()), flush=True)
    rows = []
    for name, _ in runners:
        sec = statistics.median(times[name])
        rows.append((name, 1.0 / sec, sec, statistics.median(ratios[name])))
    return rows


def table(rows, device_desc: str) -> str:
    out = [
        f"**{device_desc}**",
        "",
        "| setting | iterations/s | s/iteration | MHE overhead (x baseline) |",
        "| --- | --- | --- | --- |",
    ]
    for name, ips, sec, ratio in rows:
        out.append(f"| {name} | {ips:.3f} | {sec:.3f} | {ratio:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=128, help="default: 128, the recipe's")
    p.add_argument("--iters", type=int, default=4, help="timed iterations per setting per round (CPU)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all settings (CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per setting first (CPU)")
    p.add_argument("--cuda_iters", type=int, default=30, help="timed iterations per setting per round on CUDA")
    p.add_argument("--no_cuda", action="store_true", help="skip the CUDA section even when a GPU is present")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cifar.md"))
    args = p.parse_args(argv)

    cmd = "python bench/cifar_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = [
        "# MHE CIFAR training speed",
        "",
        f"Command: `{cmd.strip()}`. One training step of `sphereface-plus cifar` (augmentation, CNN-9 "
        f"forward/backward, reference loss, MHE on 10 hidden layers + score, SGD) at batch {args.batch_size}, "
        "CIFAR-100 head; median seconds per iteration over interleaved rounds in one process; overhead = "
        "setting / baseline in the same round (median over rounds).",
        "",
        f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}.",
        "",
    ]
    cpu_rows = measure(torch.device("cpu"), args.batch_size, args.iters, args.warmup, args.rounds)
    try:
        load = "1/5/15-min load average %.1f / %.1f / %.1f at the end of the run" % os.getloadavg()
    except OSError:
        load = "load average unknown"
    cpu_desc = (f"CPU: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {load} (on a shared "
                f"machine the absolute numbers are noisy; the ratios, measured round by round, less so)")
    parts.append(table(cpu_rows, cpu_desc))
    if torch.cuda.is_available() and not args.no_cuda:
        dev = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        rows = measure(dev, args.batch_size, args.cuda_iters, 5, 3)
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
