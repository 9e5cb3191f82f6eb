"""``sphereface-plus train``: train SphereFace / SphereFace+ from a YAML recipe (Liu et al., CVPR 2017 and NeurIPS 2018).

    sphereface-plus train --config configs/sphereface20_casia.yaml data.root=casia-112x96
    torchrun --nproc_per_node=2 -m sphereface_plus.apps.train --config configs/sphereface20_casia.yaml ...
    sphereface-plus train --config configs/cpu_smoke.yaml out_dir=runs/smoke --resume auto

This runner builds what the library's :class:`~sphereface_plus.trainer.Trainer` receives: the training
set (``data_prep.datasets``) and, with ``eval.pairs``, a verifier (``eval.lfw.pairs_verifier``); then it
resumes (when asked), writes ``<out_dir>/config.yaml`` (the resolved config, with the head settings and
input size in force) and runs the loop. From Python: ``train(cfg, resume=None, overrides=())``.

The run folder follows the engine's one policy (:mod:`sphereface_plus.engine.run_folder`, issue 20): a
folder that already holds a run is refused without ``--resume auto|PATH``, a second run into a busy
folder is refused by its lock, and an elastic restart of the torchrun job resumes by itself. SIGTERM,
SIGINT and SIGUSR1 stop the run after a checkpoint (exit 143 / 130 / 0,
:mod:`sphereface_plus.engine.preempt`); see docs/robustness.md.
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from data_prep.datasets import build_train_dataset, check_data_config
from eval.lfw import pairs_verifier
from eval.packs import check_pack_names, pack_paths, packs_verifier
from sphereface_plus.config import Config, ConfigError, config_to_yaml, load_config, naming_recipe
from sphereface_plus.engine.device import resolve_device
from sphereface_plus.engine.checkpoint import load_checkpoint
from sphereface_plus.engine.dist import DistInfo, cleanup_distributed, explain_collective_failure, setup_distributed
from sphereface_plus.engine.preempt import Preemption
from sphereface_plus.engine.run_folder import RunFolder
from sphereface_plus.errors import MissingFileError, ToolkitError
from sphereface_plus.trainer import Trainer
from sphereface_plus.utils import atomic_write_text, is_rank0, setup_logging

logger = logging.getLogger(__name__)

HELP = "train a SphereFace / SphereFace+ model from a YAML recipe (key=value overrides)"
DESCRIPTION = __doc__

__all__ = ["HELP", "add_arguments", "run", "main", "train", "load_train_config", "build_dataset", "build_verifier", "make_trainer",
           "synthetic_cache"]


def load_train_config(path: Optional[str] = None, overrides=()) -> Config:
    """:func:`sphereface_plus.config.load_config` plus the data checks that belong to ``data_prep`` and the
    pack names that belong to ``eval``."""
    cfg = load_config(path, overrides)
    with naming_recipe(path):
        _check_data(cfg)
        check_pack_names(cfg.eval.packs, "eval.packs")
    return cfg


def _check_data(cfg: Config):
    size = list(check_data_config(cfg.data))
    if cfg.model.input_size is not None and list(cfg.model.input_size) != size:
        raise ConfigError(f"model.input_size={cfg.model.input_size} does not match data.template={cfg.data.template!r} "
                          f"(crops of that template are {size}); leave model.input_size unset, it follows from the template")
    return size


def synthetic_cache(cfg: Config) -> Path:
    """Where the synthetic identities are generated and aligned (``data.synthetic.cache_dir``)."""
    return Path(cfg.data.synthetic.cache_dir) if cfg.data.synthetic.cache_dir else Path(cfg.out_dir) / "synthetic"


def build_dataset(cfg: Config, dist: DistInfo):
    """The training set of ``cfg.data`` at the template's crop size (rank 0 prepares it first)."""
    size = check_data_config(cfg.data)
    # rank 0 generates / indexes first (the synthetic set is written once), the others then read it
    if dist.distributed and not dist.is_main:
        torch.distributed.barrier()
    ds = build_train_dataset(cfg.data, size, synthetic_cache(cfg))
    if dist.distributed and dist.is_main:
        torch.distributed.barrier()
    logger.info("training set: %d images of %d identities (%s)", len(ds), ds.num_classes, cfg.data.source)
    bad = list(getattr(ds, "bad_images", []))
    if bad:  # issue 10 case 5: named at start-up (and in summary.json), never trained on
        logger.warning("%d bad training image(s) skipped: %s", len(bad),
                       "; ".join(f"{b['path']} ({b['reason']})" for b in bad))
    return ds


def build_verifier(cfg: Config):
    """The verifier of ``eval.packs`` (standard packs in ``eval.pack_dir``, insightface's protocol), or the
    LFW-style one of ``eval.pairs`` / ``eval.root`` (``auto``: the synthetic set's own pairs), or None."""
    if cfg.eval.packs:
        return packs_verifier(cfg.eval.pack_dir, cfg.eval.packs, input_size=check_data_config(cfg.data),
                              batch_size=cfg.eval.batch_size)
    pairs, root = cfg.eval.pairs, cfg.eval.root
    if not pairs:
        return None
    if pairs == "auto":  # the synthetic set's own person-disjoint pairs, on its aligned crops, if any
        if cfg.data.source != "synthetic":
            logger.info("eval.pairs=auto: no synthetic pairs, no verification during training (give "
                        "eval.pairs=<pairs.txt> eval.root=<crops> to verify on your own pairs)")
            return None
        cache = synthetic_cache(cfg)
        pairs, root = str(cache / "raw" / "pairs.txt"), str(cache / "aligned")
    return pairs_verifier(pairs, root, batch_size=cfg.eval.batch_size)


