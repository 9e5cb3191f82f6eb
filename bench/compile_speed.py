"""torch.compile for training (docs/performance.md): compile time, steady-state step, break-even iteration count.

    PYTHONPATH=. python bench/compile_speed.py [--precisions bf16] [--rounds 5] [--steps 2] [--batch 16]
        [--threads 2] [--device cpu|cuda] [--backbone sphere20] [--out bench/results/compile_speed.json]

For each precision it builds two trainers (``bench/train_throughput.py``'s ``make_trainer``: sphere20,
A-Softmax m=4 + MHE, SGD), one with ``train.compile=false`` and one with ``train.compile=true``, times the
first step of each (the compiled one includes Dynamo + AOTAutograd + Inductor for forward and backward)
and then the steady-state step in alternating rounds (best round). The break-even is the iteration count
after which the compiled run has caught up:

    N = (first compiled step - first eager step) / (eager step - compiled step)   (infinite when not faster)

:data:`sphereface_plus.engine.compile.BREAK_EVEN` holds the figure per device type, and ``train.compile=auto``
compiles only runs of at least ``SAFETY x N`` iterations. Writes ``bench/results/compile_speed.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import RESULTS, alternate, load_average, machine, ratios, write_json, write_report  # noqa: E402
from bench.train_throughput import make_trainer  # noqa: E402


def first_step(trainer, x, y, sync):
    t0 = time.perf_counter()
    trainer.train_step(x, y)
    sync()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", default="bf16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="steps per round")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS / "compile_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    load0 = load_average()
    rows = []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 112, 96, generator=g).to(args.device)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(args.device)
    for precision in args.precisions.split(","):
        amp = "off" if precision == "fp32" else precision
        cl = precision != "fp32" or cuda
        eager = make_trainer(args.classes, args.device, args.batch, amp, cl, compile_backbone=False)
        t_first_eager = first_step(eager, x, y, sync)
        compiled = make_trainer(args.classes, args.device, args.batch, amp, cl, compile_backbone=True)
        t_first_compiled = first_step(compiled, x, y, sync)
        times = alternate({"eager": lambda: eager.train_step(x, y), "compiled": lambda: compiled.train_step(x, y)},
                          args.rounds, repeat=args.steps, sync=sync)
        r = ratios(times, "eager")
        gain = r["eager"]["best_s"] - r["compiled"]["best_s"]
        extra = t_first_compiled - t_first_eager
        n = extra / gain if gain > 0 else math.inf
        rows.append({"precision": precision, "channels_last": cl, "first_step_eager_s": round(t_first_eager, 2),
                     "first_step_compiled_s": round(t_first_compiled, 2), "compile_s": round(extra, 2),
                     "step_eager_s": r["eager"]["best_s"], "step_compiled_s": r["compiled"]["best_s"],
                     "compiled_vs_eager": r["compiled"]["ratio"],
                     "break_even_iterations": None if math.isinf(n) else round(n)})
        print(rows[-1], flush=True)
    payload = {"bench": "compile_speed", "command": "PYTHONPATH=. python " + " ".join(["bench/compile_speed.py"]
               + sys.argv[1:]), "device": args.device, "batch": args.batch, "threads": args.threads,
               "rounds": args.rounds, "steps_per_round": args.steps, "machine": machine(),
               "load_average_start": load0, "load_average_end": load_average(), "rows": rows,
               "break_even_note": "null = the compiled step was not faster: compiling never pays"}
    out = write_json(Path(args.out).name, payload, Path(args.out).parent)
    lines = ["# torch.compile for training: sphere20 trainer step", "",
             f"Command: `{payload['command']}`; device {args.device}, batch {args.batch}, {args.threads} threads, "
             f"{args.rounds} alternating rounds of {args.steps} steps, best. Load average {load0} at the start, "
             f"{payload['load_average_end']} at the end.", "",
             "| precision | first step eager s | first step compiled s | compile s | step eager ms | "
             "step compiled ms | compiled / eager | break-even iterations |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        be = "never (not faster)" if r["break_even_iterations"] is None else str(r["break_even_iterations"])
        lines.append(f"| {r['precision']}{' channels_last' if r['channels_last'] else ''} | "
                     f"{r['first_step_eager_s']:.1f} | {r['first_step_compiled_s']:.1f} | {r['compile_s']:.1f} | "
                     f"{r['step_eager_s'] * 1e3:.0f} | {r['step_compiled_s'] * 1e3:.0f} | "
                     f"{r['compiled_vs_eager']:.3f}x | {be} |")
    write_report(out.with_suffix(".md"), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
