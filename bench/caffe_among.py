"""How the released SphereFace+ term (Caffe InterClass AMONG, ``classifier_mhe(mode='caffe_among')``)
compares with the toolkit's pairwise MHE modes, at CASIA size.

For one batch of labels on random unit classifier rows (C = 10,572, d = 512, batch 512) it prints, for
each kernel/mode with lambda_M = 1 against caffe_among with the released alpha = 10 (one process of 512,
and the released 2 GPUs x 256, ``replicas=2``):
the cosine between the two weight gradients, the same after projecting each row onto the sphere's
tangent plane (the only part that moves a unit row), the norm ratio |mode| / |caffe_among|, and the
share of each gradient's squared norm on classes absent from the batch.

    PYTHONPATH=. python bench/caffe_among.py [--threads 2] [--seed 0] [--out bench/results/caffe_among.md]
"""
from __future__ import annotations

import argparse
import time

import torch

from sphereface_plus.mhe import classifier_mhe
from sphereface_plus.utils import atomic_write_text


def _grad(weight: torch.Tensor, labels: torch.Tensor, scale: float, **kw) -> torch.Tensor:
    w = weight.clone().requires_grad_(True)
    (scale * classifier_mhe(w, labels, **kw)).backward()
    return w.grad


def _tangential(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return g - (g * w).sum(dim=1, keepdim=True) * w


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=10572)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--alpha", type=float, default=10.0, help="caffe_among alpha (released m = 4: 10)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="also write the table to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    w = torch.randn(args.classes, args.dim, generator=g, dtype=torch.float64)
    w = w / w.norm(dim=1, keepdim=True)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g)
    absent = torch.ones(args.classes, dtype=torch.bool)
    absent[labels] = False
    t0 = time.perf_counter()
    refs = {
        "caffe_among (1 x 512)": _grad(w, labels, args.alpha, mode="caffe_among"),
        "caffe_among (2 x 256, released)": _grad(w, labels, args.alpha, mode="caffe_among", replicas=2),
    }
    rows = []
    for power in ("0", "1", "2", "a0", "a1", "a2"):
        for mode in ("batch_vs_all", "batch_unique"):
            gm = _grad(w, labels, 1.0, power=power, mode=mode)
            for name, gc in refs.items():
                rows.append((f"{mode} power {power}", name, _cos(gm, gc), _cos(_tangential(gm, w), _tangential(gc, w)),
                             float(gm.norm() / gc.norm()), float(gm[absent].pow(2).sum() / gm.pow(2).sum())))
    lines = [
        f"C = {args.classes}, d = {args.dim}, batch {args.batch} ({int((~absent).sum())} distinct classes), random unit "
        f"rows, float64, seed {args.seed}; caffe_among alpha = {args.alpha}, modes lambda_M = 1. "
        f"caffe_among puts 0 on absent classes by construction.",
        "",
        "| mode (lambda_M = 1) | against | cosine | tangential cosine | norm ratio mode / caffe | mode's share on absent classes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {a} | {b} | {c:.3f} | {t:.3f} | {r:.1f} | {s:.3f} |" for a, b, c, t, r, s in rows]
    lines.append("")
    lines.append(f"({time.perf_counter() - t0:.1f} s with {args.threads} threads)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        atomic_write_text(args.out, "# caffe_among vs the pairwise MHE modes (bench/caffe_among.py)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
