"""Training throughput of sphere20 at 112x96: the trainer's step vs a plain eager step, same process.

    .venv/bin/python bench/train_throughput.py [--batch 16] [--classes 1000] [--steps 3] [--rounds 3]

Both sides do the same work per step: sphere20 forward, A-Softmax (m = 4) logits, cross-entropy,
SphereFace+ batch-vs-all MHE (s = 2) on the classifier, backward, SGD with momentum and weight decay.
The baseline is written out here with plain tensor operations (no trainer, no registry, no config);
the trainer side is ``sphereface_plus.trainer.Trainer.train_step`` (NaN guard, scheduler, statistics
included). Inputs are random tensors, so data loading is not part of either number. Variants are
timed in interleaved rounds (median of rounds) so that a busy machine affects them alike.

On CUDA an extra table compares AMP off / bf16 / fp16 through the trainer. Writes
``bench/results/train_throughput.md``.
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
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sphereface_plus.config import load_config  # noqa: E402
from sphereface_plus.engine.dist import DistInfo  # noqa: E402
from sphereface_plus.trainer import Trainer  # noqa: E402
from sphereface_plus.utils import atomic_write_text  # noqa: E402


class _RandomFaces:
    """Only what the Trainer asks of a dataset here: the class count (steps get tensors directly)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.input_size = (112, 96)

    def __len__(self) -> int:
        return self.num_classes


# ------------------------------------------------------------------------------ plain eager baseline
class PlainSphere20(nn.Module):
    """sphere20 written out: 4 stages (stride-2 conv + PReLU, then 1/2/4/1 residual units), fc5."""

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for c, n in zip((64, 128, 256, 512), (1, 2, 4, 1)):
            layers += [nn.Conv2d(c_in, c, 3, 2, 1), nn.PReLU(c, init=0.25)]
            for _ in range(n):
                layers.append(nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.PReLU(c, init=0.25),
                                            nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.PReLU(c, init=0.25)))
            c_in = c
        self.layers = nn.ModuleList(layers)
        self.fc5 = nn.Linear(512 * 7 * 6, 512)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x) if isinstance(layer, nn.Sequential) else layer(x)
        return self.fc5(x.flatten(1))


def plain_step(net, weight, opt, x, y, lam, lambda_m):
    """One SphereFace+ step with plain tensor code (SPEC sections 4 and 5)."""
    emb = net(x)
    w = F.normalize(weight, dim=1)
    norm = emb.norm(dim=1, keepdim=True)
    cos = (emb @ w.t()) / norm.clamp_min(1e-12)
    c = cos.gather(1, y[:, None]).clamp(-1, 1)
    k = torch.floor(torch.acos(c.detach()) * 4 / torch.pi)
    cos4 = 8 * c**4 - 8 * c**2 + 1
    psi = (1 - 2 * (k % 2)) * cos4 - 2 * k
    logits = norm * cos
    target = (lam * norm * c + norm * psi) / (1 + lam)
    logits = logits.scatter(1, y[:, None], target)
    loss = F.cross_entropy(logits, y)
    wh = weight / torch.sqrt((weight**2).sum(1, keepdim=True) + 1e-4)
    cw = wh[y] @ wh.t()
    e = 1.0 / (2 - 2 * cw).clamp_min(1e-12)
    e = e.masked_fill(F.one_hot(y, weight.shape[0]).bool(), 0.0)
    mhe = e.sum() / (y.numel() * (weight.shape[0] - 1))
    (loss + lambda_m * mhe).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def build_plain(num_classes, device):
    torch.manual_seed(0)
    net = PlainSphere20().to(device)
    weight = nn.Parameter(torch.randn(num_classes, 512, device=device) * 0.01)
    decay = [p for n, p in net.named_parameters() if not n.endswith("bias")] + [weight]
    no_decay = [p for n, p in net.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=0.01, momentum=0.9)
    return lambda x, y: plain_step(net, weight, opt, x, y, lam=5.0, lambda_m=1.0)


