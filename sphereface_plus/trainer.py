"""The face trainer: one readable training loop for SphereFace / SphereFace+
(docs/theory.md#sphere-backbones to docs/theory.md#training-recipes).

This is library code: it receives its training set and an optional verifier from outside and imports
nothing from ``data_prep`` or ``eval`` (``tests/test_layering.py``). The command that builds them from
a config and runs the loop is :mod:`sphereface_plus.apps.train` (``sphereface-plus train``,
``torchrun -m sphereface_plus.apps.train``). The :class:`Trainer` exposes single steps (used by the
tests, the demo and ``bench/train_throughput.py``).

    trainer = Trainer(cfg, dataset, dist, verifier=None)   # dataset: len(), num_classes, input_size
    trainer.resume("auto")                                 # optional
    summary = trainer.fit()

Loss: ``head loss + mhe.lambda_m * classifier_mhe(head.weight, labels)`` (SphereFace+,
docs/theory.md#sphereface-plus). The head owns its loss (:class:`~sphereface_plus.heads.base.HeadOutput`:
softmax CE, a binary loss, auxiliary terms); the trainer adds only the MHE term and logs the head's
``terms`` (``ce``, A-Softmax's ``lambda``, ...) as they come. Each step: the backbone forward under autocast
in ``train.precision`` (:mod:`sphereface_plus.engine.precision`: auto = bf16 where the CPU/GPU has native
bf16; the head, the losses and MHE always in float32, since cos(m theta) polynomials lose too much in
16 bits), backward, optional gradient clipping, SGD step, one scheduler step. A non-finite loss skips
the update; ``train.nan_patience`` of them in a row roll the run back to the last checkpoint with a
new data order (A-Softmax is known to diverge now and then; this replaces "kill and restart by hand").

``head.parallel=sharded`` (issue 13): :class:`ShardedFaceModel` replaces :class:`FaceTrainModel`; the
classifier's rows are split over the ranks (:mod:`sphereface_plus.parallel`), only the backbone is in
DDP, and checkpoints still hold the whole head, so a run resumes on any number of processes.
"""
from __future__ import annotations

import copy
import io
import logging
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sphereface_plus.config import Config, ConfigError, stored_config_as_read
from sphereface_plus.engine import checkpoint as ckpt
from sphereface_plus.engine.compile import resolve_compile
from sphereface_plus.engine.device import resolve_device
from sphereface_plus.engine.dist import DistInfo, Heartbeat, all_reduce_sum
from sphereface_plus.engine.preempt import Preemption, preempted
from sphereface_plus.engine.run_log import MetricsLogger, RunningMeans, open_tensorboard
from sphereface_plus.errors import TrainingDiverged
from sphereface_plus.engine.optim import build_optimizer, build_scheduler
from sphereface_plus.engine.precision import autocast, resolve_precision
from sphereface_plus.engine.sampler import ResumableSampler
from sphereface_plus.heads import HeadOutput, create_head, head_parameters
from sphereface_plus.mhe import ClassifierMHE, classifier_mhe
from sphereface_plus.models import backbone_from_config
from sphereface_plus.parallel import (ShardedClassifier, gather_head_state, gather_optimizer_state, load_head_state,
                                      shard_optimizer_state, sharded_classifier_mhe)
from sphereface_plus.utils import atomic_write_json, progress, safe_torch_load

logger = logging.getLogger(__name__)

__all__ = ["RESUMABLE_CHANGES", "TRAINER_HEAD_SETTINGS", "Trainer", "FaceTrainModel", "ShardedFaceModel",
           "head_kwargs", "head_settings", "saved_settings_in_force"]

#: steps left out of summary.json's images_per_s (allocator, oneDNN and compile warm-up)
WARMUP_STEPS = 3

#: settings that may differ when a run is resumed: they change where and how fast, not what is computed
RESUMABLE_CHANGES = ("out_dir", "train.iterations", "train.device", "train.log_every", "train.tensorboard",
                     "train.compile", "data.root", "data.list_file", "data.num_workers", "data.synthetic.cache_dir",
                     "checkpoint.keep", "eval", "head.parallel",
                     # issue 20: cadences and the collective timeout (a preempted run may save more often)
                     "checkpoint.every", "train.dist_timeout")

#: largest magnitude of a weight or optimiser value a checkpoint may hold (issue 20). Trained face networks
#: have weights of order 1 (weight decay; the A-Softmax rows are normalised); a run whose weights reach
#: 1e6 has diverged even while its loss is still finite (lr=5 reaches 1e17 before the first NaN), and a
#: checkpoint of it would only be rolled back to and diverge again.
HEALTHY_BOUND = 1e6

#: ``head`` settings that belong to the trainer (the classifier's layout), never passed to the head
TRAINER_HEAD_SETTINGS = ("name", "parallel", "sample_rate")

Verifier = Callable[..., Dict[str, Any]]  # (backbone, device, precision=..., channels_last=...) -> report


def head_settings(head_cfg) -> Dict[str, Any]:
    """The ``head`` settings given for the head itself (not :data:`TRAINER_HEAD_SETTINGS`, not None)."""
    return {k: v for k, v in head_cfg.settings.items() if v is not None}


