"""Embedding throughput of sphere20 at 112x96: float32 eager vs bf16 vs bf16 + channels_last (+ compile).

    .venv/bin/python bench/embed_throughput.py [--batch 32] [--batches 2] [--rounds 5] [--threads 2]
        [--device cpu] [--no-compile]

Every variant embeds the same random batch the way ``verify`` does: the crop and its mirror
(``eval.features.embed_batch``), under ``torch.inference_mode``, features returned float32. The
baseline is ``embed_batch`` in float32 with the default memory format. "images/s" counts input
images, each one embedded twice (crop + mirror). Also timed: the flip as two forwards (crop, then
mirror) against the one forward of the doubled batch, in float32 and in bf16 + channels_last.

Variants are timed in interleaved rounds (every variant once per round), so that other jobs on the
machine slow all of them alike; the table gives the best and the median round. The same script runs
unchanged on CUDA (``--device cuda``): there AMP bf16 against float32, and the MFU (model FLOPs per
second over the GPU's dense bf16/fp32 peak given with ``--peak-tflops``). Writes
``bench/results/embed_throughput.md`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eval.features import embed_batch  # noqa: E402
from sphereface_plus.engine.precision import bf16_support  # noqa: E402
from sphereface_plus.models import create_backbone  # noqa: E402
from sphereface_plus.utils import atomic_write_text  # noqa: E402


def model_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs of ``model`` on ``x`` (2 per multiply-add), counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return float(counter.get_total_flops())


def two_forwards(model, x, precision, channels_last):
    """The flip as two forwards (crop, then mirror): what the batched flip is measured against."""
    a = embed_batch(model, x, flip=False, precision=precision, channels_last=channels_last)
    b = embed_batch(model, torch.flip(x, dims=[3]), flip=False, precision=precision, channels_last=channels_last)
    return torch.cat([a, b], dim=1)


def build_variants(device: str, want_compile: bool) -> Dict[str, Callable]:
    torch.manual_seed(0)
    plain = create_backbone("sphere20", input_size=(112, 96)).to(device).eval()
    nhwc = create_backbone("sphere20", input_size=(112, 96)).to(device).eval()
    nhwc.load_state_dict(plain.state_dict())
    nhwc.to(memory_format=torch.channels_last)
    reduced = "bf16"
    variants = {
        "fp32 eager (baseline)": lambda x: embed_batch(plain, x, True, "fp32", False),
        "fp32, flip as two forwards": lambda x: two_forwards(plain, x, "fp32", False),
        "fp32 + channels_last": lambda x: embed_batch(nhwc, x, True, "fp32", True),
        f"{reduced}": lambda x: embed_batch(plain, x, True, reduced, False),
        f"{reduced} + channels_last": lambda x: embed_batch(nhwc, x, True, reduced, True),
        f"{reduced} + channels_last, flip as two forwards": lambda x: two_forwards(nhwc, x, reduced, True),
    }
    if want_compile:
        compiled = torch.compile(nhwc)
        variants[f"{reduced} + channels_last + torch.compile"] = lambda x: embed_batch(compiled, x, True, reduced, True)
    return variants


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variant(fn, x, batches: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        out = fn(x)
    sync(device)
    elapsed = time.perf_counter() - t0
    assert out.dtype == torch.float32
    return x.shape[0] * batches / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="images per batch (each embedded with its mirror)")
    ap.add_argument("--batches", type=int, default=2, help="timed batches per round and variant")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="CUDA: dense bf16 peak of the GPU in TFLOP/s for the MFU column (e.g. 989 for H100/H200)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "embed_throughput.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    if device.startswith("cuda") and args.batch < 128:
        args.batch = 256  # a CPU-sized batch leaves a GPU idle

    with torch.inference_mode():
        x = torch.randn(args.batch, 3, 112, 96, generator=torch.Generator().manual_seed(0)).to(device)
        variants = build_variants(device, not args.no_compile)
        notes: List[str] = []
        results: Dict[str, List[float]] = {name: [] for name in variants}
        for name, fn in list(variants.items()):  # warm-up: oneDNN primitive cache, compilation
            t0 = time.perf_counter()
            try:
                fn(x)
                fn(x)
            except Exception as e:  # torch.compile needs a working C++ toolchain; report, do not fail
                notes.append(f"`{name}` failed and was left out: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                del variants[name], results[name]
                continue
            if "compile" in name:
                notes.append(f"`{name}`: first two calls (compilation) took {time.perf_counter() - t0:.1f} s")
        for r in range(args.rounds):
            for name, fn in variants.items():
                results[name].append(time_variant(fn, x, args.batches, device))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in results.items()),
                  flush=True)
        ref = variants["fp32 eager (baseline)"](x)
        for name in ("bf16 + channels_last", "fp32 + channels_last"):
            cos = torch.nn.functional.cosine_similarity(variants[name](x).view(-1, 512), ref.view(-1, 512))
            notes.append(f"`{name}` vs float32 eager: per-embedding cosine min {cos.min().item():.6f}, "
                         f"mean {cos.mean().item():.6f} (random weights, random inputs)")
        flops = 2 * model_flops(create_backbone("sphere20", input_size=(112, 96)).to(device).eval(), x[:1])

    base = statistics.median(results["fp32 eager (baseline)"])
    load = os.getloadavg()
    support = bf16_support(device)
    is_cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name(torch.device(device)) if is_cuda else (platform.processor() or platform.machine())
    lines = [
        "# Embedding throughput: sphere20, 112x96, crop + mirror, inference",
        "",
        f"Command: `.venv/bin/python bench/embed_throughput.py --batch {args.batch} --batches {args.batches} "
        f"--rounds {args.rounds} --threads {args.threads} --device {device}`",
        "",
        f"Machine: {name}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, bf16 support: "
        f"{support}; {args.rounds} interleaved rounds of {args.batches} batches of {args.batch} images (each image "
        f"embedded with its mirror, one forward of {2 * args.batch}). Load average (1, 5, 15 min) at the end: "
        f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} (other jobs share the cores; the ratios, measured "
        "interleaved, move less than the absolute numbers).",
        "",
        f"{flops / 1e9:.2f} GFLOP per image (crop + mirror, torch.utils.flop_counter).",
        "",
        "| variant | images/s (median) | images/s (best) | vs fp32 eager (median) |"
        + (" MFU |" if is_cuda and args.peak_tflops else ""),
        "| --- | --- | --- | --- |" + (" --- |" if is_cuda and args.peak_tflops else ""),
    ]
    for vname, v in results.items():
        med = statistics.median(v)
        row = f"| {vname} | {med:.1f} | {max(v):.1f} | {med / base:.2f}x |"
        if is_cuda and args.peak_tflops:
            row += f" {100 * med * flops / (args.peak_tflops * 1e12):.1f} % |"
        lines.append(row)
    lines += [""] + [f"- {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
