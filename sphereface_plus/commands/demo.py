"""``sphereface-plus demo``: the whole pipeline in one command (``make demo``).

    sphereface-plus demo --out runs/demo                    # embedded synthetic identities
    sphereface-plus demo --out runs/demo-lfw --data lfw      # real LFW: images/, pairs.txt, lfw_landmark.txt

Steps, each printed as it starts, all reused when the command is run again on the same folder:

1. data: without ``--data``, two deterministic synthetic identity sets from :mod:`data_prep.synthetic`
   (cartoon faces, NOT real people): a training set and a separate test set with its own 10
   person-disjoint folds of pairs, so that verification runs on people never seen in training. With
   ``--data`` (an LFW folder): the people named in the pairs of every fold but the test fold
   (``--test-fold``, default 10) who have at least ``--min-images`` images are the training
   identities; the test fold's 600 pairs are the test.
2. align: ``sphereface-plus align`` (:func:`data_prep.prepare.align_tree`) from the landmark file, to
   the 112x96 template (SphereFace, Liu et al., CVPR 2017). Finished crops are kept on a rerun.
3. train: a small SphereFace+ model (``--backbone``, default sphere4; A-Softmax m=4 + MHE on the
   classifier, Liu et al., CVPR 2017 and NeurIPS 2018) for ``--iterations`` (default 300: the whole
   demo took 6 CPU-minutes when measured on 2 cores), or for about ``--minutes`` of wall time (a short timed probe turns the budget into an
   iteration count). The count is stored in ``plan.json`` so a rerun resumes the same run
   (``--resume auto``) instead of starting another one.
4. verify: the 10-fold protocol (LFW View 2, as in the SphereFace evaluation) on the test pairs; for
   LFW the 600 pairs of the test fold are split into 10 stratified folds (the threshold of each is chosen on the other 540 pairs).
   The same network with its initial weights is scored too: random convolutional features already
   separate identities somewhat (synthetic ones more than real ones), and the difference is what the
   training added.
5. report: ``report.md`` (accuracy table), ``report.json``, ``verification.json``,
   ``verification_roc.png``, ``config.yaml`` (the resolved training config) and ``model.pt`` (a
   checkpoint with its cosine ``threshold`` for ``sphereface-plus compare``).

Deliberate deviations from the paper recipe, to fit a few CPU minutes: the smallest network
(sphere4 by default), batch 32, lr 0.05 with a short warm-up and gradient clipping, the lr steps at
50 % and 75 % of the run. The A-Softmax lambda schedule is the published one (1000 (1 + 0.12 t)^-1,
floor 5), so a short run covers only its start (lambda still far above 5: a mild margin);
``report.md`` states the values used.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from eval.features import load_embedding_model
from eval.lfw import verify_on_pairs
from eval.report import write_report
from sphereface_plus.commands.demo_data import DemoData, prepare_lfw, prepare_synthetic_demo
from sphereface_plus.commands.demo_report import report_markdown
from sphereface_plus.commands.train import train
from sphereface_plus.engine.checkpoint import check_settings
from sphereface_plus.engine.run_folder import RunFolder
from sphereface_plus.errors import ToolkitError
from sphereface_plus.mhe import mhe_energy
from sphereface_plus.models import create_backbone
from sphereface_plus.face.config import load_config
from sphereface_plus.face.resolve import resolve
from sphereface_plus.face.trainer import FaceTrainer
from sphereface_plus.utils import atomic_torch_save, atomic_write_json, atomic_write_text, safe_torch_load

logger = logging.getLogger(__name__)

HELP = "run the whole pipeline: data -> align -> train SphereFace+ -> 10-fold verification report (make demo)"
DESCRIPTION = __doc__

__all__ = [
    "HELP", "add_arguments", "run", "run_demo", "DemoData", "prepare_synthetic_demo", "prepare_lfw",
    "train_config", "schedule_gamma", "untrained_backbone", "evaluate_model", "time_per_iteration", "train_with_stats", "evaluate_checkpoint", "export_model",
]

#: default training length (sphere4, batch 32): the whole demo took 6 CPU-minutes when measured on 2
#: cores, and gave 97.7 % on the synthetic test pairs against 77.7 % for the untrained network
#: (docs/index.md#tour). A fixed count rather than a time budget, so every machine gets the same numbers.
DEFAULT_ITERATIONS = 300

#: the SphereFace+ setting of configs/face/spherefaceplus20_casia.yaml: output-layer MHE, Riesz s=2 kernel
MHE_LAMBDA, MHE_POWER, MHE_MODE = 1.0, "2", "batch_vs_all"


def schedule_gamma(iterations: int, base: float = 1000.0, lambda_min: float = 5.0, power: float = 1.0,
                   reach: float = 0.5) -> float:
    """``gamma`` of the A-Softmax schedule ``lambda = base (1 + gamma t)^-power`` that hits ``lambda_min``
    at ``t = reach * iterations`` (the published schedule, docs/theory.md#lambda-schedule, uses gamma
    0.12, i.e. t ~ 1,660, for 28k iterations)."""
    t = max(1.0, reach * iterations)
    return ((base / lambda_min) ** (1.0 / power) - 1.0) / t


DEMO_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "face" / "demo.yaml"


def train_config(out_dir, data: DemoData, iterations: int, seed: int = 0, batch_size: int = 32,
                 backbone: str = "sphere4", head: str = "a_softmax", lambda_m: float = MHE_LAMBDA,
                 mhe_power: str = MHE_POWER, lr: float = 0.05, device: str = "auto", num_workers: int = 0,
                 tensorboard: bool = True, lambda_reach: Optional[float] = None):
    """The resolved :class:`~sphereface_plus.config.Config` of a short run on ``data``: the recipe
    ``configs/face/demo.yaml`` (its comments say why each value) plus the overrides computed here.

    The lr is divided by 10 at 50 % and 75 % of the run, with a linear warm-up over the first 5 %.
    With ``lambda_reach=R`` the A-Softmax lambda schedule is compressed by :func:`schedule_gamma` to
    reach the floor at ``R x iterations``. Measured on LFW (bench/lfw_fold_experiment.py): compressed to
    reach 5 at 50 % of a 200-iteration run, A-Softmax from scratch stopped learning once lambda was low
    (training accuracy 0 %), hence the default (the recipe's schedule as is).
    """
    iterations = int(iterations)
    milestones = sorted({max(1, iterations // 2), max(2, (3 * iterations) // 4)})
    overrides = {
        "out_dir": str(out_dir), "model.backbone": backbone, "head.name": head, "mhe.lambda_m": float(lambda_m),
        "mhe.power": str(mhe_power), "data.root": str(data.train_root), "data.list_file": str(data.train_list),
        "data.num_workers": num_workers, "optim.lr": lr, "optim.milestones": milestones,
        "optim.warmup_iters": max(0, iterations // 20), "train.iterations": iterations,
        "train.batch_size": int(batch_size), "train.seed": int(seed), "train.device": device,
        "train.log_every": max(1, iterations // 20), "train.tensorboard": bool(tensorboard),
        "checkpoint.every": max(1, iterations // 4),
    }
    if head != "a_softmax":  # the recipe's head settings are A-Softmax's; another head keeps its own defaults
        overrides.update({f"head.{k}": None for k in ("m", "base", "gamma", "power", "lambda_min")})
    if lambda_reach is not None:
        overrides["head.gamma"] = schedule_gamma(iterations, reach=lambda_reach)
    return load_config(str(DEMO_RECIPE), [f"{k}={_yaml_value(v)}" for k, v in overrides.items()])


def _yaml_value(v: Any) -> str:
    """A value as YAML text for a ``key=value`` override (strings quoted, so '2' stays a string)."""
    return json.dumps(v)


def time_per_iteration(cfg, num_classes: int, steps: int = 3) -> float:
    """Seconds of one training step of the run ``cfg`` (``FaceTrainer.train_step``: forward, A-Softmax + MHE,
    backward, SGD, schedule) on a random batch: the median of ``steps`` timed steps after one warm-up
    step. Used to turn a wall-clock budget into an iteration count; the caller's RNG states are kept."""
    class _Shape:  # only what the trainer asks of a dataset here: the steps get tensors directly
        input_size = (112, 96)

        def __init__(self, n: int):
            self.num_classes = n

        def __len__(self) -> int:
            return self.num_classes

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        trainer = FaceTrainer(resolve(cfg, _Shape), _Shape(num_classes))
        gen = torch.Generator().manual_seed(0)
        b = cfg.train.batch_size
        x = torch.randn(b, 3, *_Shape.input_size, generator=gen)
        y = torch.randint(0, num_classes, (b,), generator=gen)
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            trainer.train_step(x, y)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            if i:
                times.append(time.perf_counter() - t0)
    random.setstate(py_state)
    np.random.set_state(np_state)
    times.sort()
    return times[len(times) // 2]


# ------------------------------------------------------------------------------------------- verify
def evaluate_checkpoint(checkpoint, data: DemoData, device: str = "cpu", batch_size: int = 64) -> Tuple[Dict, float]:
    """The 10-fold verification report of a checkpoint on ``data.pairs``, and the cosine threshold for
    ``compare`` (chosen the same way but without the per-fold mean subtraction, since ``compare``
    scores two images alone, with no set to take a mean over)."""
    model, _ = load_embedding_model(checkpoint, device=device)
    return evaluate_model(model, data, device=device, batch_size=batch_size)


def untrained_backbone(backbone: str, seed: int):
    """The backbone exactly as the trainer initialises it for ``train.seed = seed`` (same RNG order:
    seeding, then the backbone is the first thing drawn), before any training step."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG state alone
        torch.manual_seed(seed)
        return create_backbone(backbone, input_size=(112, 96)).eval()


def evaluate_model(model, data: DemoData, device: str = "cpu", batch_size: int = 64) -> Tuple[Dict, float]:
    """:func:`evaluate_checkpoint` for a model in memory (``eval.lfw.verify_on_pairs``)."""
    report = verify_on_pairs(model, data.test_root, data.pairs, batch_size=batch_size, device=device)
    return report, float(report.pop("compare_threshold"))


def export_model(checkpoint, path, threshold: float, extra: Optional[Dict[str, Any]] = None) -> None:
    """A compact checkpoint (``model``, ``head``, ``iteration``, ``config``, ``threshold``; docs/interfaces.md)."""
    state = safe_torch_load(checkpoint)
    out = {k: state[k] for k in ("model", "head", "iteration", "config")}
    out["threshold"] = float(threshold)
    if extra:
        out.update(extra)
    atomic_torch_save(out, path)


# ------------------------------------------------------------------------------------------- pipeline
def train_with_stats(cfg) -> Tuple[Dict[str, Any], Dict[str, float]]:
    """``train(cfg, resume="auto")`` plus the last logged statistics of the run.

    A rerun of a finished run trains nothing and its summary has no history, so the statistics of
    the run that did the training are kept in ``<out_dir>/final_stats.json`` and read back.
    """
    path = Path(cfg.out_dir) / "final_stats.json"
    before = json.loads(path.read_text()) if path.is_file() else {}
    t0 = time.perf_counter()
    summary = train(cfg, resume="auto")
    seconds = time.perf_counter() - t0
    last = summary.get("final")
    if last:  # this call trained (all of the run, or the rest of an interrupted one)
        stats = {"loss": float(last["loss"]), "ce": float(last.get("ce", math.nan)), "mhe": float(last["mhe"]),
                 "acc": float(last["acc"]), "images_per_s": float(summary["images_per_s"]),
                 "train_seconds": float(before.get("train_seconds", 0.0)) + seconds}
        atomic_write_json(path, stats)
    elif before:
        stats = before
    else:
        stats = {k: math.nan for k in ("loss", "ce", "mhe", "acc", "images_per_s", "train_seconds")}
    return summary, stats


def run_demo(out, data_dir=None, minutes: float = 0.0, iterations: Optional[int] = DEFAULT_ITERATIONS, seed: int = 0,
             batch_size: int = 32, backbone: str = "sphere4", device: str = "cpu", test_fold: int = 10,
             min_images: int = 5, synthetic_sizes: Optional[Dict[str, int]] = None, workers: int = 0,
             command: str = "sphereface-plus demo") -> Dict[str, Any]:
    """The pipeline of the module docstring; returns the ``report.json`` dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "data"
    timings: Dict[str, float] = {}
    t_all = time.perf_counter()

    # 1-2: data + alignment
    t0 = time.perf_counter()
    if data_dir is None:
        print("[1/4] data: generating the SYNTHETIC identity sets (not real faces) and aligning them", flush=True)
        data = prepare_synthetic_demo(work, seed=seed, workers=workers, **(synthetic_sizes or {}))
    else:
        print(f"[1/4] data: aligning LFW from {data_dir} with its landmark file", flush=True)
        data = prepare_lfw(data_dir, work, test_fold=test_fold, min_images=min_images, workers=workers)
    timings["data + alignment"] = time.perf_counter() - t0

    # 3: training (the plan is fixed on the first run so that a rerun resumes the same run)
    t0 = time.perf_counter()
    plan_path = out / "plan.json"
    want = {"data": data.kind, "data_dir": str(data_dir) if data_dir else None, "seed": seed, "batch_size": batch_size,
            "backbone": backbone, "minutes": None if iterations else minutes, "fixed_iterations": iterations,
            "test_fold": test_fold if data_dir else None, "min_images": min_images if data_dir else None,
            "synthetic_sizes": synthetic_sizes if not data_dir else None}
    plan = None
    if plan_path.is_file():
        try:
            plan = json.loads(plan_path.read_text())
        except ValueError:
            plan = None
        if plan is not None:  # the engine's one policy: a rerun with other settings is refused
            check_settings(plan.get("request", {}), want, plan_path, fix=f"use another --out or delete {out}")
    if plan is None:
        if iterations:
            n_iter, t_it = int(iterations), None
        else:
            print(f"  timing a training step of {backbone} (batch {batch_size}) to fit {minutes:g} minutes", flush=True)
            probe = train_config(out / "train", data, 100, seed=seed, batch_size=batch_size, backbone=backbone,
                                 device=device, tensorboard=False)
            t_it = time_per_iteration(probe, data.num_train_identities)
            # ~15 % on top of the model step for data loading, logging and checkpoints
            n_iter = max(10, int(minutes * 60 / (1.15 * t_it)))
            print(f"  {t_it:.2f} s per iteration -> {n_iter} iterations", flush=True)
        plan = {"request": want, "iterations": n_iter, "seconds_per_iteration_probe": t_it}
        atomic_write_json(plan_path, plan)
    else:
        print(f"  reusing the plan of an earlier run: {plan['iterations']} iterations ({plan_path})", flush=True)
    n_iter = int(plan["iterations"])
    cfg = train_config(out / "train", data, n_iter, seed=seed, batch_size=batch_size, backbone=backbone,
                       device=device)
    print(f"[2/4] train: {backbone} + A-Softmax (m=4) + classifier MHE (lambda_M={MHE_LAMBDA:g}, power {MHE_POWER}), "
          f"{n_iter} iterations of batch {batch_size} on {data.num_train_images} images of "
          f"{data.num_train_identities} identities -> {cfg.out_dir}", flush=True)
    summary, stats = train_with_stats(cfg)
    timings["training"] = time.perf_counter() - t0
    ckpt_path = Path(summary["checkpoint"])
    state = safe_torch_load(ckpt_path)
    energy = float(mhe_energy(state["head"]["weight"].double(), power=MHE_POWER))

    # 4: verification
    t0 = time.perf_counter()
    print(f"[3/4] verify: 10-fold protocol on {len(data.pairs)} pairs", flush=True)
    report, compare_thr = evaluate_checkpoint(ckpt_path, data, device=device)
    # the same network with its initial weights: what the training added (random convolutional
    # features already separate some identities, on synthetic faces more than on real ones)
    base, _ = evaluate_model(untrained_backbone(backbone, seed), data, device=device)
    timings["verification"] = time.perf_counter() - t0

    # 5: report
    print(f"[4/4] report -> {out}", flush=True)
    label = "synthetic test identities" if data.kind == "synthetic" else f"LFW fold {test_fold}"
    write_report(report, out, name="verification", label=label)
    export_model(ckpt_path, out / "model.pt", compare_thr)
    atomic_write_text(out / "config.yaml", (Path(cfg.out_dir) / "config.yaml").read_text())
    timings["total"] = time.perf_counter() - t_all
    result = {
        "command": command,
        "data": {"kind": data.kind, "synthetic": data.kind == "synthetic", "description": data.description,
                 "num_train_identities": data.num_train_identities, "num_train_images": data.num_train_images,
                 "num_pairs": len(data.pairs), **data.details},
        "training": {"config": cfg.to_dict(), "iterations": summary["iteration"], "loss": stats["loss"], "train_accuracy": stats["acc"],
                     "lambda": summary["lambda"], "mhe_energy": energy, "images_per_s": stats["images_per_s"],
                     "epochs": summary["iteration"] * batch_size / max(1, data.num_train_images),
                     "checkpoint": str(ckpt_path), "skipped_steps": summary["skipped_steps"],
                     "rollbacks": summary["rollbacks"]},
        "verification": {k: v for k, v in report.items() if k != "roc"},
        "compare_threshold": compare_thr,
        "untrained": {k: base[k] for k in ("mean_accuracy", "std_accuracy", "eer", "auc")},
        "timings": timings,
        "torch_threads": torch.get_num_threads(),
        "files": {"report": "report.md", "roc": "verification_roc.png", "verification": "verification.json",
                  "config": "config.yaml", "model": "model.pt"},
    }
    atomic_write_json(out / "report.json", result)
    atomic_write_text(out / "report.md", report_markdown(result))
    return result


# ------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="run folder (default runs/demo); rerun to resume")
    parser.add_argument("--data", metavar="DIR",
                        help="an LFW folder (images/, pairs.txt, lfw_landmark.txt); default: the synthetic identities")
    parser.add_argument("--iterations", type=int, metavar="N",
                        help=f"training iterations (default {DEFAULT_ITERATIONS}, a few minutes on 2 CPU cores; "
                             "a fixed count gives the same numbers on every machine)")
    parser.add_argument("--minutes", type=float, metavar="M",
                        help="instead of --iterations: a wall-clock budget, turned into iterations by a timed step")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the training (default 0)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B", help="training batch (default 32)")
    parser.add_argument("--backbone", default="sphere4", help="registered backbone (default sphere4, the smallest)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--test-fold", type=int, default=10, metavar="K",
                        help="with --data: the LFW fold (1-10) whose 600 pairs are the test (default 10)")
    parser.add_argument("--min-images", type=int, default=5, metavar="N",
                        help="with --data: train on people with at least N images (default 5)")
    parser.add_argument("--identities", type=int, default=100, metavar="K",
                        help="synthetic: training identities (default 100); the test set has as many other ones")
    parser.add_argument("--images", type=int, default=16, metavar="M",
                        help="synthetic: images per training identity (default 16; test identities get half)")
    parser.add_argument("--pairs-per-fold", type=int, default=60, metavar="N",
                        help="synthetic: verification pairs per fold, 10 folds (default 60)")
    parser.add_argument("--workers", type=int, default=0, metavar="N", help="processes for drawing and aligning (0 = all cores)")


def run(args: argparse.Namespace) -> int:
    if args.minutes is not None and args.iterations is not None:
        print("sphereface-plus demo: error: give --iterations or --minutes, not both", file=sys.stderr)
        return 2
    if args.minutes is not None and args.minutes <= 0:
        print(f"sphereface-plus demo: error: --minutes must be positive, got {args.minutes}", file=sys.stderr)
        return 2
    if args.iterations is not None and args.iterations <= 0:
        print(f"sphereface-plus demo: error: --iterations must be positive, got {args.iterations}", file=sys.stderr)
        return 2
    iterations = args.iterations if args.minutes is None and args.iterations is not None else None
    if args.minutes is None and args.iterations is None:
        iterations = DEFAULT_ITERATIONS
    sizes = None
    if not args.data:
        sizes = {"train_identities": args.identities, "train_images": args.images,
                 "test_identities": args.identities, "test_images": max(2, args.images // 2),
                 "pairs_per_fold": args.pairs_per_fold}
    command = "sphereface-plus demo " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["demo"] else \
        f"sphereface-plus demo --out {args.out}" + (f" --data {args.data}" if args.data else "")
    try:
        # one demo per folder at a time (docs/robustness.md) (a rerun resumes by design: the folder's lock only;
        # the training inside takes its own run folder, <out>/train, with --resume auto)
        with RunFolder(args.out, "auto", command=command, subfolders=(), temp_folders=("",), what="--out"):
            result = run_demo(args.out, data_dir=args.data, minutes=args.minutes or 0.0, iterations=iterations,
                              seed=args.seed, batch_size=args.batch_size, backbone=args.backbone, device=args.device,
                              test_fold=args.test_fold, min_images=args.min_images, synthetic_sizes=sizes,
                              workers=args.workers, command=command)
    except ToolkitError:
        raise  # one line from cli.run_guarded, with its own exit status (a stopped run: 143 / 130 / 0)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"sphereface-plus demo: error: {exc}", file=sys.stderr)
        return 2
    v = result["verification"]
    kind = "SYNTHETIC test identities (not real faces)" if result["data"]["synthetic"] else \
        f"LFW fold {args.test_fold} ({v['num_pairs']} pairs)"
    print(f"verification on {kind}: {100 * v['mean_accuracy']:.2f}% +- {100 * v['std_accuracy']:.2f} "
          f"(10 folds), EER {100 * v['eer']:.2f}%, AUC {v['auc']:.4f}; untrained network: "
          f"{100 * result['untrained']['mean_accuracy']:.2f}%")
    print(f"report: {Path(args.out) / 'report.md'}  (total {result['timings']['total']:.0f} s)")
    return 0
