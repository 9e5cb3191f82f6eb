"""Shared timing helpers of the speed benches: alternating rounds, best-of, load, JSON results.

Every figure is a ratio against a baseline timed in the same process, in alternating rounds (each
variant once per round, in turn), and the best round of each is kept: on a machine shared with other
jobs the best round is the one least disturbed, and alternating spreads the disturbance over all
variants alike. The 1/5/15-minute load average is recorded before and after.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def load_average() -> List[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return []


def machine() -> Dict[str, object]:
    info: Dict[str, object] = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                               "cores": os.cpu_count(), "torch": torch.__version__,
                               "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_name() -> str:
    """The CPU a figure ran on: lscpu's model name with the family / model numbers and the vector extensions that matter here."""
    name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    ext = [label for flag, label in (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"),
                                     ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16")) if flag in flags]
    return (f"{name} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}; "
            f"{', '.join(ext) or 'no AVX2'})")


def cpuinfo() -> Dict[str, str]:
    info: Dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def alternate(variants: Dict[str, Callable[[], object]], rounds: int, repeat: int = 1,
              sync: Optional[Callable[[], None]] = None, log: bool = True,
              settle: int = 0, clock: Callable[[], float] = time.perf_counter) -> Dict[str, List[float]]:
    """Seconds per call of each variant, ``rounds`` alternating rounds of ``repeat`` calls each.

    ``clock``: ``time.perf_counter`` (wall clock) or ``time.thread_time`` (the calling thread's CPU time:
    with one torch thread, the whole computation, not inflated by other processes on a shared machine).

    Each variant is called once before the rounds (warm-up: allocator, oneDNN primitives, compilation), and
    ``settle`` more times, untimed, at the start of each of its turns: the allocator's state left by the
    previous variant (a different set of tensor sizes) is then not charged to the first timed call.
    """
    for fn in variants.values():
        fn()
    if sync:
        sync()
    times: Dict[str, List[float]] = {k: [] for k in variants}
    for r in range(rounds):
        for name, fn in variants.items():
            for _ in range(settle):
                fn()
            if sync and settle:
                sync()
            t0 = clock()
            for _ in range(repeat):
                fn()
            if sync:
                sync()
            times[name].append((clock() - t0) / repeat)
            if log:
                print(f"  round {r + 1}/{rounds} {name}: {times[name][-1] * 1e3:.1f} ms", flush=True)
    return times


def ratios(times: Dict[str, List[float]], baseline: str) -> Dict[str, Dict[str, float]]:
    """``{variant: {best_s, median_s, ratio}}``, ratio = best time / the baseline's best time (> 1: slower)."""
    base = min(times[baseline])
    out = {}
    for k, v in times.items():
        s = sorted(v)
        out[k] = {"best_s": round(s[0], 6), "median_s": round(s[len(s) // 2], 6), "ratio": round(s[0] / base, 4),
                  "rounds": len(v)}
    return out


def write_json(name: str, payload: Dict[str, object], out_dir: Optional[Path] = None) -> Path:
    from sphereface_plus.utils import atomic_write_text

    path = Path(out_dir or RESULTS) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=False) + "\n")
    return path


def write_report(path: Path, lines: List[str]) -> Path:
    """The Markdown report ``lines`` written atomically to ``path`` (folders made) and printed."""
    from sphereface_plus.utils import atomic_write_text

    text = "\n".join(lines) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    print(text)
    return path
