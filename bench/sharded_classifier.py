"""Per-rank peak memory and step time of the row-sharded head + SphereFace+ MHE (docs/distributed.md).

    python bench/sharded_classifier.py                          # C = 1,000,000, d = 512, worlds 1 2 4
    python bench/sharded_classifier.py --classes 100000 --worlds 1 2

One training step of the classifier alone (no backbone): this rank's embeddings (a leaf tensor, so
their gradient is computed as the backbone would need it), the A-Softmax logits block, the exact
cross-entropy over all C classes, the ``batch_vs_all`` MHE term (power 2, lambda_M = 1), backward, and
an SGD step with momentum 0.9 and weight decay (so the weight, its gradient and its momentum all
exist). The global batch is fixed (``--global-batch``, split over the ranks), so the rows of the table
do the same work. ``replicated`` is the plain single-process head (``create_head`` +
``classifier_mhe`` + the head's own softmax loss): what every rank of a replicated run holds.

Each configuration runs in fresh processes (``torch.multiprocessing`` spawn, gloo on CPU, one torch
thread per rank). Memory: PyTorch keeps no CPU allocator statistics and tracemalloc does not see
tensors, so each rank resets the kernel's resident-set high-water mark (``5`` into
``/proc/self/clear_refs``) after start-up, notes ``VmRSS``, builds the head and the optimiser, runs the
steps and reports ``VmHWM - VmRSS``: everything the head added at its peak (weight, gradient, momentum,
logits and their temporaries). Time: the median over ``--steps`` steps after one warm-up step, wall
clock and the process's CPU time (less sensitive to a shared machine), slowest rank.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status("VmRSS")


def _run(rank: int, world: int, mode: str, args, init_file: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if mode == "sharded" and world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from sphereface_plus.heads import create_head
    from sphereface_plus.mhe import classifier_mhe
    from sphereface_plus.parallel import ShardedClassifier, init_rows, sharded_classifier_mhe

    # the same global batch for every world size; this rank's rows of it
    per_rank = args.global_batch // world
    gen = torch.Generator().manual_seed(0)
    xg = torch.randn(args.global_batch, args.dim, generator=gen)
    yg = torch.randint(0, args.classes, (args.global_batch,), generator=gen)
    x = xg[rank * per_rank:(rank + 1) * per_rank].clone().requires_grad_(True)
    y = yg[rank * per_rank:(rank + 1) * per_rank].clone()

    def build(num_classes):
        if mode == "sharded":
            return ShardedClassifier("a_softmax", args.dim, num_classes, seed=0)
        head = create_head("a_softmax", args.dim, num_classes)
        init_rows(head.weight, 0, num_classes, 0, unit_rows=True)  # the sharded run's initial rows
        return head

    def step_fn(clf, opt, labels):
        if mode == "sharded":
            out = clf(x, labels)
            loss = out.loss + sharded_classifier_mhe(clf.weight, out.labels, clf.num_classes, "2")
        else:
            loss = clf(x, labels).loss + classifier_mhe(clf.weight, labels, "2", check_finite=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        x.grad = None
        return loss.item()

    # warm-up on a small head, so that one-time costs (thread pools, gloo buffers, code paged in) are
    # not counted in the peak
    small = build(64 * world)
    step_fn(small, torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9), y % (64 * world))
    del small
    baseline = _reset_peak()
    clf = build(args.classes)
    opt = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    wall, cpu = [], []
    for step in range(args.steps + 1):
        if mode == "sharded" and world > 1:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step_fn(clf, opt, y)
        if step:  # step 0 is the warm-up
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    res = {"rank": rank, "peak": _status("VmHWM") - baseline, "wall": statistics.median(wall),
           "cpu": statistics.median(cpu), "loss": loss}
    Path(out_dir, f"{mode}_{world}_{rank}.json").write_text(json.dumps(res))
    if mode == "sharded" and world > 1:
        dist.destroy_process_group()


def measure(mode: str, world: int, args):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_run, args=(world, mode, args, os.path.join(tmp, "init"), tmp), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"{mode}_{world}_{r}.json").read_text()) for r in range(world)]
    return {"mode": mode, "world": world, "peak": max(r["peak"] for r in ranks), "wall": max(r["wall"] for r in ranks),
            "cpu": max(r["cpu"] for r in ranks), "loss": ranks[0]["loss"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--global-batch", type=int, default=64, help="samples per step over all ranks (default 64)")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="numbers of processes (default 1 2 4)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step (default 2)")
    p.add_argument("--no-replicated", action="store_true", help="skip the replicated single-process baseline")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "sharded_classifier.md"))
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    t0 = time.time()
    rows = [] if args.no_replicated else [measure("replicated", 1, args)]
    rows += [measure("sharded", w, args) for w in args.worlds]
    load_after = os.getloadavg()[0]
    mib = 1024 ** 2
    base = rows[0]
    weight_mib = args.classes * args.dim * 4 / mib
    lines = [
        f"Row-sharded A-Softmax head + SphereFace+ MHE (`batch_vs_all`, power 2), C = {args.classes:,}, d = {args.dim}, "
        f"global batch {args.global_batch}, float32, one training step with SGD momentum (`python bench/sharded_classifier.py`)",
        "",
        f"| head | processes | rows per rank | peak memory per rank (MiB) | x {base['mode']} | step wall (s) | "
        f"step CPU per rank (s) | x {base['mode']} (CPU) | loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        per = -(-args.classes // r["world"])
        lines.append(f"| {r['mode']} | {r['world']} | {per:,} | {r['peak'] / mib:,.0f} | {r['peak'] / base['peak']:.3f} | "
                     f"{r['wall']:.2f} | {r['cpu']:.2f} | {r['cpu'] / base['cpu']:.3f} | {r['loss']:.4f} |")
    lines += [
        "",
        f"Weight alone: {weight_mib:,.0f} MiB for C x d float32; a replicated run holds weight + gradient + momentum "
        f"({3 * weight_mib:,.0f} MiB) plus the B x C logits on every rank, so {max(args.worlds)} replicated ranks would "
        f"need {max(args.worlds)} x the replicated row above in the same machine.",
        f"Peak memory: growth of each rank's resident-set high-water mark (VmHWM after resetting it, minus VmRSS) "
        f"while building the head and optimiser and running {args.steps + 1} steps; the largest rank. Times: median "
        f"of {args.steps} steps after a warm-up, the slowest rank; one torch thread per rank.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs; load average "
        f"{load_before:.1f} before / {load_after:.1f} after; {os.cpu_count()} cores for up to {max(args.worlds)} "
        f"processes, so wall times above {os.cpu_count()} processes include waiting for a core: the CPU time per rank "
        f"is the figure that scales. Total {time.time() - t0:.0f} s.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    from sphereface_plus.utils import atomic_write_text

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
