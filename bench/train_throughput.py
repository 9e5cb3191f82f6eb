"""Training throughput of sphere20 at 112x96: the trainer's step vs a plain eager step, same process.

    .venv/bin/python bench/train_throughput.py [--batch 16] [--classes 1000] [--steps 3] [--rounds 3]
        [--threads 2] [--device cpu|cuda] [--no-compile] [--peak-tflops T]

Both sides do the same work per step: sphere20 forward, A-Softmax (m = 4) logits, cross-entropy,
SphereFace+ batch-vs-all MHE (s = 2) on the classifier, backward, SGD with momentum and weight decay.
The baseline is written out here with plain tensor operations (no trainer, no registry, no config);
the trainer side is ``sphereface_plus.face.trainer.FaceTrainer.train_step`` (NaN guard, scheduler, statistics
included). Inputs are random tensors, so data loading is not part of either number. Variants are
timed in interleaved rounds (median of rounds) so that a busy machine affects them alike.

Precision variants: float32 eager vs bf16 vs bf16 + channels_last (+ ``torch.compile`` of
the backbone), all on the trainer's model and optimiser. bf16 goes through the trainer's own step
(``Trainer.train_step`` with ``train.precision=bf16``: the backbone under autocast, head, loss and MHE in
float32); the compile rows set ``train.compile=true`` (``Module.compile`` of the backbone, in place).
``--no-compile`` leaves those rows out.

On CUDA (``--device cuda``) the same table runs with AMP, plus fp16 + GradScaler through the trainer,
and an MFU column (``--peak-tflops``: the GPU's dense bf16 peak). Writes
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

from sphereface_plus.face.config import load_config  # noqa: E402
from sphereface_plus.engine.dist import DistInfo  # noqa: E402
from sphereface_plus.engine.precision import bf16_support  # noqa: E402
from sphereface_plus.face.trainer import FaceTrainer  # noqa: E402
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
    """One SphereFace+ step with plain tensor code (docs/theory.md#a-softmax and docs/theory.md#sphereface-plus)."""
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


def make_trainer(num_classes, device, batch, amp="off", channels_last=False, compile_backbone=False):
    cfg = load_config(None, [f"train.compile={str(compile_backbone).lower()}",
        "data.source=synthetic", "model.backbone=sphere20", f"model.channels_last={str(channels_last).lower()}",
        "head.name=a_softmax", "head.base=5", "head.lambda_min=5", "mhe.lambda_m=1.0", "mhe.power=2",
        "optim.lr=0.01", f"train.batch_size={batch}", f"train.precision={amp}", "train.tensorboard=false",
        f"train.device={device}", "out_dir=/tmp/sphereface_plus_bench",
    ])
    return FaceTrainer.from_config(cfg, _RandomFaces(num_classes), DistInfo(device=torch.device(device)))


def build_trainer(num_classes, device, batch, amp="off", channels_last=False):
    trainer = make_trainer(num_classes, device, batch, amp, channels_last)
    return lambda x, y: trainer.train_step(x, y)["loss"]


def build_precision(num_classes, device, batch, channels_last=False, compile_backbone=False, how=None):
    """A bf16 step: the trainer's own ``train_step`` with ``train.precision=bf16`` (and ``train.compile``).
    ``how`` (a list) receives what was timed."""
    trainer = make_trainer(num_classes, device, batch, "bf16", channels_last, compile_backbone)
    if trainer.precision != "bf16":
        raise SystemExit(f"bf16 does not run on {device} here (train.precision=bf16 resolved to {trainer.precision})")
    if how is not None:
        how.append("the trainer's own train_step with train.precision=bf16 (backbone under autocast; head, CE and MHE "
                   "float32)" + ("; torch.compile rows: train.compile=true" if compile_backbone else ""))
    return lambda x, y: trainer.train_step(x, y)["loss"]


def build_fp32_compiled(num_classes, device, batch):
    trainer = make_trainer(num_classes, device, batch, "off", True, compile_backbone=True)
    return lambda x, y: trainer.train_step(x, y)["loss"]


def step_flops(batch, classes, device) -> float:
    """FLOPs of one float32 training step per image (forward + backward), by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    step = build_plain(classes, device)
    x = torch.randn(batch, 3, 112, 96, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        step(x, y)
    return counter.get_total_flops() / batch


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


def run_table(variants, batch, classes, steps, rounds, device, notes=None):
    """Interleaved rounds of every variant; ``{name: [images/s per round]}`` (a variant whose build or
    warm-up fails, e.g. torch.compile without a toolchain, is left out with a note)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 112, 96, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    steps_fns = {}
    for name, build in variants.items():
        t0 = time.perf_counter()
        try:
            fn = build()
            fn(x, y)  # first call outside the timing (compilation, oneDNN primitives)
        except Exception as e:  # noqa: BLE001 - report and go on
            if notes is not None:
                notes.append(f"`{name}` failed and was left out: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''}")
            continue
        if notes is not None and "compile" in name:
            notes.append(f"`{name}`: build and first step (compilation) took {time.perf_counter() - t0:.0f} s")
        steps_fns[name] = fn
    results = {name: [] for name in steps_fns}
    for r in range(rounds):
        for name, fn in steps_fns.items():
            results[name].append(time_steps(fn, x, y, steps, device))
            print(f"round {r + 1}/{rounds} {name}: {results[name][-1]:.2f} images/s", flush=True)
    return results


def table(results, base_name, flops=None, peak=None):
    base = statistics.median(results[base_name])
    mfu = flops is not None and peak
    lines = ["| variant | images/s (median) | images/s (best) | vs " + base_name + " |" + (" MFU |" if mfu else ""),
             "| --- | --- | --- | --- |" + (" --- |" if mfu else "")]
    for name, v in results.items():
        med = statistics.median(v)
        row = f"| {name} | {med:.2f} | {max(v):.2f} | {med / base:.2f}x |"
        if mfu:
            row += f" {100 * med * flops / (peak * 1e12):.1f} % |"
        lines.append(row)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:N] for the GPU table")
    ap.add_argument("--gpu-batch", type=int, default=256)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="CUDA: dense bf16 peak of the GPU in TFLOP/s for the MFU column (989 for H100/H200 SXM)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "train_throughput.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    cuda = dev.startswith("cuda")
    batch = args.gpu_batch if cuda else args.batch
    steps = max(args.steps, 10) if cuda else args.steps
    how: list = []
    notes: list = []
    variants = {
        "plain eager step (fp32)": lambda: build_plain(args.classes, dev),
        "trainer step (fp32)": lambda: build_trainer(args.classes, dev, batch),
        "trainer step, channels_last (fp32)": lambda: build_trainer(args.classes, dev, batch, channels_last=True),
        "bf16": lambda: build_precision(args.classes, dev, batch, how=how),
        "bf16 + channels_last": lambda: build_precision(args.classes, dev, batch, channels_last=True),
    }
    if cuda:
        variants["trainer, amp fp16 + GradScaler"] = lambda: build_trainer(args.classes, dev, batch, "fp16")
    if not args.no_compile:
        variants["bf16 + channels_last + torch.compile(backbone)"] = lambda: build_precision(
            args.classes, dev, batch, channels_last=True, compile_backbone=True)
    results = run_table(variants, batch, args.classes, steps, args.rounds, dev, notes)
    flops = step_flops(min(batch, 16), args.classes, dev)
    load = os.getloadavg()
    name = torch.cuda.get_device_name(torch.device(dev)) if cuda else (platform.processor() or platform.machine())
    lines = [
        "# Training throughput: sphere20, 112x96, A-Softmax m=4 + MHE (batch_vs_all, s=2)",
        "",
        f"Command: `.venv/bin/python bench/train_throughput.py --batch {args.batch} --classes {args.classes} "
        f"--steps {args.steps} --rounds {args.rounds} --threads {args.threads} --device {dev}"
        f"{' --no-compile' if args.no_compile else ''}`",
        "",
        f"Machine: {name}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, bf16 support: "
        f"{bf16_support(dev)}; {args.rounds} interleaved rounds of {steps} steps (every variant once per round, "
        f"median and best round). Load average (1, 5, 15 min) at the end: {load[0]:.2f}, {load[1]:.2f}, "
        f"{load[2]:.2f} (other jobs share the cores: absolute numbers are noisy, the interleaved ratios less so).",
        "",
        f"## {'CUDA' if cuda else 'CPU'}, batch {batch}, {args.classes} classes; "
        f"{flops / 1e9:.1f} GFLOP per image per float32 step (forward + backward, torch.utils.flop_counter)",
        "",
    ]
    lines += table(results, "plain eager step (fp32)", flops if cuda else None, args.peak_tflops)
    lines += ["", f"bf16 rows: {how[0] if how else 'not run'}."]
    lines += [f"- {n}" for n in notes]
    if not cuda:
        lines += ["", "On a GPU: `--device cuda --peak-tflops 989` gives the same table with AMP and MFU."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