def head_kwargs(head_cfg) -> Dict[str, Any]:
    """Constructor arguments of the head: only the settings that were set, so each head keeps its own
    defaults for the others (config.HeadConfig)."""
    return dict(head_settings(head_cfg))


def build_head(head_cfg, in_features: int, num_classes: int, seed: int = 0) -> nn.Module:
    """The registered head with :func:`head_kwargs`, its rows drawn by the world-size-independent
    ``init_rows_(seed)`` (the same classifier a sharded run starts from), the default RNG left as it
    was; ``head_cfg`` is filled with the values in force."""
    kwargs = head_kwargs(head_cfg)
    try:
        with torch.random.fork_rng(devices=[]):
            head = create_head(head_cfg.name, in_features=in_features, num_classes=num_classes, **kwargs)
    except TypeError as exc:  # a setting the head does not take (config validation reports it earlier)
        raise ConfigError(f"head.name={head_cfg.name!r} does not take {sorted(kwargs)} ({exc}); remove the "
                          f"setting or choose another head") from None
    head.init_rows_(seed)
    _record_head_settings(head_cfg, head)
    return head


def saved_settings_in_force(config: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint's config with its ``head`` section as the values in force: ``None`` entries dropped
    and the head's defaults filled in for settings it does not list. A checkpoint written before the
    heads owned their settings (every head's keys, ``None`` where unset) then compares equal to the same
    run's config today (``check_settings`` on resume); so does one written before a setting was added or
    renamed (:func:`~sphereface_plus.config.stored_config_as_read`)."""
    if isinstance(config, dict):  # settings renamed or added since the checkpoint was written
        config = stored_config_as_read(config)
    head = config.get("head") if isinstance(config, dict) else None
    if not isinstance(head, dict) or head.get("name") is None:
        return config
    try:
        params = head_parameters(head["name"])
    except KeyError:  # a head this toolkit no longer has: compared as saved (and reported)
        return config
    head = {k: v for k, v in head.items() if v is not None}
    for name, p in params.items():
        if name not in head and isinstance(p.default, (bool, int, float, str)):
            head[name] = p.default
    return {**config, "head": head}


def _record_head_settings(head_cfg, head: nn.Module) -> None:
    """Write the head's settings in force back into ``head_cfg`` (config.yaml and checkpoints show them):
    each constructor argument the head keeps as an attribute of a plain type, else the value given, else
    the constructor's default (the softmax head's ``bias`` setting, whose attribute is the parameter)."""
    for name, p in head_parameters(head_cfg.name).items():
        value = getattr(head, name, None)
        if not isinstance(value, (bool, int, float, str)):
            value = head_cfg.settings.get(name, p.default)
        if isinstance(value, (bool, int, float, str)):
            setattr(head_cfg, name, value)


def _head_precision(t: torch.Tensor) -> torch.Tensor:
    """The head, the losses and MHE run in float32 whatever the backbone's autocast (cos(m theta)
    polynomials lose too much in 16 bits), or in float64 in the float64 reference mode."""
    return t if t.dtype == torch.float64 else t.float()


class FaceTrainModel(nn.Module):
    """Backbone + classifier head + the SphereFace+ MHE term, as one module (what DDP wraps).

    ``forward(images, labels) -> (HeadOutput, mhe 0-dim)``, ``mhe`` the unweighted classifier energy;
    the trainer's loss is ``out.loss + lambda_m * mhe`` (the one place lambda_M is applied). The MHE
    term is computed inside the forward so that DDP sees every use of ``head.weight`` in one graph.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, lambda_m: float = 0.0, mhe_power: str = "2",
                 mhe_mode: str = "batch_vs_all", mhe_variant: str = "mhe", mhe_term: Optional[ClassifierMHE] = None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.lambda_m, self.mhe_power, self.mhe_mode = float(lambda_m), str(mhe_power), mhe_mode
        self.mhe_variant = mhe_variant  # sphereface_plus.mhe.MHE_VARIANTS
        self.mhe_term = mhe_term  # another objective of the family (docs/theory.md#classifier-family), or None

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        emb = self.backbone(images)
        with torch.autocast(images.device.type, enabled=False):
            out = self.head(_head_precision(emb), labels)
            if self.lambda_m > 0 and self.mhe_term is not None:
                mhe = self.mhe_term(_head_precision(self.head.weight), labels)
            elif self.lambda_m > 0:
                # no NaN check (a host sync every step): a non-finite weight gives a non-finite loss,
                # which the trainer's guard skips and, if it persists, rolls back
                mhe = classifier_mhe(_head_precision(self.head.weight), labels, power=self.mhe_power,
                                     mode=self.mhe_mode, check_finite=False, variant=self.mhe_variant)
            else:
                mhe = out.loss.new_zeros(())
        return out, mhe

    @torch.no_grad()
    def num_correct(self, out: HeadOutput, labels: torch.Tensor):
        """(correct, count) of this rank's batch."""
        return (out.logits.argmax(1) == labels).sum(), labels.numel()

    def state_terms(self) -> Dict[str, torch.Tensor]:
        """The head's schedule values in force (``ClassifierHead.state_terms``)."""
        return self.head.state_terms()

    def clip_grad_norm_(self, max_norm: float) -> None:
        nn.utils.clip_grad_norm_(self.parameters(), max_norm)


