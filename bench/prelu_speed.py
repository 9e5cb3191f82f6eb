"""PReLU at ReLU's cost (docs/performance.md): the sphere20 training step with the toolkit's PReLU, torch's nn.PReLU, ReLU.

    PYTHONPATH=. python bench/prelu_speed.py [--rounds 7] [--batch 16] [--threads 2]
        [--precisions fp32,bf16] [--formats channels_last,contiguous] [--ops]

One process builds the same sphere20 (112x96) three times, differing only in the activation:
``relu`` (nn.ReLU: the baseline, what OpenSphere's SFNet-20 uses), ``nn.PReLU`` (torch's module) and
``toolkit PReLU`` (:class:`sphereface_plus.models.layers.PReLU`, its CPU default), and times a
training step (forward under autocast when bf16, a float32 loss, backward, SGD with momentum) of each in
alternating rounds; the ratio is best round / the ReLU net's best round. The peer's network, ``sfnet20``
(OpenSphere's SFNet-20 as the toolkit rebuilds it), runs in the same rounds for a second ratio. ``--ops``
adds the activation's own backward at the four stage shapes (1 thread, ``time.thread_time``: CPU seconds
of this thread only, so other jobs on the machine barely move it), also in bf16 where the CPU has no bf16
convolutions (the activation's element-wise kernels do not need oneDNN).

Writes ``bench/results/prelu_speed.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import RESULTS, alternate, load_average, machine, ratios, write_json, write_report  # noqa: E402
from sphereface_plus.models import create_backbone  # noqa: E402
from sphereface_plus.models.layers import PReLU, prelu_backward  # noqa: E402

ACTIVATIONS = ("relu", "nn.PReLU", "toolkit PReLU")
PEER = "sfnet20"


def build_net(activation: str, memory_format) -> nn.Module:
    torch.manual_seed(0)
    net = create_backbone("sphere20", input_size=(112, 96))
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.PReLU):
                if activation == "relu":
                    new = nn.ReLU()
                elif activation == "nn.PReLU":
                    new = nn.PReLU(child.num_parameters, init=0.25)
                else:
                    new = PReLU(child.num_parameters, init=0.25)
                setattr(module, name, new)
    return net.to(memory_format=memory_format)


def make_step(net: nn.Module, x: torch.Tensor, precision: str):
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            out = net(x)
        loss = out.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def saved_megabytes(net: nn.Module, x: torch.Tensor) -> float:
    """MB of distinct storages autograd keeps from one forward for the backward (activations and weights)."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    return round(sum(storages.values()) / 2 ** 20, 1)