def build_trainer(num_classes, device, batch, amp="off", channels_last=False):
    cfg = load_config(None, [
        "data.source=synthetic", "model.backbone=sphere20", f"model.channels_last={str(channels_last).lower()}",
        "head.name=a_softmax", "head.base=5", "head.lambda_min=5", "mhe.lambda_m=1.0", "mhe.power=2",
        "optim.lr=0.01", f"train.batch_size={batch}", f"train.amp={amp}", "train.tensorboard=false",
        "out_dir=/tmp/sphereface_plus_bench",
    ])
    trainer = Trainer(cfg, _RandomFaces(num_classes), DistInfo(device=torch.device(device)))
    return lambda x, y: trainer.train_step(x, y)["loss"]


def time_steps(step, x, y, steps, device):
    step(x, y)  # warm-up (allocator, oneDNN primitive cache)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(x, y)
    float(loss)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return x.shape[0] * steps / (time.perf_counter() - t0)


def run_table(variants, batch, classes, steps, rounds, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 112, 96, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    steps_fns = {name: build() for name, build in variants.items()}
    results = {name: [] for name in variants}
    for r in range(rounds):
        for name, fn in steps_fns.items():
            results[name].append(time_steps(fn, x, y, steps, device))
            print(f"round {r + 1}/{rounds} {name}: {results[name][-1]:.2f} images/s", flush=True)
    return {name: statistics.median(v) for name, v in results.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gpu-batch", type=int, default=256)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "train_throughput.md"))
    args = ap.parse_args()

    cpu = run_table({
        "plain eager step": lambda: build_plain(args.classes, "cpu"),
        "trainer step": lambda: build_trainer(args.classes, "cpu", args.batch),
        "trainer step, channels_last": lambda: build_trainer(args.classes, "cpu", args.batch, channels_last=True),
    }, args.batch, args.classes, args.steps, args.rounds, "cpu")
    base = cpu["plain eager step"]
    lines = [
        "# Training throughput: sphere20, 112x96, A-Softmax m=4 + MHE (batch_vs_all, s=2)",
        "",
        f"Command: `.venv/bin/python bench/train_throughput.py --batch {args.batch} --classes {args.classes} "
        f"--steps {args.steps} --rounds {args.rounds}`",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; median of {args.rounds} interleaved rounds of {args.steps} steps; "
        f"1-minute load average at the end: {os.getloadavg()[0]:.1f} (other jobs sharing the cores make "
        "absolute numbers noisy, the interleaved ratio less so).",
        "",
        f"## CPU, batch {args.batch}, {args.classes} classes",
        "",
        "| variant | images/s | vs plain eager |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {v:.2f} | {v / base:.2f}x |" for name, v in cpu.items()]
    if torch.cuda.is_available():
        dev = "cuda:0"
        gpu = run_table({
            "plain eager step (fp32)": lambda: build_plain(args.classes, dev),
            "trainer, amp off": lambda: build_trainer(args.classes, dev, args.gpu_batch, "off"),
            "trainer, amp bf16": lambda: build_trainer(args.classes, dev, args.gpu_batch, "bf16"),
            "trainer, amp fp16 + GradScaler": lambda: build_trainer(args.classes, dev, args.gpu_batch, "fp16"),
            "trainer, amp bf16, channels_last": lambda: build_trainer(args.classes, dev, args.gpu_batch, "bf16", True),
        }, args.gpu_batch, args.classes, max(args.steps, 10), args.rounds, dev)
        gbase = gpu["plain eager step (fp32)"]
        lines += ["", f"## {torch.cuda.get_device_name(0)}, batch {args.gpu_batch}", "",
                  "| variant | images/s | vs plain eager |", "| --- | --- | --- |"]
        lines += [f"| {name} | {v:.1f} | {v / gbase:.2f}x |" for name, v in gpu.items()]
    else:
        lines += ["", "No CUDA device here: the AMP on/off table runs only on a GPU."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