class ShardedFaceModel(nn.Module):
    """Backbone + a row-sharded classifier (:class:`~sphereface_plus.parallel.ShardedClassifier`) + the
    SphereFace+ MHE term of the whole classifier from the shards (issue 13).

    The same interface as :class:`FaceTrainModel`: ``forward(images, labels) -> (out, mhe)`` with
    ``out`` a :class:`~sphereface_plus.parallel.ShardedLogits` (``loss``, ``logits``, ``terms`` as a
    ``HeadOutput``), and :meth:`num_correct`, :meth:`state_terms`, :meth:`clip_grad_norm_`. Every value
    is the *global* batch's (the same on every rank). Only the backbone is data-parallel: the trainer
    wraps ``backbone`` alone in DDP and passes the wrapper to :meth:`forward`; ``head`` is the shard
    (parameters backbone first, head second, as :class:`FaceTrainModel`, so optimiser state dicts
    line up with a replicated run's). On one process the MHE term is the single-process
    ``classifier_mhe`` itself, so that a sharded run on one process is the replicated run.
    """

    def __init__(self, backbone: nn.Module, head: ShardedClassifier, lambda_m: float = 0.0, mhe_power: str = "2",
                 mhe_mode: str = "batch_vs_all", mhe_variant: str = "mhe"):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.lambda_m, self.mhe_power, self.mhe_mode = float(lambda_m), str(mhe_power), mhe_mode
        self.mhe_variant = mhe_variant  # sphereface_plus.mhe.MHE_VARIANTS

    def forward(self, images: torch.Tensor, labels: torch.Tensor, backbone: Optional[nn.Module] = None):
        emb = (backbone or self.backbone)(images)
        with torch.autocast(images.device.type, enabled=False):
            out = self.head(_head_precision(emb), labels)
            weight = _head_precision(self.head.weight)
            if self.lambda_m > 0 and self.head.world_size == 1:
                mhe = classifier_mhe(weight, out.labels, power=self.mhe_power, mode=self.mhe_mode, check_finite=False,
                                     variant=self.mhe_variant)
            elif self.lambda_m > 0:
                mhe = sharded_classifier_mhe(weight, out.labels, self.head.num_classes, self.mhe_power, self.mhe_mode,
                                             group=self.head.group, variant=self.mhe_variant)
            else:
                mhe = out.loss.new_zeros(())
        return out, mhe

    @torch.no_grad()
    def num_correct(self, out, labels: torch.Tensor):
        """(correct, count) of the global batch (every rank reports the same pair, so the mean over
        ranks that the stats reporter takes is this pair's ratio: nothing is counted twice)."""
        return self.head.num_correct(out), out.labels.numel()

    def state_terms(self) -> Dict[str, torch.Tensor]:
        return self.head.state_terms()

    def clip_grad_norm_(self, max_norm: float) -> None:
        """``clip_grad_norm_`` over the whole model: the backbone's gradients are the same on every rank
        (DDP), and so are the head's shared parameters'; the head's row blocks are disjoint, so the
        global squared norm is the replicated part's plus the all-reduced sum of the blocks'."""
        if self.head.world_size == 1:  # the replicated computation itself
            nn.utils.clip_grad_norm_(self.parameters(), max_norm)
            return
        replicated = [p.grad for p in list(self.backbone.parameters()) + self.head.shared_parameters()
                      if p.grad is not None]
        rows = [p.grad for p in self.head.row_parameters() if p.grad is not None]
        ref = (replicated + rows)[0]
        sq_rep = sum((g.detach().double().pow(2).sum() for g in replicated), ref.new_zeros((), dtype=torch.float64))
        sq_rows = sum((g.detach().double().pow(2).sum() for g in rows), ref.new_zeros((), dtype=torch.float64))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sq_rows, group=self.head.group)
        total = (sq_rep + sq_rows).sqrt()
        scale = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for g in replicated + rows:
            g.mul_(scale.to(g.dtype))


class _ShardedNet(nn.Module):
    """What the trainer calls when the head is sharded: the model with its DDP-wrapped backbone."""

    def __init__(self, model: ShardedFaceModel, backbone: nn.Module):
        super().__init__()
        self.model, self.backbone = model, backbone

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        return self.model(images, labels, backbone=self.backbone)