def op_table(precision: str, memory_format, reps: int = 20):
    """CPU seconds (this thread) of each activation's backward at the sphere20 stage shapes, batch 16."""
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    rows = []
    for shape in [(16, 64, 56, 48), (16, 128, 28, 24), (16, 256, 14, 12), (16, 512, 7, 6)]:
        x = torch.randn(shape, dtype=dt).contiguous(memory_format=memory_format)
        g = torch.randn(shape, dtype=dt).contiguous(memory_format=memory_format)
        w = torch.full((shape[1],), 0.25)
        y = torch.nn.functional.prelu(x, w.to(dt))  # what the toolkit keeps for its backward (slopes > 0)
        fns = {"relu": lambda: torch.ops.aten.threshold_backward(g, x, 0),
               "nn.PReLU": lambda: torch.ops.aten._prelu_kernel_backward(g, x, w.view(1, -1, 1, 1).to(dt)),
               "toolkit PReLU": lambda: prelu_backward(g, y, w, from_output=True)}
        best = {}
        with torch.no_grad():  # as inside autograd's backward (no double-backward graph recorded)
            for name, fn in fns.items():
                fn()
                b = float("inf")
                for _ in range(5):
                    t0 = time.thread_time()
                    for _ in range(reps):
                        fn()
                    b = min(b, (time.thread_time() - t0) / reps)
                best[name] = b
        rows.append({"shape": list(shape), **{k: round(v * 1e3, 4) for k, v in best.items()},
                     "nn.PReLU / relu": round(best["nn.PReLU"] / best["relu"], 2),
                     "toolkit / relu": round(best["toolkit PReLU"] / best["relu"], 2)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--formats", default="channels_last,contiguous")
    ap.add_argument("--settle", type=int, default=1,
                    help="untimed steps at the start of each variant's turn in a round (allocator state)")
    ap.add_argument("--compile", action="store_true", help="add the ReLU and PReLU nets compiled (Module.compile)")
    ap.add_argument("--ops", action="store_true", help="also time the activation backward alone (1 thread)")
    ap.add_argument("--out", default=str(RESULTS / "prelu_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = load_average()
    t_start = time.time()
    results = []
    from sphereface_plus.engine.precision import bf16_support

    notes = []
    precisions = args.precisions.split(",")
    op_precisions = list(precisions)
    if "bf16" in precisions and bf16_support("cpu") == "none":
        precisions.remove("bf16")
        notes.append("bf16 left out: this CPU has no bf16 in oneDNN (bf16_support: none), convolutions would run "
                     "in the slow reference kernel and the trainer's train.precision=bf16 falls back to fp32 here "
                     "(the --ops table still times the activation backward in bf16)")
    for precision in precisions:
        for fmt in args.formats.split(","):
            mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            x = torch.randn(args.batch, 3, 112, 96, generator=torch.Generator().manual_seed(0)).contiguous(
                memory_format=mf)
            nets = {a: build_net(a, mf) for a in ACTIVATIONS}
            torch.manual_seed(0)  # the peer's network: OpenSphere's SFNet-20 (ReLU in place, biases, no BN)
            nets[PEER] = create_backbone("sfnet20", input_size=(112, 96)).to(memory_format=mf)
            saved = {a: saved_megabytes(net, x) for a, net in nets.items()}
            steps = {a: make_step(net, x, precision) for a, net in nets.items()}
            if args.compile:  # what train.compile does: Module.compile of the backbone, in place
                for a in ("relu", "nn.PReLU"):
                    net = build_net(a, mf)
                    net.compile()
                    steps[f"{a} + torch.compile"] = make_step(net, x, precision)
            print(f"{precision} {fmt}", flush=True)
            times = alternate(steps, args.rounds, settle=args.settle)
            results.append({"precision": precision, "memory_format": fmt, "baseline": "relu",
                            "variants": ratios(times, "relu"), "saved_for_backward_mb": saved})
    ops = []
    if args.ops:
        torch.set_num_threads(1)
        for precision in op_precisions:
            for fmt in args.formats.split(","):
                mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
                ops.append({"precision": precision, "memory_format": fmt, "rows": op_table(precision, mf)})
        torch.set_num_threads(args.threads)
    payload = {"bench": "prelu_speed", "what": "sphere20 112x96 training step (forward, float32 loss, backward, "
               "SGD momentum), activation swapped; ratio = best round / ReLU net's best round",
               "command": "PYTHONPATH=. python " + " ".join(["bench/prelu_speed.py"] + sys.argv[1:]),
               "batch": args.batch, "threads": args.threads, "rounds": args.rounds, "settle": args.settle,
               "machine": machine(),
               "load_average_start": load0, "load_average_end": load_average(),
               "wall_s": round(time.time() - t_start, 1), "steps": results, "backward_ops_ms": ops, "notes": notes,
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "bf16_support": bf16_support("cpu")}
    out = write_json(Path(args.out).name, payload, Path(args.out).parent)
    lines = ["# PReLU at ReLU's cost: sphere20 training step", "",
             f"Command: `{payload['command']}`; batch {args.batch}, {args.threads} threads, {args.rounds} "
             f"alternating rounds ({args.settle} untimed step before each timed one), best round. Load average "
             f"(1/5/15 min) {load0} at the start, {payload['load_average_end']} at the end (2-core machine shared "
             "with other jobs).", "",
             "| precision | memory format | ReLU ms | nn.PReLU ms | toolkit PReLU ms | nn.PReLU / ReLU | "
             "toolkit PReLU / ReLU | median rounds: nn.PReLU / ReLU, toolkit / ReLU | saved for backward MB: "
             "ReLU, nn.PReLU, toolkit |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        v, mb = r["variants"], r["saved_for_backward_mb"]
        med = [v[a]["median_s"] / v["relu"]["median_s"] for a in ("nn.PReLU", "toolkit PReLU")]
        lines.append(f"| {r['precision']} | {r['memory_format']} | {v['relu']['best_s'] * 1e3:.0f} | "
                     f"{v['nn.PReLU']['best_s'] * 1e3:.0f} | {v['toolkit PReLU']['best_s'] * 1e3:.0f} | "
                     f"{v['nn.PReLU']['ratio']:.3f}x | {v['toolkit PReLU']['ratio']:.3f}x | "
                     f"{med[0]:.3f}x, {med[1]:.3f}x | {mb['relu']}, {mb['nn.PReLU']}, {mb['toolkit PReLU']} |")
    lines += ["", "Against the peer's network (`sfnet20`: the toolkit's rebuild of OpenSphere's SFNet-20, the same 20 "
              "convolutions with ReLU in place and a bias in every convolution), same input, same rounds:", ""]
    for r in results:
        v = r["variants"]
        lines.append(f"- {r['precision']} {r['memory_format']}: sfnet20 {v[PEER]['best_s'] * 1e3:.0f} ms; toolkit "
                     f"sphere20 (PReLU) {v['toolkit PReLU']['best_s'] / v[PEER]['best_s']:.3f}x, with nn.PReLU "
                     f"{v['nn.PReLU']['best_s'] / v[PEER]['best_s']:.3f}x, with ReLU "
                     f"{v['relu']['best_s'] / v[PEER]['best_s']:.3f}x the sfnet20 step")
    for r in results:
        for name, v in r["variants"].items():
            if "compile" in name:
                lines.append(f"\n{r['precision']} {r['memory_format']}: {name} {v['best_s'] * 1e3:.0f} ms, "
                             f"{v['ratio']:.3f}x the eager ReLU net")
    for block in ops:
        lines += ["", f"Activation backward alone, {block['precision']} {block['memory_format']}, 1 thread, "
                  "CPU ms (thread time):", "", "| shape | ReLU | nn.PReLU | toolkit PReLU | nn.PReLU / ReLU | "
                  "toolkit / ReLU |", "| --- | --- | --- | --- | --- | --- |"]
        for row in block["rows"]:
            lines.append(f"| {'x'.join(map(str, row['shape']))} | {row['relu']:.2f} | {row['nn.PReLU']:.2f} | "
                         f"{row['toolkit PReLU']:.2f} | {row['nn.PReLU / relu']}x | {row['toolkit / relu']}x |")
    lines += ["", f"CPU capability {payload['cpu_capability']}, bf16 support {payload['bf16_support']}."]
    lines += [f"- {n}" for n in notes]
    write_report(out.with_suffix(".md"), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
