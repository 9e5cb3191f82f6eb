"""Cost of each objective of the MHE family, as a ratio to plain MHE measured in the same process.

Two tables, each from alternating rounds (every variant once per round, in turn; the best round kept;
``bench/_timing.py``), on one torch thread and the thread's CPU time (``--clock cpu``, the default:
other jobs on a shared machine do not inflate it):

1. **The CIFAR CNN-9** (the recipes of ``configs/cifar/``): the regulariser alone (``advance`` with its
   inner optimisers + the weighted sum over the 11 layers + its backward) and a whole training step at
   the recipe's batch (augmented batch, forward, loss, regulariser, backward, SGD), every objective
   against half-space MHE with s = 2 and against no regulariser.
2. **One wide layer**: CoMHE-RP (``pn`` projections to ``pd`` dimensions, the authors' 20 x 40) against
   MHE on a ``Linear(D, N)`` weight, half space, forward + backward, for growing widths: where random
   projections are cheaper than the exact energy.

    python bench/mhe_family_speed.py                 # writes bench/results/mhe_family_speed.md
    python bench/mhe_family_speed.py --rounds 3 --batch-size 128 --widths 256 1024 2048
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import RESULTS, alternate, load_average, ratios, write_report  # noqa: E402
from bench.mhe_family_cifar import RECIPE_FIELDS, RECIPES  # noqa: E402
from data_prep.cifar import random_pad_crop_flip, to_network_input  # noqa: E402
from sphereface_plus.cifar import trainer as cifar  # noqa: E402
from sphereface_plus.cifar.config import CifarConfig  # noqa: E402
from sphereface_plus.config import load_config  # noqa: E402
from sphereface_plus.mhe import OBJECTIVES, comhe_rp_energy, mhe_energy, random_projections  # noqa: E402

SETTINGS = ["none", "mhe"] + [name for name in OBJECTIVES if name != "mhe"]


def _config(setting: str, batch: int) -> CifarConfig:
    if setting == "none":
        return CifarConfig(model_name="baseline", dataset="cifar100", batch_size=batch)
    if setting == "mhe":
        return CifarConfig(model_name="half_mhe", mhe_power="2", dataset="cifar100", batch_size=batch)
    rcfg = load_config(str(RECIPES / f"{setting}.yaml"), schema=CifarConfig)
    return CifarConfig(**{k: getattr(rcfg, k) for k in RECIPE_FIELDS}, dataset="cifar100", batch_size=batch)


def cnn_variants(batch: int, device: torch.device = torch.device("cpu")):
    """``{setting: regulariser pass}`` and ``{setting: training step}`` on the CNN-9 (CIFAR-100 head)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (1024, 32, 32, 3), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 100, (1024,), generator=g).to(device)
    reg_only, steps = {}, {}
    for setting in SETTINGS:
        cfg = _config(setting, batch)
        model = cifar.build_model(100, seed=0).to(device)
        reg = cifar.build_regularizer(model, cfg)
        opt = cifar.build_optimizer(model, CifarConfig(lr=0.01))
        gen = torch.Generator().manual_seed(0)

        def step(model=model, reg=reg, opt=opt, cfg=cfg, gen=gen):
            idx = torch.randint(0, images.shape[0], (batch,), generator=gen).to(device)
            x = to_network_input(random_pad_crop_flip(images[idx], gen))
            cifar.train_step(model, reg, opt, x, labels[idx], cfg, "fp32")

        steps[setting] = step
        if reg is not None:
            def reg_pass(model=model, reg=reg):
                reg.advance(0.01)
                loss, _ = reg()
                model.zero_grad(set_to_none=True)
                loss.backward()

            reg_only[setting] = reg_pass
    return reg_only, steps