class Trainer:
    """Everything a run holds: model, optimiser, schedule, scaler, data order, counters; ``fit()`` runs it."""

    def __init__(self, cfg: Config, dataset, dist: Optional[DistInfo] = None, verifier: Optional[Verifier] = None):
        """``dataset``: a map-style dataset of ``(image, label, bad)`` indexed by ``(index, flip)``, with
        ``num_classes`` and ``input_size`` (H, W); ``verifier(backbone, device, precision=, channels_last=)
        -> report`` (a dict
        with ``mean_accuracy``, ``std_accuracy`` (or None) and ``compare_threshold``, optionally
        ``accuracies`` ``{set: accuracy}`` logged per set) or None."""
        self.cfg = cfg
        self.dist = dist or DistInfo(device=resolve_device(cfg.train.device, setting="train.device"))
        self.device = self.dist.device
        self.out_dir = Path(cfg.out_dir)
        self.dataset = dataset
        self.verifier = verifier
        input_size = [int(v) for v in dataset.input_size]
        if cfg.model.input_size is not None and list(cfg.model.input_size) != input_size:
            raise ConfigError(f"model.input_size={cfg.model.input_size} but the data are {input_size} crops "
                              f"(data.template={cfg.data.template!r}); leave model.input_size unset, it follows "
                              "from data.template")
        cfg.model.input_size = input_size  # the value in force, recorded in config.yaml and checkpoints
        _seed_everything(cfg.train.seed)  # after the data: initial weights depend on the seed alone
        self.sharded = cfg.head.parallel == "sharded"
        self.model = self.build_model(dataset.num_classes).to(self.device)
        # backbone precision (issue 14): only the backbone runs under autocast; head, losses and MHE
        # stay float32 (FaceTrainModel.forward). channels_last auto = on with bf16 on a CPU.
        self.precision = resolve_precision(cfg.train.precision, self.device, what="train.precision")
        self.channels_last = (cfg.model.channels_last if cfg.model.channels_last is not None
                              else self.precision == "bf16" and self.device.type == "cpu")
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        # train.float64: the reference mode (exact comparisons between layouts), float64 throughout
        self.dtype = torch.float64 if cfg.train.float64 else torch.float32
        self.model.to(dtype=self.dtype)
        logger.info("training precision %s (train.precision=%s)%s", self.precision, cfg.train.precision,
                    ", channels_last" if self.channels_last else "")
        if cfg.train.init_from:
            self._init_from(cfg.train.init_from)
        self.optimizer = build_optimizer([self.model], cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.iterations)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        # train.compile (auto: where the run repays the compilation, engine/compile.py); in place
        # (Module.compile): state_dict keys stay those of the plain backbone
        self.compiled = resolve_compile(cfg.train.compile, self.device, cfg.train.iterations)
        if self.compiled:
            self.model.backbone.compile()
        self.net: nn.Module = self.model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            if self.sharded:  # only the backbone is data-parallel; the head is split by rows
                self.net = _ShardedNet(self.model, nn.parallel.DistributedDataParallel(self.model.backbone, device_ids=ids))
            else:
                self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.iteration = 0
        self.rollbacks = 0
        self.bad_images = 0
        self.skipped_steps = 0
        self.threshold: Optional[float] = None  # cosine threshold of the latest verification
        self.best_accuracy: Optional[float] = None  # best verification mean so far (checkpoints/best.pt)
        self._streak = 0
        self._initial_state = ckpt.serialize(self._rank_state())
        # issue 20: the runner installs the signal handlers (``with Preemption() as p: trainer.preemption = p``);
        # fit() asks it after every step and stops with a checkpoint; the heartbeat names a silent rank
        self.preemption = Preemption()
        self._rollback_pending = False
        self.heartbeat = Heartbeat(self.dist.rank, self.dist.world_size)

    # ------------------------------------------------------------------ set-up helpers
    def build_model(self, num_classes: int) -> nn.Module:
        """Backbone + head + MHE term: the one place the network is made (a subclass may replace the head,
        e.g. by a sharded classifier). Fills ``cfg.head`` with the head settings in force."""
        cfg = self.cfg
        backbone = backbone_from_config(cfg.model)  # name, input size, embedding_dim and model.kwargs
        if self.sharded:
            clf = ShardedClassifier(cfg.head.name, cfg.model.embedding_dim, num_classes, head_kwargs(cfg.head),
                                    sample_rate=cfg.head.sample_rate, seed=cfg.train.seed,
                                    embedding_grad_scale=self.dist.world_size)
            _record_head_settings(cfg.head, clf.head)
            return ShardedFaceModel(backbone, clf, cfg.mhe.lambda_m, cfg.mhe.power, cfg.mhe.mode, cfg.mhe.variant)
        head = build_head(cfg.head, cfg.model.embedding_dim, num_classes, seed=cfg.train.seed)
        term = None if cfg.mhe.objective == "mhe" else ClassifierMHE(
            cfg.mhe.objective, cfg.mhe.power, cfg.mhe.mode, settings=cfg.mhe.settings(cfg.train.seed),
            coefficient=cfg.mhe.lambda_m)
        return FaceTrainModel(backbone, head, cfg.mhe.lambda_m, cfg.mhe.power, cfg.mhe.mode, cfg.mhe.variant, term)

    def _init_from(self, path: str) -> None:
        state = ckpt.load_checkpoint(path)
        self.model.backbone.load_state_dict(state["model"])
        if "head" not in state:  # an imported backbone without its classifier (sphereface-plus import)
            logger.info("initialised the backbone from %s; it has no head, the head starts from scratch", path)
            return
        self._load_head(state["head"], path)
        logger.info("initialised model and head from %s (iteration %s)", path, state.get("iteration"))

    @property
    def head(self) -> nn.Module:
        return self.model.head

    def head_terms(self) -> Dict[str, float]:
        """The head's schedule values in force (``state_terms``: A-Softmax's ``lambda``), as floats."""
        return {k: float(v) for k, v in self.model.state_terms().items()}

    def current_lambda(self) -> float:
        """A-Softmax's λ in force (NaN for a head without one): ``head_terms()['lambda']``."""
        return self.head_terms().get("lambda", float("nan"))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint's content. With a sharded head it is collective (every rank must call it) and
        its ``head`` / ``optimizer`` entries are whole (C x d, as a replicated run's) on rank 0 only."""
        return self._state(whole=True)

    def _rank_state(self) -> Dict[str, Any]:
        """This rank's state: :meth:`state_dict`, but a sharded head keeps its own rows (no collective;
        the rollback start state)."""
        return self._state(whole=False)

    def _state(self, whole: bool) -> Dict[str, Any]:
        if not self.sharded:
            head, optimizer = self.model.head.state_dict(), self.optimizer.state_dict()
        elif whole:
            head, optimizer = gather_head_state(self.model.head), gather_optimizer_state(self.optimizer, self.model.head)
        else:
            head, optimizer = self.model.head.head.state_dict(), self.optimizer.state_dict()
        state = {
            "model": self.model.backbone.state_dict(),
            "head": head,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.capture_rng(),
            "iteration": self.iteration,
            "rollbacks": self.rollbacks,
            "bad_images": self.bad_images,
            "skipped_steps": self.skipped_steps,
            "config": self.cfg.to_dict(),
        }
        if getattr(self.model, "mhe_term", None) is not None:  # the objective's projections / poles
            state["mhe_state"] = self.model.mhe_term.state_dict()
        if self.threshold is not None:  # docs/interfaces.md: used by `sphereface-plus compare`
            state["threshold"] = self.threshold
        if self.best_accuracy is not None:
            state["best_accuracy"] = self.best_accuracy
        if self.sharded and not whole:
            state["rank_rows"] = [self.model.head.start, self.model.head.end]
        return state

    def _load_head(self, head_state: Dict[str, Any], source: Any = "checkpoint") -> None:
        """A whole head state dict (any world size, sharded or replicated run) into this run's head."""
        if self.sharded:
            load_head_state(self.model.head, head_state, source=str(source))
        else:
            self.model.head.load_state_dict(head_state)

    def load_state_dict(self, state: Dict[str, Any], source: Any = "checkpoint") -> None:
        """Load a :meth:`state_dict` (whole head: from a run on any number of processes, sharded or
        replicated) or this rank's own :meth:`_rank_state`."""
        self.model.backbone.load_state_dict(state["model"])
        if state.get("rank_rows") is not None:  # this rank's own rows (the rollback start state)
            self.model.head.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
        elif self.sharded:
            self._load_head(state["head"], source)
            self.optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], self.optimizer, self.model.head,
                                                                 source=str(source)))
        else:
            self.model.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("mhe_state") is not None and getattr(self.model, "mhe_term", None) is not None:
            self.model.mhe_term.load_state_dict(state["mhe_state"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state["rng"])
        self.iteration = int(state["iteration"])
        self.rollbacks = int(state.get("rollbacks", 0))
        self.bad_images = int(state.get("bad_images", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.threshold = float(state["threshold"]) if state.get("threshold") is not None else None
        self.best_accuracy = float(state["best_accuracy"]) if state.get("best_accuracy") is not None else None

    def resume(self, resume: str) -> Optional[Path]:
        """``auto``: the newest readable checkpoint of ``out_dir`` (a fresh start when there is none); else a path.

        A checkpoint whose settings differ from this run's (other than :data:`RESUMABLE_CHANGES`) is
        refused (:func:`sphereface_plus.engine.checkpoint.check_settings`).
        """
        found = ckpt.resume_run_state(self.out_dir, resume, self.cfg.to_dict(), RESUMABLE_CHANGES,
                                      map_location=self.device, view=saved_settings_in_force,
                                      fix="use the original recipe and overrides, or another out_dir for the new settings")
        if found is None:
            logger.info("--resume auto: no checkpoint in %s, starting from scratch", ckpt.checkpoint_dir(self.out_dir))
            return None
        path, state = found
        self.load_state_dict(state, path)
        logger.info("resumed from %s at iteration %d (lambda %.4g)", path, self.iteration, self.current_lambda())
        return path

    def save(self) -> Optional[Path]:
        """Write the checkpoint (collective); None, writing nothing, when the state is not healthy.

        Checked before writing (issue 20): no step of a non-finite streak may be in a checkpoint (a
        rollback must land before the streak), and every weight and optimiser value must be finite and
        within :data:`HEALTHY_BOUND` (else fit() rolls back at once).
        """
        if not self._healthy():
            newest = ckpt.checkpoint_dir(self.out_dir) / "last.pt"
            logger.warning("iteration %d: not writing a checkpoint (%s); the newest one stays %s", self.iteration,
                           f"{self._streak} skipped step(s) in a row" if self._streak else
                           f"weights or optimiser values beyond {HEALTHY_BOUND:g} or non-finite",
                           newest if newest.is_file() else "the start state")
            return None
        path = None
        # a sharded head is gathered collectively: every rank builds the state, rank 0 writes it
        state = self.state_dict() if (self.sharded or self.dist.is_main) else None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(state, self.out_dir, self.cfg.checkpoint.every, self.cfg.checkpoint.keep)
        if self.dist.distributed:
            torch.distributed.barrier()  # nobody may read (rollback) a half-written file
        return path

    def _healthy(self) -> bool:
        """No skipped step since the last finite one, and every weight and optimiser value finite and within
        :data:`HEALTHY_BOUND` (all ranks agree)."""
        streak = self._streak > 0  # the same on every rank (the finite check is all-reduced)
        bad = False
        if not streak:  # NaN compares False, so this also catches non-finite values
            tensors = list(self.model.parameters()) + [v for st in self.optimizer.state.values() for v in st.values()
                                                       if torch.is_tensor(v) and v.is_floating_point()]
            bad = not all(bool((t.detach().abs() <= HEALTHY_BOUND).all()) for t in tensors)
        flag = torch.tensor(float(bad), device=self.device)
        if self.dist.distributed:  # a sharded head: each rank checked its own rows
            flag = all_reduce_sum(flag)
        if float(flag.item()) > 0:
            self._rollback_pending = True  # diverging with a finite loss: fit() rolls back now, on every rank
        return not streak and float(flag.item()) == 0.0

    def rollback(self) -> None:
        """Restore the newest checkpoint (or the start state) and change the data order."""
        found = ckpt.load_resume_state(self.out_dir, map_location=self.device)
        path = found[0] if found else None
        if found:
            state = found[1]
        else:  # no checkpoint yet: the state captured at start-up
            state = safe_torch_load(io.BytesIO(self._initial_state), map_location=self.device)
        failed_at, rollbacks = self.iteration, self.rollbacks + 1
        why = (f"{self.cfg.train.nan_patience} non-finite losses in a row" if self._streak else
               f"weights or optimiser values beyond {HEALTHY_BOUND:g} (or non-finite)")
        if rollbacks > self.cfg.train.max_rollbacks:
            raise TrainingDiverged(
                f"training diverged: {why} at iteration {failed_at} "
                f"after {self.rollbacks} rollbacks (the newest checkpoint, {path or 'none'}, is from before the "
                f"divergence); lower optim.lr (now {self.cfg.optim.lr:g}), lengthen optim.warmup_iters (now "
                f"{self.cfg.optim.warmup_iters}) or set optim.clip_grad_norm, then rerun with --resume auto"
            )
        self.load_state_dict(state)
        self.rollbacks = rollbacks
        self._streak = 0
        self._rollback_pending = False
        logger.warning("%s at iteration %d: rolled back to %s (iteration %d), "
                       "rollback %d of at most %d, new data order", why, failed_at,
                       path or "the start state", self.iteration, rollbacks, self.cfg.train.max_rollbacks)

    # ------------------------------------------------------------------ one step
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, Any]:
        """Forward, backward and (when the loss is finite) an SGD step; always advances one iteration."""
        self.net.train()
        images = images.to(self.device, dtype=self.dtype, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        if self.model.lambda_m > 0 and getattr(self.model, "mhe_term", None) is not None:  # its inner optimisers
            self.model.mhe_term.advance(_head_precision(self.model.head.weight), labels, self.optimizer.param_groups[0]["lr"])
        with autocast(self.device, self.precision):  # the head and MHE inside turn it off again
            out, mhe = self.net(images, labels)
        loss = out.loss + self.model.lambda_m * mhe  # the one place lambda_M is applied
        self.scaler.scale(loss).backward()
        finite = torch.isfinite(loss.detach()).float()
        if self.dist.distributed:  # every rank must take the same branch
            finite = all_reduce_sum(finite) / self.dist.world_size
        finite = bool(finite.item() == 1.0)
        if finite:
            if self.cfg.optim.clip_grad_norm > 0:
                self.scaler.unscale_(self.optimizer)
                self.model.clip_grad_norm_(self.cfg.optim.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self._streak = 0
        else:
            self.skipped_steps += 1
            self._streak += 1
            logger.warning("non-finite loss at iteration %d (head %s, MHE %s): step skipped",
                           self.iteration, out.loss.item(), mhe.item())
        self.optimizer.zero_grad(set_to_none=True)
        # the schedule counts iterations, skipped ones too (so a run stays on its schedule); PyTorch warns
        # when a skipped first step makes that call precede every optimizer step: expected here
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        self.iteration += 1
        correct, count = self.model.num_correct(out, labels)
        stats = {"loss": loss.detach(), "mhe": mhe.detach().float(), "terms": dict(out.terms), "correct": correct,
                 "count": count, "finite": finite, "rolled_back": False}
        if self._streak >= self.cfg.train.nan_patience:
            self.rollback()
            stats["rolled_back"] = True
        return stats

    # ------------------------------------------------------------------ the loop
    def make_loader(self, total_iters: int) -> torch.utils.data.DataLoader:
        sampler = ResumableSampler(len(self.dataset), self.cfg.train.batch_size, total_iters, self.dist.rank,
                                   self.dist.world_size, self.cfg.train.seed, self.cfg.data.flip,
                                   start_iter=self.iteration, shuffle_round=self.rollbacks)
        workers = self.cfg.data.num_workers
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=sampler.local_batch, sampler=sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None)

    def fit(self) -> Dict[str, Any]:
        """Train to ``train.iterations``: log every ``train.log_every``, verify every ``eval.every`` (when a
        verifier was given), checkpoint every ``checkpoint.every`` and at the end; returns the summary."""
        cfg, main = self.cfg, self.dist.is_main
        total = cfg.train.iterations
        writer = open_tensorboard(self.out_dir / "tb") if (main and cfg.train.tensorboard) else None
        bar = progress(total=total, initial=self.iteration, desc="train", unit="it", disable=None if main else True)
        metrics = MetricsLogger(self.out_dir, jsonl="metrics.jsonl", writer=writer, tb_prefix="train", bar=bar,
                                postfix=("loss", "acc", "lambda", "mhe", "lr", "images_per_s"),
                                resume_iteration=self.iteration if self.iteration else None, enabled=main)
        window = RunningMeans()
        schedule_keys = set(self.model.state_terms())
        term_keys: Dict[str, None] = {}  # the head's logged terms, in order of first appearance
        history: List[Dict[str, float]] = []
        last_report, eval_report, t_start, it_start = None, None, time.perf_counter(), self.iteration
        t_window = time.perf_counter()
        speed = _Throughput(WARMUP_STEPS)  # summary.json's images_per_s: training time after the warm-up
        while self.iteration < total:
            for images, labels, bad in self.make_loader(total):
                self.bad_images += int(bad.sum())
                stats = self.train_step(images, labels)
                speed.step(cfg.train.batch_size)
                bar.update(1)
                if stats["rolled_back"]:
                    window.reset()
                    t_window = time.perf_counter()
                    bar.n = self.iteration
                    break  # restart the loader at the restored iteration with the new data order
                # the head's terms, logged as they come (schedule values: the one in force at the log)
                batch_terms = {k: v for k, v in stats["terms"].items() if k not in schedule_keys}
                term_keys.update(dict.fromkeys(batch_terms))
                if stats["finite"]:
                    n = stats["count"]
                    window.add(n, loss=stats["loss"], mhe=stats["mhe"], acc=stats["correct"].double() / n,
                               **batch_terms)
                it = self.iteration
                if it % cfg.train.log_every == 0 or it == total:
                    means = window.means(distributed=self.dist.distributed)
                    steps = window.count
                    ips = steps * cfg.train.batch_size / max(time.perf_counter() - t_window, 1e-9)
                    last_report = {k: means.get(k, float("nan")) for k in ("loss", *term_keys, "mhe", "acc")}
                    last_report.update(images_per_s=ips, iteration=it, lr=self.optimizer.param_groups[0]["lr"],
                                       **self.head_terms())
                    history.append(last_report)
                    metrics.log(it, **{k: v for k, v in last_report.items() if k != "iteration"})
                    window.reset()
                    t_window = time.perf_counter()
                    if bar.disable and main:  # no bar on screen: a log line instead
                        shown = " ".join(f"{k} {v:.4g}" for k, v in last_report.items()
                                         if k not in ("iteration", "images_per_s"))
                        logger.info("it %d/%d %s %.0f img/s", it, total, shown, last_report["images_per_s"])
                t_pause = time.perf_counter()
                if self.verifier is not None and ((cfg.eval.every and it % cfg.eval.every == 0) or it == total):
                    eval_report = self.verify()  # before the save: the checkpoint carries its threshold
                    if eval_report:  # metrics.jsonl row {"iteration", "eval": {...}} and TensorBoard eval/*
                        metrics.log(it, eval=_eval_scalars(eval_report))
                        metrics.scalars(it, "eval", **_eval_scalars(eval_report))
                    self.keep_best(eval_report)
                if it % cfg.checkpoint.every == 0 or it == total:
                    self.save()
                if self._rollback_pending:  # issue 20: weights out of bounds at a save: roll back now
                    self.rollback()
                    window.reset()
                    bar.n = self.iteration
                    break
                paused = time.perf_counter() - t_pause
                t_window += paused  # images/s counts training time only
                speed.pause(paused)
                self.heartbeat.beat(it)
                stop = self.preemption.requested(self.dist.distributed, self.device) if it < total else None
                if stop:  # issue 20: a signal on any rank: every rank saves this step, then the run stops
                    bar.close()
                    if writer:
                        writer.close()
                    self._stop(stop, saved=it % cfg.checkpoint.every == 0)
        bar.close()
        if self.iteration == it_start:  # nothing to do (already finished): make sure last.pt exists
            self.save()
        bad_total = self.bad_images
        if self.dist.distributed:  # each rank read its own share of the images
            bad_total = int(all_reduce_sum(torch.tensor(self.bad_images, device=self.device)).item())
        bad_list = self._bad_image_list()
        elapsed = time.perf_counter() - t_start
        if writer:
            writer.close()
        summary = {
            "out_dir": str(self.out_dir), "checkpoint": str(ckpt.checkpoint_dir(self.out_dir) / "last.pt"),
            "iteration": self.iteration, "history": history, "final": last_report, "eval": _plain(eval_report),
            "bad_images": bad_list, "bad_reads": bad_total, "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks,
            "lambda": self.current_lambda(), "num_classes": self.dataset.num_classes,
            "images_per_s": speed.mean(fallback=(self.iteration - it_start) * cfg.train.batch_size / max(elapsed, 1e-9)),
            "precision": "fp64" if self.dtype == torch.float64 else self.precision,
        }
        if main:
            atomic_write_json(self.out_dir / "summary.json", summary)
            logger.info("done: %d iterations, %d unreadable images replaced, %d steps skipped, %d rollbacks",
                        self.iteration, bad_total, self.skipped_steps, self.rollbacks)
        return summary

    def _stop(self, signal_name: str, saved: bool) -> None:
        """Write this step's checkpoint (unless just written) and raise :class:`~sphereface_plus.errors.RunStopped`."""
        path = None if saved and self._healthy() else self.save()
        path = path or ckpt.checkpoint_dir(self.out_dir) / "last.pt"
        newest = ckpt.find_resume_checkpoint(self.out_dir) if self.dist.is_main else path
        raise preempted(signal_name, self.iteration, newest or path)

    def _bad_image_list(self) -> List[Dict[str, str]]:
        """The dataset's ``bad_images`` (``[{"path", "reason"}]``), re-read now so that the marks made by
        DataLoader workers count; the union over the ranks when distributed (each read its own share)."""
        found = list(getattr(self.dataset, "bad_images", []))
        if self.dist.distributed:
            gathered: List[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, found)
            found = [b for part in gathered for b in part]
        unique = {(b["path"], b["reason"]): b for b in found}
        return sorted(unique.values(), key=lambda b: b["path"])

    def verify(self) -> Optional[Dict[str, Any]]:
        """The verifier's report on the backbone (rank 0; the others wait); keeps its compare threshold."""
        report = None
        if self.dist.is_main and self.verifier is not None:
            # the training precision, and the backbone's memory format as it is (never converted mid-run)
            backbone = self.model.backbone
            if self.dtype != torch.float32:  # the verifier embeds float32 images: a float32 copy
                backbone = copy.deepcopy(backbone).float()
            report = self.verifier(backbone, self.device, precision=self.precision,
                                   channels_last=self.channels_last)
            self.threshold = float(report["compare_threshold"])
            std = report.get("std_accuracy")
            logger.info("verification at iteration %d: %.4f%s", self.iteration, report["mean_accuracy"],
                        "" if std is None else f" +- {std:.4f}")
            atomic_write_json(self.out_dir / "eval" / f"verify_{self.iteration:07d}.json", _plain(report))
        if self.dist.distributed:
            torch.distributed.barrier()
        return report


    def keep_best(self, report: Optional[Dict[str, Any]]) -> Optional[Path]:
        """Write ``checkpoints/best.pt`` when the verification mean beats every earlier one (ties keep the
        earlier). Call it on every rank after :meth:`verify` (only rank 0 holds the report; a sharded
        head is gathered collectively)."""
        better = report is not None and (self.best_accuracy is None or report["mean_accuracy"] > self.best_accuracy)
        if self.dist.distributed:  # rank 0 decides for everyone
            better = bool(all_reduce_sum(torch.tensor(float(better), device=self.device)).item() > 0)
        if not better:
            return None
        if report is not None:
            self.best_accuracy = float(report["mean_accuracy"])
        state = self.state_dict() if (self.sharded or self.dist.is_main) else None
        path = ckpt.save_best_checkpoint(state, self.out_dir) if self.dist.is_main else None
        if self.dist.distributed:
            torch.distributed.barrier()
        return path


def _eval_scalars(report: Dict[str, Any]) -> Dict[str, float]:
    """What a verification logs: ``mean_accuracy`` and, for several sets (packs), each set's accuracy."""
    return {"mean_accuracy": float(report["mean_accuracy"]),
            **{str(k): float(v) for k, v in (report.get("accuracies") or {}).items()}}


class _Throughput:
    """Mean images/s over the steps after the first ``warmup`` (of this process's run), pauses
    (verification, checkpoints) excluded; data loading counts, as it is part of training."""

    def __init__(self, warmup: int):
        self.warmup, self.steps, self.images, self.start, self.paused = warmup, 0, 0, None, 0.0

    def step(self, images: int) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            self.start = time.perf_counter()
        elif self.steps > self.warmup:
            self.images += images

    def pause(self, seconds: float) -> None:
        if self.start is not None:
            self.paused += seconds

    def mean(self, fallback: float) -> float:
        """The mean after the warm-up; ``fallback`` (the whole run's) for a run not longer than it."""
        if self.start is None or self.images == 0:
            return fallback
        return self.images / max(time.perf_counter() - self.start - self.paused, 1e-9)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj
