"""The MHE-GAN trainer (wy1iu/MHE ``MHE-GAN/{sn,non-sn}-model/train.py``), on the engine's one loop.

The networks, losses, MHE term, steps and FID/KID are the library's (:mod:`sphereface_plus.gan`); the
engine supplies the loop (:class:`~sphereface_plus.engine.loop.Loop`: cadences, the non-finite guard,
checkpoints, preemption), the resumable sampler (CIFAR batch order, a fresh permutation per epoch of
``floor(N / batch)`` batches, wrapping around), per-iteration noise generators of ``(seed, stream,
iteration)`` and the metrics files. The images come from outside (the command reads them with
``data_prep.cifar``).

Per iteration, as the original: a G step on fresh noise, then a D step on the next real batch and fresh
noise (:func:`sphereface_plus.gan.steps.train_iteration`). Each evaluation (iteration 0 before any update,
every ``eval_every``, and after the last) writes one ``metrics.jsonl`` row (``iteration``, ``d_loss``,
``g_loss`` and ``mhe`` as means over the iterations since the previous evaluation (at iteration 0: the
losses on the first batch at the initial weights), ``fid``, ``kid``, ``kid_std``, ``elapsed_s``) and
``samples_<iteration>.png`` (64 images of the fixed seed-1337 noise, G in eval mode). FID/KID use
``eval_samples`` images of G (eval-mode BN, noise seed 0, as the original's 50k) against the CIFAR splits of
``real_stats`` (their statistics cached under ``stats_cache``); ``real_stats: test,train`` scores the same
samples (one Inception pass) against both, the second split's scores as ``fid_train``, ``kid_train``,
``kid_std_train``.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import numpy as np
import torch

from sphereface_plus.config import config_to_yaml, resumable_keys, stored_config_as_read
from sphereface_plus.engine import checkpoint as ckpt
from sphereface_plus.engine.loop import Cadence, Loop, StepOutcome, Task
from sphereface_plus.engine.precision import autocast
from sphereface_plus.engine.run_log import MetricsLogger, open_tensorboard
from sphereface_plus.engine.sampler import ResumableSampler, derive_seed, step_generator
from sphereface_plus.gan import losses as gan_losses
from sphereface_plus.gan import steps
from sphereface_plus.gan.config import GanConfig
from sphereface_plus.gan.models import Discriminator, Generator
from sphereface_plus.utils import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["GanTrainer"]


class GanTrainer(Task):
    """One MHE-GAN variant: G, D, their Adam optimisers, the evaluation's Inception statistics.

    ``train_images``: the CIFAR-10 training images (``N x 32 x 32 x 3`` uint8); ``real_images``: split name ->
    the images of ``cfg.real_stats``'s splits (their Inception statistics are computed once and cached);
    ``precision``: a resolved one; ``inception_weights``: the 1008-class logits for the true Inception Score.
    """

    resume_hint = "rerun the same command with --resume"

    def __init__(self, cfg: GanConfig, train_images: np.ndarray, real_images: Dict[str, np.ndarray], out_dir,
                 device: torch.device, precision: str = "fp32", inception_weights: Optional[str] = None,
                 stop_after: Optional[int] = None, preemption=None):
        from sphereface_plus.gan.inception_metrics import InceptionPool3, is_logit_weight, real_stats

        self.cfg, self.out, self.device, self.precision = cfg, Path(out_dir), device, precision
        self.is_weight = is_logit_weight(inception_weights) if inception_weights is not None else None
        self.extractor, self.rstats = None, {}
        if cfg.eval_samples > 0:
            self.extractor = InceptionPool3(device=device)
            for split in cfg.real_splits:
                real = real_images[split][: cfg.real_limit] if cfg.real_limit else real_images[split]
                self.rstats[split] = real_stats(real, self.extractor, Path(cfg.stats_cache).expanduser())
        self.train_t = torch.from_numpy(train_images)
        self.sampler = ResumableSampler(self.train_t.shape[0], cfg.batch_size, cfg.iterations, seed=cfg.seed,
                                        flip=False, drop_last=True, epoch_seed=lambda e: derive_seed(cfg.seed, 1, e))
        torch.manual_seed(cfg.seed)
        self.G, self.D = Generator().to(device), Discriminator(spectral_norm=cfg.sn).to(device)
        self.opt_g, self.opt_d = steps.make_optimizers(self.G, self.D, cfg.lr, (cfg.beta1, cfg.beta2))
        self.reg = cfg.mhe_regularizer(self.D)  # another objective of the family on D; None for MHE's own term
        self.sample_z = steps.fixed_noise(device=device)
        self.iteration = 0
        self.logger: Optional[MetricsLogger] = None
        self._log_state: Optional[Dict[str, Any]] = None
        self._writer = None
        self.loop = Loop(self, Cadence(iterations=cfg.iterations, checkpoint_every=cfg.eval_every,
                                       eval_every=cfg.eval_every, eval_at_start=True),
                         self.out, preemption=preemption, nan_policy="stop", desc=cfg.variant, stop_after=stop_after,
                         divergence_fix="lower lr or use precision=fp32")

    def init_from(self, state: Dict[str, Any], source: str, with_discriminator: bool = True) -> None:
        """Start from a checkpoint's ``generator`` (and ``discriminator``): a GAN run's, or one written by
        ``sphereface-plus import --from mhe-gan``."""
        self.G.load_state_dict(state["generator"])
        if with_discriminator and "discriminator" in state:
            self.D.load_state_dict(state["discriminator"])
        log.info("initialised from %s (iteration %s)", source, state.get("iteration"))

    # ------------------------------------------------------------------ the task
    def _batch(self, it: int):
        real = steps.images_to_tensor(self.train_t[self.sampler.batch_indices(it)].numpy(), self.device)
        gen = step_generator(self.cfg.seed, 2, it)
        z_g = torch.randn(real.shape[0], self.G.z_dim, generator=gen).to(self.device)
        z_d = torch.randn(real.shape[0], self.G.z_dim, generator=gen).to(self.device)
        return real, z_g, z_d

    def batches(self, start: int, restarts: int) -> Iterable[Any]:
        return (self._batch(it) for it in range(start, self.cfg.iterations))

    def step(self, batch) -> StepOutcome:
        cfg = self.cfg
        real, z_g, z_d = batch
        with autocast(self.device, self.precision):
            vals = steps.train_iteration(self.G, self.D, self.opt_g, self.opt_d, real, z_g, z_d, cfg.loss, cfg.mhe,
                                         cfg.mhe_power, cfg.mhe_half_space, self.reg)
        vals = {k: float(v) for k, v in vals.items()}
        self.iteration += 1
        self.logger.scalars(self.iteration, "train", **vals)
        bad = [k for k, v in vals.items() if not math.isfinite(v)]
        return StepOutcome(not bad, vals, message=f"{cfg.variant}: {bad[0]} became {vals[bad[0]]}" if bad else "")

    def initial_values(self) -> Dict[str, float]:
        """d_loss, g_loss and mhe at the initial weights on the first batch (nothing updated: BN and u restored)."""
        cfg, G, D = self.cfg, self.G, self.D
        real, z_g, z_d = self._batch(0)
        d_fn, g_fn = gan_losses.adversarial_losses(cfg.loss)
        g_state, d_state = copy.deepcopy(G.state_dict()), copy.deepcopy(D.state_dict())
        with torch.no_grad():
            G.train()
            g_loss = g_fn(D(G(z_g)))
            fake = G(z_d)
            d_loss = d_fn(D(real), D(fake))
            mhe = gan_losses.gan_mhe_loss(D, cfg.mhe, kernel=cfg.mhe_power, half_space=cfg.mhe_half_space,
                                          regularizer=self.reg)
        G.load_state_dict(g_state)
        D.load_state_dict(d_state)
        return {"d_loss": float(d_loss), "g_loss": float(g_loss), "mhe": float(mhe)}

    def evaluate(self, iteration: int, means: Dict[str, float]) -> None:
        from sphereface_plus.gan.inception_metrics import compare_stats, feature_stats, inception_score

        cfg = self.cfg
        steps.save_grid(_samples(self.G, self.sample_z), self.out / f"samples_{iteration:07d}.png")
        scores: Dict[str, Any] = {}
        if self.extractor is not None:
            fake = steps.generate_images(self.G, cfg.eval_samples, device=self.device, show_progress=False)
            fs = feature_stats(self.extractor(fake, desc="fake features"))
            for i, (split, rs) in enumerate(self.rstats.items()):
                r = compare_stats(rs, fs)
                suffix = "" if i == 0 else f"_{split}"
                scores.update({f"fid{suffix}": r["fid"], f"kid{suffix}": r["kid"], f"kid_std{suffix}": r["kid_std"]})
            if self.is_weight is not None:  # the 1008-class TF-2015 logits: the real Inception Score
                scores["inception_score"], scores["inception_score_std"] = inception_score(fs.features, self.is_weight)
        row = self.logger.log(iteration, **means, **scores, elapsed_s=round(self.loop.elapsed(), 3))
        self.logger.flush()
        log.info("%s iteration %d: %s", cfg.variant, iteration, row)

    def open(self, bar, start: int) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.yaml", config_to_yaml(self.cfg))
        self._writer = open_tensorboard(self.out / "tb", purge_step=start)
        self.logger = MetricsLogger(self.out, jsonl="metrics.jsonl", writer=self._writer, tb_prefix="eval", bar=bar,
                                    postfix=("d_loss", "g_loss", "fid"))
        if self._log_state is not None:
            self.logger.load_state_dict(self._log_state)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.G.state_dict(), "discriminator": self.D.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "iteration": self.iteration,
                "config": self.cfg.to_dict(), "log": self.logger.state_dict(),
                "mhe_state": self.reg.state_dict() if self.reg is not None else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.G.load_state_dict(state["generator"])
        self.D.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.iteration = int(state["iteration"])
        if self.reg is not None and state.get("mhe_state") is not None:  # projections, poles, inner optimisers
            self.reg.load_state_dict(state["mhe_state"])
        self._log_state = state["log"]
        if self.logger is not None:
            self.logger.load_state_dict(state["log"])

    # ------------------------------------------------------------------ the run
    def resume(self, resume: bool) -> None:
        # a checkpoint of an earlier release lacks the settings added since: compared at their defaults
        found = ckpt.resume_run_state(self.out, resume, self.cfg.to_dict(), resumable_keys(GanConfig),
                                      view=lambda c: stored_config_as_read(c, GanConfig))
        if found:
            self.loop.restore(found[1])
            log.info("resuming %s from iteration %d", self.out, self.iteration)

    def train(self) -> Dict[str, Any]:
        """Train; returns ``{"rows", "out", "iterations", "elapsed_s", "stopped"}``."""
        run = self.loop.run()
        return {"rows": self.logger.rows, "out": str(self.out), "iterations": run["iterations"],
                "elapsed_s": round(run["elapsed_s"], 1), "stopped": run["stopped"]}

    def evaluate_once(self, iteration: int) -> Dict[str, Any]:
        """Score the generator once (FID/KID, sample grid: one metrics row); no training, no checkpoint."""
        self.open(None, iteration)
        try:
            self.evaluate(iteration, {})
        finally:
            self.close()
        return {"rows": self.logger.rows, "out": str(self.out), "iterations": iteration,
                "elapsed_s": round(self.loop.elapsed(), 1), "stopped": False}


def _samples(G, z: torch.Tensor) -> torch.Tensor:
    """G(z) in eval mode (BN running averages), G's mode restored."""
    was = G.training
    G.eval()
    with torch.inference_mode():
        x = G(z)
    G.train(was)
    return x