def layer_variants(width: int, pn: int, pd: int):
    g = torch.Generator().manual_seed(width)
    w = torch.randn(width, width, generator=g).requires_grad_(True)

    def mhe():
        w.grad = None
        mhe_energy(w, "2", half_space=True, check_finite=False).backward()

    def rp():
        w.grad = None
        p = random_projections(pn, pd, width, g)  # drawn anew every update, as in training
        comhe_rp_energy(w, p, "2", half_space=True, check_finite=False).backward()

    return {"mhe": mhe, "comhe_rp": rp}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128, help="the recipe's 128")
    p.add_argument("--widths", type=int, nargs="+", default=[128, 512, 1024, 2048])
    p.add_argument("--projections", type=int, default=20, help="pn (the authors' 20)")
    p.add_argument("--projection-dim", type=int, default=40, help="pd (the authors' 40)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--skip-steps", action="store_true", help="skip the whole-training-step table (the slow one)")
    p.add_argument("--out", default=str(RESULTS / "mhe_family_speed.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    load_before = load_average()
    lines = [
        "# The MHE family: cost per update as a ratio to plain MHE",
        "",
        f"Command: `python bench/mhe_family_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`. "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), one torch thread, "
        f"{'CPU time of the thread' if args.clock == 'cpu' else 'wall clock'}, torch {torch.__version__}; "
        f"alternating rounds ({args.rounds}), best round of each. Load average before: "
        f"{' / '.join(map(str, load_before))}.",
        "",
        "## The CIFAR CNN-9, the recipes of configs/cifar/",
        "",
        "Regulariser alone: `advance` (draws, inner optimisers) + the weighted sum over the 11 layers + its backward. "
        f"Step: one training update at batch {args.batch_size} (CIFAR-100 head), everything included.",
        "",
    ]
    reg_only, steps = cnn_variants(args.batch_size)
    r_reg = ratios(alternate(reg_only, args.rounds, clock=clock, log=False), "mhe")
    if args.skip_steps:
        r_step = None
    else:
        t_step = alternate(steps, args.rounds, clock=clock, log=False)
        r_step, r_none = ratios(t_step, "mhe"), ratios(t_step, "none")
    lines += ["| objective | regulariser s | regulariser / MHE's | step s | step / MHE step | step / no-regulariser step |",
              "| --- | --- | --- | --- | --- | --- |"]
    for setting in SETTINGS:
        reg_cells = (f"{r_reg[setting]['best_s']:.4f} | {r_reg[setting]['ratio']:.2f}" if setting in r_reg else "- | -")
        step_cells = ("- | - | -" if r_step is None else
                      f"{r_step[setting]['best_s']:.3f} | {r_step[setting]['ratio']:.2f} | {r_none[setting]['ratio']:.2f}")
        lines.append(f"| {setting} | {reg_cells} | {step_cells} |")
    lines += [
        "",
        f"## CoMHE-RP against MHE on one wide layer (pn = {args.projections}, pd = {args.projection_dim})",
        "",
        "A `Linear(N, N)` weight, half space (2N neurons), forward + backward; CoMHE-RP draws its projections in "
        "the timed pass, as every training update does.",
        "",
        "| N = D | MHE s | CoMHE-RP s | CoMHE-RP / MHE |",
        "| --- | --- | --- | --- |",
    ]
    for width in args.widths:
        r = ratios(alternate(layer_variants(width, args.projections, args.projection_dim), args.rounds, clock=clock,
                             log=False), "mhe")
        lines.append(f"| {width} | {r['mhe']['best_s']:.4f} | {r['comhe_rp']['best_s']:.4f} | {r['comhe_rp']['ratio']:.2f} |")
        print(lines[-1], flush=True)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        reg_only, steps = cnn_variants(args.batch_size, dev)
        sync = torch.cuda.synchronize
        r_reg = ratios(alternate(reg_only, 10, sync=sync, log=False), "mhe")
        r_step = ratios(alternate(steps, 10, sync=sync, log=False), "mhe")
        lines += ["", f"## CUDA: {torch.cuda.get_device_name(dev)}, wall clock, 10 rounds", "",
                  "| objective | regulariser / MHE's | step / MHE step |", "| --- | --- | --- |"]
        lines += [f"| {k} | {r_reg[k]['ratio'] if k in r_reg else '-'} | {r_step[k]['ratio']} |" for k in SETTINGS]
    else:
        lines += ["", "CUDA: no GPU was available for this run (the script adds a CUDA table when one is present)."]
    lines += ["", f"Load average after: {' / '.join(map(str, load_average()))}."]
    write_report(Path(args.out), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