def check_inputs(cfg: Config, resume: Optional[str] = None) -> None:
    """The input files named by the run that nothing else checks before writing: ``--resume PATH`` and
    ``train.init_from`` must exist (issue 10 case 2: one error line, and no out_dir left behind), and so must
    the packs of ``eval.packs``."""
    files = {"--resume": resume if resume and resume != "auto" else "", "train.init_from": cfg.train.init_from}
    for what, path in files.items():
        if path and not Path(path).is_file():
            raise MissingFileError(f"{what} {path}: no such file; give an existing checkpoint "
                                   f"(<out_dir>/checkpoints/last.pt of a run){' or --resume auto' if what == '--resume' else ''}")
        if path:  # issue 20: a file that is not a checkpoint (or fails its checksum) is refused now, not later
            load_checkpoint(path)
    if cfg.eval.packs:  # names, then eval.pack_dir/<name>.bin for each
        pack_paths(cfg.eval.pack_dir, check_pack_names(cfg.eval.packs, "eval.packs"), where="eval.pack_dir")


def make_trainer(cfg: Config, dist: Optional[DistInfo] = None) -> Trainer:
    """A :class:`Trainer` with the dataset and verifier of ``cfg`` (one process unless ``dist`` says otherwise)."""
    dist = dist or DistInfo(device=resolve_device(cfg.train.device, setting="train.device"))
    return Trainer(cfg, build_dataset(cfg, dist), dist, verifier=build_verifier(cfg))


def train(cfg: Union[Config, Dict[str, Any], str, Path], resume: Optional[str] = None, overrides=()) -> Dict[str, Any]:
    """Run a training job from Python; returns the summary dict (also written to ``out_dir/summary.json``).

    ``cfg``: a Config, a nested dict, or a YAML path (``overrides`` are ``key=value`` strings applied on
    top). ``resume``: None, ``"auto"`` or a checkpoint path. Works under torchrun as well.

    The summary: ``out_dir``, ``checkpoint`` (path of ``last.pt``), ``iteration``, ``final`` (the last
    logged ``loss``/``ce``/``mhe``/``acc``/``lambda``/``lr``/``images_per_s``), ``history`` (one such
    dict per ``train.log_every`` iterations, also in ``metrics.jsonl``), ``eval`` (the last verification
    report of ``eval.lfw.verify_on_pairs`` or None), ``bad_images`` (the dataset's ``[{"path", "reason"}]``),
    ``bad_reads`` (reads replaced by the next readable sample), ``skipped_steps``, ``rollbacks``, ``lambda``,
    ``num_classes``, ``images_per_s`` (mean after a warm-up of a few steps, training time only) and
    ``precision`` (the one used: fp32 | bf16 | fp16).
    """
    if isinstance(cfg, (str, Path)):
        cfg = load_train_config(str(cfg), overrides)
    elif isinstance(cfg, dict):
        cfg = Config.from_dict(cfg)
    _check_data(cfg)
    check_inputs(cfg, resume)  # before the dataset: the synthetic source writes its cache under out_dir
    dist = setup_distributed(cfg.train.device, cfg.train.dist_timeout)
    trainer = None
    try:
        # issue 20: one run per folder (lock, refusal, elastic restart), output locations checked, and
        # SIGTERM / SIGINT / SIGUSR1 stop after a checkpoint (docs/robustness.md)
        with RunFolder(cfg.out_dir, resume, command=" ".join(sys.argv), is_main=dist.is_main,
                       distributed=dist.distributed, subfolders=("checkpoints", "eval", "tb"),
                       resume_hint="--resume auto") as run, Preemption() as stop:
            trainer = make_trainer(cfg, dist)
            trainer.preemption = stop
            if run.resume:
                trainer.resume(run.resume)  # refused before anything is written when the settings changed
            if dist.is_main:
                atomic_write_text(Path(cfg.out_dir) / "config.yaml", config_to_yaml(cfg))
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
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml); omitted: the built-in defaults")
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
    cfg = load_train_config(args.config, args.overrides)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    summary = train(cfg, resume=args.resume)
    if summary["final"] and is_rank0():
        f = summary["final"]
        verified = f", verification {summary['eval']['mean_accuracy']:.4f}" if summary["eval"] else ""
        print(f"trained {summary['iteration']} iterations: loss {f['loss']:.4f}, acc {f['acc']:.4f}, "
              f"lambda {summary['lambda']:.4g}{verified}; checkpoint {summary['checkpoint']}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m sphereface_plus.apps.train`` / ``torchrun -m sphereface_plus.apps.train``: the same
    command, its errors one line and exit 2 through :func:`sphereface_plus.cli.run_guarded`."""
    from sphereface_plus.cli import run_guarded

    prog = "sphereface_plus.apps.train"
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    setup_logging()
    args = parser.parse_args(argv)
    return run_guarded(lambda: run(args), prog)


if __name__ == "__main__":
    from sphereface_plus.cli import exit_process

    exit_process(main())
