"""``sphereface-plus cifar``: the MHE CIFAR experiments (Liu et al., NeurIPS 2018).

The seed's second entry point (``python train.py --model_name=mhe --power_s=0``), with its flags kept
as aliases of the YAML recipes in ``configs/cifar/*.yaml`` (any field also as ``key=value``)::

    sphereface-plus cifar --model_name mhe --power_s 0 --data cifar-100-python
    sphereface-plus cifar --config configs/cifar/half_mhe.yaml mhe_power=2 dataset=cifar10 data=DIR iterations=N --out DIR
    sphereface-plus cifar --sweep --data cifar-100-python --out runs/cifar-sweep

The recipe (its schema :class:`~sphereface_plus.cifar.config.CifarConfig`), the trainer
(:class:`~sphereface_plus.cifar.trainer.CifarTrainer`, on the engine's one loop) and the data
(``data_prep.cifar.CifarData``: the augmented batch of each update, a function of ``(seed, update)``) are
the library's; this command parses the flags, takes the run folder and runs them. Outputs in ``--out``:
``metrics.jsonl`` (one JSON object per evaluation), ``log_train.txt`` and ``log_test.txt``, ``config.json``,
TensorBoard events in ``tb/``, ``checkpoints/last.pt`` (resumable with ``--resume``). ``--sweep`` runs the
13 settings of the published table into ``OUT/<setting>/`` and writes ``OUT/results.md`` beside the
published CIFAR-100 numbers.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from data_prep.cifar import CifarData
from sphereface_plus.cifar.config import (CIFAR_CLASSES, LR_SCHEDULES, MODEL_NAMES, PUBLISHED_CIFAR100, SWEEP_SETTINGS,
                                          CifarConfig)
from sphereface_plus.cifar.trainer import CifarTrainer
from sphereface_plus.commands.options import add_field_flags, add_run_arguments, load_config_from_args
from sphereface_plus.config import config_to_yaml
from sphereface_plus.engine.device import resolve_device
from sphereface_plus.engine.precision import resolve_precision
from sphereface_plus.engine.preempt import Preemption
from sphereface_plus.engine.run_folder import RunFolder
from sphereface_plus.errors import UsageError
from sphereface_plus.mhe import OBJECTIVES, POWERS
from sphereface_plus.utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

HELP = "MHE CIFAR-100/10 experiments (9-conv CNN; baseline, full- and half-space MHE, s in 0/1/2/a0/a1/a2)"

__all__ = ["train_cifar", "run_sweep", "results_table", "config_from_args", "add_arguments", "run"]


def train_cifar(cfg: CifarConfig, out_dir, device: str = "auto", resume: bool = False,
                stop_after: Optional[int] = None) -> Dict[str, Any]:
    """Train and evaluate one setting; returns a summary (``final_accuracy`` in [0, 1], paths, timing).

    Resume: with ``resume=True`` and a checkpoint in ``OUT/checkpoints`` (the newest readable one),
    training continues from it (weights, momentum buffers, BN statistics, schedule, iteration, logs);
    the data order and augmentation are functions of ``(seed, iteration)``, so a resumed run retraces
    the uninterrupted one. Without ``resume`` an existing checkpoint is an error rather than being
    overwritten; with changed settings the resume is refused (engine ``check_settings``).

    ``stop_after``: leave the loop once this many updates are done (as an interruption would), with a
    checkpoint written there; a later call with ``resume=True`` finishes the run. For time-sliced
    jobs (and the resume test). The summary then has ``stopped: True``.
    """
    # the engine's run-folder policy (lock, refusal without --resume) and preemption (docs/robustness.md)
    with RunFolder(out_dir, resume, command=f"sphereface-plus cifar ({cfg.setting})", resume_hint="--resume",
                   out_hint="--out <another folder>", what="--out") as run, Preemption() as stop:
        dev = resolve_device(device, setting="--device")
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        precision = resolve_precision(cfg.precision, dev, what="precision")
        log.info("%s: training precision %s (precision=%s)", cfg.setting, precision, cfg.precision)
        data = CifarData(cfg.data, cfg.dataset, cfg.batch_size, cfg.iterations, cfg.seed, dev)
        trainer = CifarTrainer(cfg, data, out_dir, dev, precision, stop_after=stop_after, preemption=stop)
        trainer.resume(bool(run.resume))
        try:
            return trainer.train()
        except KeyboardInterrupt:
            log.warning("interrupted: the last checkpoint (%s) resumes this run with --resume",
                        Path(out_dir) / "checkpoints")
            raise


def results_table(results: Dict[str, Dict[str, Any]], dataset: str, iterations: int, mhe_scale: float = 1.0) -> str:
    """Markdown: our final test accuracy for every setting next to the published CIFAR-100 numbers."""
    cols = list(POWERS)
    lines = [
        f"# MHE CIFAR sweep: final test accuracy (%), {dataset}, {iterations} iterations, mhe_scale {mhe_scale:g}",
        "",
        "Each cell: ours / published (CIFAR-100, 42.5k iterations, Liu et al., NeurIPS 2018; the published full-space "
        "runs correspond to mhe_scale 0.1, the half-space runs to 1). "
        + ("" if dataset == "cifar100" else "The published numbers are for CIFAR-100 and are not comparable. ")
        + "'-' means the run has not finished.",
        "",
        "| model | " + " | ".join(f"s={c}" if c in "012" else c for c in cols) + " |",
        "| --- |" + " --- |" * len(cols),
    ]
    for model in MODEL_NAMES:
        cells = []
        for s in cols:
            if model == "baseline" and s != "0":
                cells.append("")
                continue
            key = (model, "-") if model == "baseline" else (model, s)
            ours = results.get("baseline" if model == "baseline" else f"{model}_{s}")
            ours_txt = f"{100 * ours['final_accuracy']:.2f}" if ours else "-"
            cells.append(f"{ours_txt} / {PUBLISHED_CIFAR100[key]:.2f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def run_sweep(base: CifarConfig, out_dir, device: str = "auto") -> Dict[str, Dict[str, Any]]:
    """Run the 13 settings one after the other (each resumable) and write ``OUT/results.md`` / ``.json``."""
    out = Path(out_dir)
    results: Dict[str, Dict[str, Any]] = {}
    for model_name, power in SWEEP_SETTINGS:
        cfg = CifarConfig(**{**base.to_dict(), "model_name": model_name, "mhe_power": "0" if power == "-" else power})
        results[cfg.setting] = train_cifar(cfg, out / cfg.setting, device=device, resume=True)
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "results.md", results_table(results, base.dataset, base.iterations, base.mhe_scale))
    return results


# ----------------------------------------------------------------------------------------------------
# command line: --config + key=value, and the seed's flags (dashes, the underscore spelling as alias)

# flag -> (type, help); each becomes the override field=value when given
_SETTING_FLAGS = {
    "model_name": (str, f"{' | '.join(MODEL_NAMES)}: no MHE, full-space MHE, half-space MHE on hidden layers"),
    "mhe_power": (str, f"MHE kernel s (the seed's --power_s): {' | '.join(POWERS)} (0/1/2 Euclidean log, 1/d, 1/d^2; a0/a1/a2 angular)"),
    "mhe_objective": (str, f"the regulariser: {' | '.join(OBJECTIVES)} (docs/theory.md#mhe-family); its settings as "
                           f"key=value: mhe_projection_dim, mhe_projections, mhe_inner_steps, mhe_gamma"),
    "lr_schedule": (str, f"{' | '.join(LR_SCHEDULES)}: the lr milestones of wy1iu/MHE (20k/30k/37.5k of 42.5k) or "
                         f"rmlin/CoMHE (30k/50k/65k of 75k), scaled to iterations"),
    "mhe_scale": (float, "multiplies the original's coefficients (λ_h, λ_o) = (1, 10) for 0/1/2/a0, (0.1, 1) for a1/a2; "
                         "0.1 matches the published full-space logs"),
    "dataset": (str, f"{' | '.join(CIFAR_CLASSES)} (fine labels for cifar100)"),
    "data": (str, "folder with the CIFAR python pickles (cifar-100-python/ or cifar-10-batches-py/, or its parent)"),
    "iterations": (int, "SGD updates; lr milestones 20k/30k/37.5k of 42.5k scale with it"),
    "lr": (float, "initial learning rate"),
    "batch_size": (int, "batch size"),
    "eval_every": (int, "evaluate on the whole test set every N updates"),
    "log_every": (int, "train-log line every N updates"),
    "seed": (int, "initialisation, data order and augmentation seed"),
    "log_eps": (float, "the +eps inside log(softmax + eps) of the reference loss; 0: plain log_softmax"),
    "bn_momentum": (float, "BN running-statistics momentum (PyTorch convention; recipe: 0.001)"),
    "label_smoothing": (float, "label smoothing of the targets"),
    "precision": (str, "network precision: auto (default: bf16 where the CPU/GPU has native bf16, "
                 "else fp32) | fp32 | bf16 | fp16 (CUDA) | off (= fp32); loss and MHE stay float32"),
}
_FLAG_ALIASES = {"mhe_power": ["--power_s", "--power-s"]}  # the seed's flag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n"
        "  sphereface-plus cifar --model-name mhe --power-s 0 --data cifar-100-python\n"
        "  sphereface-plus cifar --model_name half_mhe --power_s 2 --dataset cifar10 --data DIR --iterations 2000 --out runs/c10\n"
        "  sphereface-plus cifar --config configs/cifar/half_mhe.yaml mhe_power=a0 data=cifar-100-python\n"
        "  sphereface-plus cifar --config configs/cifar/comhe_rp.yaml data=cifar-100-python\n"
        "  sphereface-plus cifar --sweep --data cifar-100-python --out runs/cifar-sweep\n"
        "\nThe published full-space (mhe) logs used the coefficients x 0.1: add --mhe-scale 0.1 to match them.\n"
        "Every flag of the seed is accepted with dashes or underscores; the defaults are the recipe's "
        "(configs/cifar/<model_name>.yaml)."
    )
    parser.add_argument("--config", help="YAML recipe (configs/cifar/*.yaml: baseline, mhe, half_mhe and one "
                                         "per MHE family objective); default: the built-in recipe (= mhe.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe fields, e.g. mhe_power=2 iterations=2000")
    g = parser.add_argument_group("recipe fields as flags (the reference's flags; override the YAML)")
    add_field_flags(g, _SETTING_FLAGS, _FLAG_ALIASES)
    r = parser.add_argument_group("run")
    r.add_argument("--sweep", action="store_true",
                   help="run all 13 settings of the published table into OUT/<setting>/ and write OUT/results.md")
    add_run_arguments(r, "runs/cifar/<dataset>/<setting>, or .../sweep",
                      ". The augmentation is vectorised on the batch, so no loader processes (--workers elsewhere) "
                      "are needed")
    r.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")


def config_from_args(args: argparse.Namespace) -> CifarConfig:
    """Defaults < ``--config`` YAML < ``key=value`` < the flags that were given."""
    return load_config_from_args(args, _SETTING_FLAGS, CifarConfig)


def run(args: argparse.Namespace) -> int:
    """The command; a ToolkitError becomes cli.main's one ``error:`` line, exit status 2."""
    cfg = config_from_args(args)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    root = Path("runs") / "cifar" / cfg.dataset
    if args.sweep:
        out = Path(args.out) if args.out else root / "sweep"
        results = run_sweep(cfg, out, device=args.device)
        print(results_table(results, cfg.dataset, cfg.iterations, cfg.mhe_scale))
        print(f"results: {out / 'results.md'}")
        return 0
    out = Path(args.out) if args.out else root / cfg.setting
    summary = train_cifar(cfg, out, device=args.device, resume=args.resume)
    print(f"{summary['setting']}: final test accuracy {100 * summary['final_accuracy']:.2f}% after "
          f"{summary['iterations']} iterations (best {100 * summary['best_accuracy']:.2f}%), "
          f"{summary['elapsed_s']:.0f} s; metrics: {Path(summary['out']) / 'metrics.jsonl'}")
    return 0
