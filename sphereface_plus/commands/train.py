"""``sphereface-plus train``: train SphereFace / SphereFace+ from a YAML recipe (Liu et al., CVPR 2017 and NeurIPS 2018).

    sphereface-plus train --config configs/face/sphereface20_casia.yaml data.root=casia-112x96
    torchrun --nproc_per_node=2 -m sphereface_plus train --config configs/face/sphereface20_casia.yaml ...
    sphereface-plus train --config configs/face/cpu_smoke.yaml out_dir=runs/smoke --resume auto

The order of a run: the recipe is loaded and checked (:mod:`sphereface_plus.face.config`, the data section
by ``data_prep``) and resolved once (:func:`sphereface_plus.face.resolve.resolve`); the input files it names
are checked; the run folder is taken; the training set is built (``data_prep.training_set``); the
:class:`~sphereface_plus.face.trainer.FaceTrainer` receives the resolved recipe, the training set and, with
``eval.pairs`` / ``eval.packs``, a verifier (``eval.training_verifier``); it resumes (when asked),
``<out_dir>/config.yaml`` records the resolved recipe, and the engine's loop runs. From Python: ``train(cfg, resume=None, overrides=())``.

The run folder follows the engine's one policy (:mod:`sphereface_plus.engine.run_folder`,
docs/robustness.md): a folder that already holds a run is refused without ``--resume auto|PATH``, a second
run into a busy folder is refused by its lock, and an elastic restart of the torchrun job resumes by
itself. SIGTERM, SIGINT and SIGUSR1 stop the run after a checkpoint (exit 143 / 130 / 0,
:mod:`sphereface_plus.engine.preempt`).
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Union

from data_prep.training_set import build_training_set, check_data_config
from eval.packs import check_pack_names, pack_paths
from eval.training_verifier import training_verifier
from sphereface_plus.config import config_to_yaml, naming_recipe
from sphereface_plus.engine.checkpoint import load_checkpoint
from sphereface_plus.engine.device import resolve_device
from sphereface_plus.engine.dist import DistInfo, cleanup_distributed, explain_collective_failure, setup_distributed
from sphereface_plus.engine.preempt import Preemption
from sphereface_plus.engine.run_folder import RunFolder
from sphereface_plus.errors import MissingFileError, ToolkitError
from sphereface_plus.face.config import FaceConfig, load_config
from sphereface_plus.face.init_source import start_from
from sphereface_plus.face.resolve import DataFacts, Resolved, resolve
from sphereface_plus.face.trainer import FaceTrainer
from sphereface_plus.utils import atomic_write_text, is_rank0

logger = logging.getLogger(__name__)

HELP = "train a SphereFace / SphereFace+ model from a YAML recipe (key=value overrides)"
DESCRIPTION = __doc__

__all__ = ["HELP", "add_arguments", "run", "train", "load_train_config", "resolve_recipe", "make_trainer"]


def resolve_recipe(cfg: FaceConfig) -> Resolved:
    """The recipe resolved once (:func:`~sphereface_plus.face.resolve.resolve`) after the data section is
    checked by its owner (``data_prep``: source, template, root), with the network of ``train.init_from``'s
    checkpoint when there is one (:mod:`sphereface_plus.face.init_source`); nothing is built."""
    cfg, init = start_from(cfg)
    return resolve(cfg, DataFacts(check_data_config(cfg.data)), init)


def load_train_config(path: Optional[str] = None, overrides=()) -> FaceConfig:
    """The recipe (:func:`sphereface_plus.face.config.load_config`) with the checks that belong to
    ``data_prep`` (data source, template, root) and ``eval`` (pack names)."""
    cfg = load_config(path, overrides)
    with naming_recipe(path):  # train.init_from's file is checked when the run starts
        resolve(cfg, DataFacts(check_data_config(cfg.data)))
        check_pack_names(cfg.eval.packs, "eval.packs")
    return cfg


def make_trainer(cfg: Union[FaceConfig, Resolved], dist: Optional[DistInfo] = None) -> FaceTrainer:
    """A :class:`FaceTrainer` of ``cfg`` (a recipe, resolved here, or an already resolved one) with its training
    set and verifier, on one process unless ``dist`` says otherwise (tests, the demo, benches)."""
    resolved = cfg if isinstance(cfg, Resolved) else resolve_recipe(cfg)
    cfg = resolved.config
    dist = dist or DistInfo(device=resolve_device(cfg.train.device, setting="train.device"))
    dataset = build_training_set(cfg, dist)
    return FaceTrainer(resolved, dataset, dist, verifier=training_verifier(cfg, dataset))


def train(cfg: Union[FaceConfig, Dict[str, Any], str, Path], resume: Optional[str] = None, overrides=()) -> Dict[str, Any]:
    """Run a training job from Python; returns the summary dict (also written to ``out_dir/summary.json``).

    ``cfg``: a FaceConfig, a nested dict, or a YAML path (``overrides`` are ``key=value`` strings applied on
    top). ``resume``: None, ``"auto"`` or a checkpoint path. Works under torchrun as well.

    The summary: ``out_dir``, ``checkpoint`` (path of ``last.pt``), ``iteration``, ``final`` (the last
    logged ``loss``/``ce``/``mhe``/``acc``/``lambda``/``lr``/``images_per_s``), ``history`` (one such
    dict per ``train.log_every`` iterations, also in ``metrics.jsonl``), ``eval`` (the last verification
    report or None), ``bad_images`` (the dataset's ``[{"path", "reason"}]``), ``bad_reads`` (reads replaced
    by the next readable sample), ``skipped_steps``, ``rollbacks``, ``lambda``, ``num_classes``,
    ``images_per_s`` (mean after a warm-up of a few steps, training time only) and ``precision`` (the one
    used: fp32 | bf16 | fp16).
    """
    if isinstance(cfg, (str, Path)):
        cfg = load_config(str(cfg), overrides)
    elif isinstance(cfg, dict):
        cfg = FaceConfig.from_dict(cfg)
    # the input files the run names, checked before anything is written (the synthetic source writes its cache
    # under out_dir): checkpoints that pass their checksum, standard packs that exist
    if resume not in (None, "auto"):
        if not Path(resume).is_file():
            raise MissingFileError(f"--resume {resume}: no such file; give an existing checkpoint (<out_dir>/"
                                   "checkpoints/last.pt of a run) or --resume auto")
        load_checkpoint(resume)
    cfg, init = start_from(cfg)  # train.init_from's network, its input convention and weights, read once
    resolved = resolve(cfg, DataFacts(check_data_config(cfg.data)), init)  # once, before anything is built
    cfg = resolved.config  # what is built from here on: the values in force (the template of train.init_from's model)
    if cfg.eval.packs:
        pack_paths(cfg.eval.pack_dir, check_pack_names(cfg.eval.packs, "eval.packs"), where="eval.pack_dir")
    dist = setup_distributed(cfg.train.device, cfg.train.dist_timeout)
    trainer = None
    try:
        # one run per folder (lock, refusal, elastic restart), output locations checked, and SIGTERM / SIGINT /
        # SIGUSR1 stop after a checkpoint (docs/robustness.md)
        with RunFolder(cfg.out_dir, resume, command=" ".join(sys.argv), is_main=dist.is_main,
                       distributed=dist.distributed, subfolders=("checkpoints", "eval", "tb"),
                       resume_hint="--resume auto") as run, Preemption() as stop:
            dataset = build_training_set(cfg, dist)
            trainer = FaceTrainer(resolved, dataset, dist, verifier=training_verifier(cfg, dataset))
            trainer.preemption = stop
            if run.resume:
                trainer.resume(run.resume)  # refused before anything is written when the settings changed
            if dist.is_main:
                atomic_write_text(Path(cfg.out_dir) / "config.yaml", config_to_yaml(resolved.config))
            try:
                return trainer.fit()
            except RuntimeError as exc:
                failure = explain_collective_failure(exc, trainer.heartbeat, cfg.train.dist_timeout, dist.rank) \
                    if dist.distributed and not isinstance(exc, ToolkitError) else None
                if failure is None:
                    raise
                raise failure from None
    finally:
        # the trainer's DDP wrapper and sharded head hold the process group: let them go first, so the
        # group's C++ threads end inside destroy_process_group and not at interpreter exit, in no fixed
        # order ("terminate called without an active exception", SIGABRT, seen under torchrun)
        trainer = None
        gc.collect()
        cleanup_distributed()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML recipe (configs/face/*.yaml); omitted: the built-in defaults")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue a run: 'auto' = the newest readable checkpoint in <out_dir>/checkpoints, "
                             "or a file; refused when the settings changed (other than iterations, cadences, paths, "
                             "workers). Without it a folder that already holds a run is refused; under torchrun an "
                             "elastic restart resumes by itself. SIGTERM / SIGINT / SIGUSR1 stop after a checkpoint "
                             "(exit 143 / 130 / 0; docs/robustness.md)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. train.batch_size=256 optim.milestones=[10,20]")


def run(args: argparse.Namespace) -> int:
    """The command; a :class:`~sphereface_plus.errors.ToolkitError` is turned into one ``error:`` line
    by the caller (:func:`sphereface_plus.cli.main`, or :func:`sphereface_plus.cli.run_guarded`)."""
    cfg = load_config(args.config, args.overrides)
    if args.print_config:  # the values in force: the head's defaults, the input size of the template
        with naming_recipe(args.config):  # a data section its owner refuses is traced to the recipe
            if cfg.train.init_from and not Path(cfg.train.init_from).is_file():  # read before its first stage ran
                print(f"note: train.init_from {cfg.train.init_from} does not exist yet; the model section shown is "
                      "the recipe's (a run takes the checkpoint's)", file=sys.stderr)
                resolved = resolve(cfg, DataFacts(check_data_config(cfg.data)))
            else:
                resolved = resolve_recipe(cfg)
        print(config_to_yaml(resolved.config), end="")
        return 0
    summary = train(cfg, resume=args.resume)
    if summary["final"] and is_rank0():
        f = summary["final"]
        verified = f", verification {summary['eval']['mean_accuracy']:.4f}" if summary["eval"] else ""
        print(f"trained {summary['iteration']} iterations: loss {f['loss']:.4f}, acc {f['acc']:.4f}, "
              f"lambda {summary['lambda']:.4g}{verified}; checkpoint {summary['checkpoint']}")
    return 0
