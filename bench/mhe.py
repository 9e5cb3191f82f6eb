"""Benchmark of ``classifier_mhe`` against a dense full-space MHE baseline (docs/theory.md#classifier-mhe-modes).

    python bench/mhe.py                      # C = 10,572, d = 512, B = 512, plus `full` at C = 100,000
    python bench/mhe.py --big-classes 0      # skip the C = 100,000 case (it takes minutes on 2 cores)

For each case the forward + backward pass of the energy is timed and its peak extra memory measured:

- the dense baseline is written here, independently of the library: normalise the rows, the full C x C
  Gram matrix, the kernel, the mean over pairs, plain autograd;
- ``batch_vs_all``, ``batch_unique`` and ``full`` are ``sphereface_plus.classifier_mhe``.

How memory is measured (CPU): PyTorch keeps no allocator statistics for CPU tensors, and tracemalloc
does not see them, so every case runs in a fresh subprocess that reads the kernel's own accounting of
the process: after building the weights it resets the resident-set high-water mark (writing ``5`` to
``/proc/self/clear_refs``), notes ``VmRSS``, runs one forward + backward, and reports ``VmHWM - VmRSS``:
the peak of resident memory added by that pass (tensors, autograd buffers, matmul workspaces, and the
weight gradient). A small warm-up pass (C = 256) runs before, so that one-time costs (thread pools,
code paged in) are not counted. Times are wall clock and, beside it, the CPU time of the process
(``process_time``, all threads), which is less sensitive to other jobs on a shared machine: the median
of ``--repeats`` passes after the memory-measured one, except for the C = 100,000 case (one pass).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("dense", "batch_vs_all", "batch_unique", "full")


# ---------------------------------------------------------------- the dense baseline (independent code)
def dense_energy(weight, power: str):
    import math

    import torch

    n = weight.shape[0]
    w_hat = weight * torch.rsqrt((weight * weight).sum(dim=1, keepdim=True) + 1e-4)
    cos = w_hat @ w_hat.t()  # C x C
    eye = torch.eye(n, dtype=torch.bool)
    cos = cos.masked_fill(eye, 0.0)
    if power in ("0", "1", "2"):
        d = (2.0 - 2.0 * cos).clamp(min=1e-6)
        e = {"0": lambda: -torch.log(d), "1": lambda: d.pow(-0.5), "2": lambda: d.pow(-1.0)}[power]()
    else:
        t = torch.acos(cos.clamp(-1 + 1e-5, 1 - 1e-5)) / math.pi + 1e-4
        e = {"a0": lambda: -torch.log(t), "a1": lambda: t.pow(-1.0), "a2": lambda: t.pow(-2.0)}[power]()
    return e.masked_fill(eye, 0.0).sum() / (n * (n - 1))


# ---------------------------------------------------------------- one measurement (in a subprocess)
def _proc_status() -> dict:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def worker(mode: str, classes: int, dim: int, batch: int, power: str, repeats: int, block_size) -> dict:
    import gc

    import torch

    from sphereface_plus import classifier_mhe

    gen = torch.Generator().manual_seed(0)

    def make_step(c: int):
        weight = torch.randn(c, dim, generator=gen).requires_grad_(True)
        labels = torch.randint(0, c, (batch,), generator=gen)

        def step():
            weight.grad = None
            if mode == "dense":
                loss = dense_energy(weight, power)
            else:
                loss = classifier_mhe(weight, labels, power=power, mode=mode, block_size=block_size)
            loss.backward()
            return loss.detach()

        return step

    # a small warm-up pass first, so that one-time costs (thread pools, code paged in, kernel selection)
    # count neither in the time nor in the memory of the measured pass
    make_step(256)()
    step = make_step(classes)
    gc.collect()
    reset = _reset_peak()
    before = _proc_status()
    t0, c0 = time.perf_counter(), time.process_time()
    value = step()
    cold, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
    after = _proc_status()
    base = before["VmRSS"] if reset else before["VmHWM"]
    times, cpu_times = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return {
        "mode": mode,
        "classes": classes,
        "time_s": statistics.median(times) if times else cold,
        "cpu_s": statistics.median(cpu_times) if cpu_times else cold_cpu,
        "first_pass_s": cold,
        "timed_passes": len(times) or 1,
        "peak_extra_bytes": max(0, after["VmHWM"] - base),
        "peak_reset": reset,
        "value": float(value),
        "threads": torch.get_num_threads(),
    }


def run_case(args, mode: str, classes: int, repeats: int) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", mode, "--classes", str(classes), "--dim", str(args.dim),
        "--batch", str(args.batch), "--power", args.power, "--repeats", str(repeats),
    ]
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    if proc.returncode != 0:
        raise SystemExit(f"benchmark case {mode} at C={classes} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=10572)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--power", default="2", choices=["0", "1", "2", "a0", "a1", "a2"])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after the measured one (median)")
    parser.add_argument("--big-classes", type=int, default=100000, help="C of the extra `full` case (0: skip)")
    parser.add_argument("--block-size", type=int, default=None, help="row block of `full` (default: automatic)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "mhe.md"))
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.classes, args.dim, args.batch, args.power, args.repeats,
                                args.block_size)))
        return 0

    from sphereface_plus.utils import atomic_write_text, progress

    load_before = os.getloadavg()
    cases = [(m, args.classes, args.repeats) for m in MODES]
    if args.big_classes:
        cases.append(("full", args.big_classes, 0))
    results = []
    started = time.time()
    for mode, classes, repeats in progress(cases, desc="mhe bench", unit="case"):
        results.append(run_case(args, mode, classes, repeats))
        r = results[-1]
        print(f"{mode:>13} C={classes:>7}: {r['time_s']:.3f} s, peak extra {_mib(r['peak_extra_bytes'])} MiB",
              file=sys.stderr)
    load_after = os.getloadavg()
    dense = results[0]

    lines = [
        f"MHE on classifier weights, power s={args.power}, d={args.dim}, B={args.batch}: forward + backward "
        f"(`python bench/mhe.py`)",
        "",
        "| case | C | wall time (s) | x dense | CPU time (s) | x dense | peak extra memory (MiB) | x dense | energy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        name = "dense baseline (C x C Gram, autograd)" if r["mode"] == "dense" else f"classifier_mhe `{r['mode']}`"
        same = r["classes"] == dense["classes"]
        if same:
            times = (
                f"{r['time_s']:.3f} | {r['time_s'] / dense['time_s']:.3f} | "
                f"{r['cpu_s']:.3f} | {r['cpu_s'] / dense['cpu_s']:.3f}"
            )
        else:
            times = f"{r['time_s']:.1f} (one pass) | - | {r['cpu_s']:.1f} | -"
        lines.append(
            f"| {name} | {r['classes']:,} | {times} | {_mib(r['peak_extra_bytes'])} | "
            f"{r['peak_extra_bytes'] / dense['peak_extra_bytes']:.3f} | {r['value']:.6f} |"
        )
    full = next(r for r in results if r["mode"] == "full" and r["classes"] == dense["classes"])
    bva = next(r for r in results if r["mode"] == "batch_vs_all")
    checks = [
        ("batch_vs_all wall time <= 0.1x dense", bva["time_s"] / dense["time_s"] <= 0.1),
        ("batch_vs_all CPU time <= 0.1x dense", bva["cpu_s"] / dense["cpu_s"] <= 0.1),
        ("full wall time <= 1.5x dense", full["time_s"] / dense["time_s"] <= 1.5),
        ("full CPU time <= 1.5x dense", full["cpu_s"] / dense["cpu_s"] <= 1.5),
        ("full peak extra memory <= 0.1x dense", full["peak_extra_bytes"] / dense["peak_extra_bytes"] <= 0.1),
        ("full energy == dense energy (rel 1e-5)", abs(full["value"] - dense["value"]) <= 1e-5 * abs(dense["value"])),
    ]
    lines += [""] + [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]
    lines += [
        "",
        f"Times: median of {args.repeats} passes after the memory-measured one ({dense['threads']} torch "
        f"threads); the C = {args.big_classes:,} case is a single pass (after a small warm-up). Peak extra memory: growth of the process's "
        f"resident-set high-water mark during one pass, each case in a fresh process"
        f"{'' if all(r['peak_reset'] for r in results) else ' (peak reset unavailable: relative to the set-up peak)'}.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {__import__('torch').__version__}; load "
        f"average {load_before[0]:.1f} before / {load_after[0]:.1f} after. The CPU may be shared with other jobs: wall "
        f"times then depend on the load, so the CPU time of the process (all its threads) is shown beside them. "
        f"Total {time.time() - started:.0f} s.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    atomic_write_text(args.out, table)
    print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
