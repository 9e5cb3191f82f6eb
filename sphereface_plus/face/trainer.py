"""The face trainer: what a SphereFace / SphereFace+ run supplies to the engine's one loop
(docs/theory.md#sphere-backbones to docs/theory.md#training-recipes).

Library code: it receives its training set and an optional verifier from outside and imports nothing
from ``data_prep`` or ``eval`` (``tests/test_layering.py``); the command that builds them is
``sphereface-plus train`` (:mod:`sphereface_plus.commands.train`). It is a
:class:`~sphereface_plus.engine.loop.Task`: its batches, one step, its log rows and verification, its
state; the :class:`~sphereface_plus.engine.loop.Loop` runs the cadences, the non-finite guard (skip, then
roll back), the checkpoints and the preemption.

    resolved = resolve(cfg, dataset)                          # sphereface_plus.face.resolve
    trainer = FaceTrainer(resolved, dataset, dist, verifier=None)
    trainer.resume("auto")                                    # optional
    summary = trainer.fit()

Each step: the backbone forward under autocast in ``train.precision`` (:mod:`sphereface_plus.engine.precision`),
the head, its loss and MHE in float32 (:class:`~sphereface_plus.face.model.FaceModel`); loss =
``head loss + mhe.lambda_m * MHE`` (docs/theory.md#sphereface-plus); backward, optional gradient clipping,
SGD step, one scheduler step. A step whose loss is not finite on some rank is skipped on every rank.
How the head is split over the processes is the layout's (:mod:`sphereface_plus.face.layout`).
"""
from __future__ import annotations

import copy
import logging
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch

from sphereface_plus.config import ConfigError, resumable_keys, stored_config_as_read
from sphereface_plus.engine import checkpoint as ckpt
from sphereface_plus.engine.compile import resolve_compile
from sphereface_plus.engine.device import resolve_device
from sphereface_plus.engine.dist import DistInfo, all_reduce_sum
from sphereface_plus.engine.loop import Cadence, Loop, StepOutcome, Task
from sphereface_plus.engine.optim import build_optimizer, build_scheduler
from sphereface_plus.engine.precision import autocast, resolve_precision
from sphereface_plus.engine.run_log import MetricsLogger, open_tensorboard
from sphereface_plus.engine.sampler import ResumableSampler
from sphereface_plus.face.config import FaceConfig
from sphereface_plus.face.model import head_dtype
from sphereface_plus.face.init_source import InitSource
from sphereface_plus.face.resolve import Resolved, head_settings_in_force
from sphereface_plus.heads.functional import check_labels
from sphereface_plus.importers.preprocessing import PREPROCESSING_KEY, Preprocessing, source_backbone, wrap_backbone
from sphereface_plus.models import backbone_from_config
from sphereface_plus.utils import atomic_write_json, plain

logger = logging.getLogger(__name__)

__all__ = ["FaceTrainer", "HEALTHY_BOUND", "saved_settings_in_force"]

#: largest magnitude of a weight or optimiser value a checkpoint may hold (docs/robustness.md#nan-guard).
#: Trained face networks have weights of order 1 (weight decay; the A-Softmax rows are normalised); a run
#: whose weights reach 1e6 has diverged even while its loss is still finite (lr=5 reaches 1e17 before the
#: first NaN), and a checkpoint of it would only be rolled back to and diverge again.
HEALTHY_BOUND = 1e6

Verifier = Callable[..., Dict[str, Any]]  # (backbone, device, precision=..., channels_last=...) -> report


def saved_settings_in_force(config: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint's config as this release resolves one: settings renamed or added since it was written
    at their new names and defaults (:func:`~sphereface_plus.config.stored_config_as_read`) and its ``head``
    section as the values in force (``None`` entries dropped, the head's defaults filled in). A checkpoint of
    an earlier release then compares equal to the same run's resolved config today (the resume check)."""
    if isinstance(config, dict):
        config = stored_config_as_read(config, FaceConfig)
    head = config.get("head") if isinstance(config, dict) else None
    if not isinstance(head, dict) or head.get("name") is None:
        return config
    from sphereface_plus.face.config import TRAINER_HEAD_SETTINGS

    given = {k: v for k, v in head.items() if v is not None and k not in TRAINER_HEAD_SETTINGS}
    try:
        settings = head_settings_in_force(head["name"], given)
    except (KeyError, ConfigError):  # a head this toolkit no longer has, or a setting it dropped: as saved
        return config
    trainer_part = {k: v for k, v in head.items() if k in TRAINER_HEAD_SETTINGS}
    return {**config, "head": {**trainer_part, **given, **settings}}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class FaceTrainer(Task):
    """Everything a face run holds: model, optimiser, schedule, scaler, data order, counters; ``fit()`` runs it."""

    resume_hint = "rerun the same command with --resume auto"

    def __init__(self, resolved: Resolved, dataset, dist: Optional[DistInfo] = None,
                 verifier: Optional[Verifier] = None):
        """``dataset``: a map-style dataset of ``(image, label, bad)`` indexed by ``(index, flip)``, with
        ``num_classes`` and ``input_size`` (H, W);
        ``verifier(backbone, device, precision=, channels_last=) -> report`` (a dict with ``mean_accuracy``,
        ``std_accuracy`` (or None) and ``compare_threshold``, optionally ``accuracies`` ``{set: accuracy}``
        logged per set) or None."""
        cfg = resolved.config
        self.resolved, self.cfg = resolved, cfg
        self.dist = dist or DistInfo(device=resolve_device(cfg.train.device, setting="train.device"))
        self.device = self.dist.device
        self.out_dir = Path(cfg.out_dir)
        self.dataset, self.verifier = dataset, verifier
        self.num_classes = int(dataset.num_classes)
        # the precision first: everything below is built in it. Only the backbone runs under autocast; head,
        # losses and MHE stay float32 (FaceModel.forward); channels_last auto = on with bf16 on a CPU
        self.precision = resolve_precision(cfg.train.precision, self.device, what="train.precision")
        self.channels_last = (cfg.model.channels_last if cfg.model.channels_last is not None
                              else self.precision == "bf16" and self.device.type == "cpu")
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        # train.float64: the reference mode (exact comparisons between layouts), float64 throughout
        self.dtype = torch.float64 if cfg.train.float64 else torch.float32
        # train.compile (auto: where the run repays the compilation, engine/compile.py)
        self.compiled = resolve_compile(cfg.train.compile, self.device, cfg.train.iterations)
        logger.info("training precision %s (train.precision=%s)%s", self.precision, cfg.train.precision,
                    ", channels_last" if self.channels_last else "")
        _seed_everything(cfg.train.seed)  # initial weights depend on the seed alone
        backbone = backbone_from_config(cfg.model)  # name, input size, embedding_dim and model.kwargs
        if resolved.preprocessing is not None:  # an imported model's input convention (face/init_source.py)
            backbone = wrap_backbone(backbone, Preprocessing.from_dict(resolved.preprocessing, "train.init_from"))
        self.layout = resolved.layout
        self.collective_state = self.layout.collective_state
        try:  # the head is built here, once; its values (a margin out of range...) are its own to judge
            self.model = self.layout.build_model(backbone, cfg.model.embedding_dim, self.num_classes, cfg.train.seed,
                                                 cfg.mhe, self.dist.world_size)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"head.name={resolved.head.name!r} with {resolved.head.settings}: {exc}") from None
        self.model.to(self.device, memory_format=self.memory_format, dtype=self.dtype)
        if cfg.train.init_from:  # the weights read with the checkpoint's metadata (face/init_source.py)
            if resolved.init is None:  # a caller's mistake: FaceTrainer.from_config and the command resolve with it
                raise ValueError("train.init_from is set: resolve the recipe with face.init_source.start_from")
            self._init_weights(resolved.init)
        self.optimizer = build_optimizer([self.model], cfg.optim, backbone=self.model.backbone)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.iterations)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if self.compiled:  # in place (Module.compile): state_dict keys stay those of the plain backbone
            self.model.backbone.compile()
        self.net = self.layout.wrap(self.model, self.device, self.dist.world_size)
        self.iteration = 0
        self.bad_images = 0
        self.threshold: Optional[float] = None  # cosine threshold of the latest verification
        self.best_accuracy: Optional[float] = None  # best verification mean so far (checkpoints/best.pt)
        self.history: List[Dict[str, float]] = []
        self.last_report: Optional[Dict[str, float]] = None
        self.eval_report: Optional[Dict[str, Any]] = None
        self._term_keys: Dict[str, None] = {}  # the head's logged terms, in order of first appearance
        self._schedule_keys = set(self.model.state_terms())
        self._metrics: Optional[MetricsLogger] = None
        self._writer = None
        self.loop = Loop(self, Cadence(iterations=cfg.train.iterations, checkpoint_every=cfg.checkpoint.every,
                                       keep_every=cfg.checkpoint.every, log_every=cfg.train.log_every,
                                       eval_every=cfg.eval.every),
                         self.out_dir, keep=cfg.checkpoint.keep, dist=self.dist, nan_policy="rollback",
                         patience=cfg.train.nan_patience, max_rollbacks=cfg.train.max_rollbacks, desc="train",
                         divergence_fix=f"lower optim.lr (now {cfg.optim.lr:g}), lengthen optim.warmup_iters (now "
                                        f"{cfg.optim.warmup_iters}) or set optim.clip_grad_norm, then rerun with "
                                        "--resume auto")
        self.loop.capture_start_state()

    @classmethod
    def from_config(cls, cfg: FaceConfig, dataset, dist: Optional[DistInfo] = None,
                    verifier: Optional[Verifier] = None) -> "FaceTrainer":
        """A trainer of a recipe and its training set: the recipe is resolved against the data here."""
        from sphereface_plus.face.init_source import start_from
        from sphereface_plus.face.resolve import resolve

        cfg, init = start_from(cfg)
        return cls(resolve(cfg, dataset, init), dataset, dist, verifier)

    def _init_weights(self, init: InitSource) -> None:
        """The backbone of ``train.init_from`` (a run's or an imported model's), and its head where it is the
        same head over as many classes; otherwise the new head stays (face/init_source.py)."""
        self.network.load_state_dict(init.weights["model"])
        head = init.weights.get("head")
        own = self.model.head.state_dict() if self.layout.rank_rows(self.model.head) is None else None
        fits = (head is not None and init.head_name in (None, self.resolved.head.name)
                and (own is None or (set(head) == set(own)
                                     and all(tuple(head[k].shape) == tuple(own[k].shape) for k in own))))
        if fits:
            self.layout.load_head_state(self.model.head, head, init.path)
        elif head is not None:
            logger.info("train.init_from %s: its head (%s) is not this run's %s over %d classes: a new head",
                        init.path, init.head_name or "unnamed", self.resolved.head.name, self.num_classes)
        logger.info("initialised the backbone%s from %s (iteration %s)", " and head" if fits else "", init.path,
                    init.weights.get("iteration"))

    @property
    def network(self) -> torch.nn.Module:
        """The backbone whose weights the checkpoints hold (without the input adapter of an imported model)."""
        return source_backbone(self.model.backbone)

    # ------------------------------------------------------------------ names tests and callers use
    @property
    def head(self) -> torch.nn.Module:
        return self.model.head

    @property
    def preemption(self):
        return self.loop.preemption

    @preemption.setter
    def preemption(self, value) -> None:
        """The command installs the signal handlers (``with Preemption() as p: trainer.preemption = p``)."""
        self.loop.preemption = value

    @property
    def heartbeat(self):
        return self.loop.heartbeat

    @property
    def rollbacks(self) -> int:
        return self.loop.rollbacks

    @property
    def skipped_steps(self) -> int:
        return self.loop.skipped_steps

    def head_terms(self) -> Dict[str, float]:
        """The head's schedule values in force (``state_terms``: A-Softmax's ``lambda``), as floats."""
        return {k: float(v) for k, v in self.model.state_terms().items()}

    def current_lambda(self) -> float:
        """A-Softmax's λ in force (NaN for a head without one): ``head_terms()['lambda']``."""
        return self.head_terms().get("lambda", float("nan"))

    # ------------------------------------------------------------------ the step
    def make_loader(self, total_iters: int, restarts: int = 0) -> torch.utils.data.DataLoader:
        sampler = ResumableSampler(len(self.dataset), self.cfg.train.batch_size, total_iters, self.dist.rank,
                                   self.dist.world_size, self.cfg.train.seed, self.cfg.data.flip,
                                   start_iter=self.iteration, shuffle_round=restarts)
        workers = self.cfg.data.num_workers
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=sampler.local_batch, sampler=sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None)

    def batches(self, start: int, restarts: int) -> Iterable[Any]:
        return self.make_loader(self.cfg.train.iterations, restarts)

    def step(self, batch) -> StepOutcome:
        """Forward, backward and (when the loss is finite on every rank) an SGD step; always advances one
        iteration (the schedule counts skipped ones too, so a run stays on its schedule)."""
        images, labels, bad = batch
        if bad is not None:
            self.bad_images += int(bad.sum())
        # the batch's labels, checked once here on the host (the head and the MHE term trust them)
        labels = check_labels(labels, images.shape[0], self.num_classes)
        self.net.train()
        images = images.to(self.device, dtype=self.dtype, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        if self.model.lambda_m > 0 and self.model.mhe_term is not None:  # its projections' / poles' inner steps
            self.model.mhe_term.advance(head_dtype(self.model.head.weight), labels, self.optimizer.param_groups[-1]["lr"])
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
                self.layout.clip_grad_norm_(self.model, self.cfg.optim.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # PyTorch warns when a skipped first step makes this call precede every optimizer step: expected here
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        self.iteration += 1
        correct, count = self.layout.num_correct(self.model.head, out, labels)
        # the head's terms, logged as they come (schedule values: the one in force at the log)
        terms = {k: v for k, v in out.terms.items() if k not in self._schedule_keys}
        self._term_keys.update(dict.fromkeys(terms))
        values = {"loss": loss.detach(), "mhe": mhe.detach().float(), "acc": correct.double() / count, **terms}
        message = "" if finite else f"head {out.loss.item()}, MHE {mhe.item()}"
        return StepOutcome(finite, values, weight=count, message=message,
                           detail={"loss": loss.detach(), "mhe": mhe.detach().float(), "terms": dict(out.terms),
                                   "correct": correct, "count": count})

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, Any]:
        """One step under the loop's non-finite guard: ``loss``, ``mhe``, ``terms``, ``correct``, ``count``,
        ``finite`` (False: skipped) and ``rolled_back`` (``train.nan_patience`` non-finite steps in a row
        restored the newest checkpoint)."""
        result = self.loop.guarded_step((images, labels, None))
        return {**result["outcome"].detail, "finite": result["finite"], "rolled_back": result["rolled_back"]}

    # ------------------------------------------------------------------ logs and verification
    def open(self, bar, start: int) -> None:
        main = self.dist.is_main
        self._writer = open_tensorboard(self.out_dir / "tb") if (main and self.cfg.train.tensorboard) else None
        self._metrics = MetricsLogger(self.out_dir, jsonl="metrics.jsonl", writer=self._writer, tb_prefix="train",
                                      bar=bar, postfix=("loss", "acc", "lambda", "mhe", "lr", "images_per_s"),
                                      resume_iteration=start if start else None, enabled=main)
        self._bar = bar

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def log(self, iteration: int, means: Dict[str, float], steps: int, seconds: float) -> None:
        ips = steps * self.cfg.train.batch_size / seconds
        row = {k: means.get(k, float("nan")) for k in ("loss", *self._term_keys, "mhe", "acc")}
        row.update(images_per_s=ips, iteration=iteration, lr=self.optimizer.param_groups[-1]["lr"], **self.head_terms())
        self.last_report = row
        self.history.append(row)
        self._metrics.log(iteration, **{k: v for k, v in row.items() if k != "iteration"})
        if self._bar.disable and self.dist.is_main:  # no bar on screen: a log line instead
            shown = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("iteration", "images_per_s"))
            logger.info("it %d/%d %s %.0f img/s", iteration, self.cfg.train.iterations, shown, ips)

    def evaluate(self, iteration: int, means: Dict[str, float]) -> None:
        """Verify (when there is a verifier) and keep ``checkpoints/best.pt``."""
        if self.verifier is None:
            return
        report = self.verify()
        if report:  # metrics.jsonl row {"iteration", "eval": {...}} and TensorBoard eval/*
            self._metrics.log(iteration, eval=_eval_scalars(report))
            self._metrics.scalars(iteration, "eval", **_eval_scalars(report))
        self.eval_report = report
        self.keep_best(report)

    def verify(self) -> Optional[Dict[str, Any]]:
        """The verifier's report on the backbone (rank 0; the others wait); keeps its compare threshold."""
        report = None
        if self.dist.is_main and self.verifier is not None:
            # the training precision, and the backbone's memory format as it is (never converted mid-run)
            backbone = self.model.backbone
            if self.dtype != torch.float32:  # the verifier embeds float32 images: a float32 copy
                backbone = copy.deepcopy(backbone).float()
            report = self.verifier(backbone, self.device, precision=self.precision, channels_last=self.channels_last)
            self.threshold = float(report["compare_threshold"])
            std = report.get("std_accuracy")
            logger.info("verification at iteration %d: %.4f%s", self.iteration, report["mean_accuracy"],
                        "" if std is None else f" +- {std:.4f}")
            atomic_write_json(self.out_dir / "eval" / f"verify_{self.iteration:07d}.json", plain(report))
        if self.dist.distributed:
            torch.distributed.barrier()
        return report

    def keep_best(self, report: Optional[Dict[str, Any]]) -> Optional[Path]:
        """Write ``checkpoints/best.pt`` when the verification mean beats every earlier one (ties keep the
        earlier). Call it on every rank after :meth:`verify` (only rank 0 holds the report; a sharded head
        is gathered collectively)."""
        better = report is not None and (self.best_accuracy is None or report["mean_accuracy"] > self.best_accuracy)
        if self.dist.distributed:  # rank 0 decides for everyone
            better = bool(all_reduce_sum(torch.tensor(float(better), device=self.device)).item() > 0)
        if not better:
            return None
        if report is not None:
            self.best_accuracy = float(report["mean_accuracy"])
        state = self.state_dict() if (self.collective_state or self.dist.is_main) else None
        path = ckpt.save_best_checkpoint(state, self.out_dir) if self.dist.is_main else None
        if self.dist.distributed:
            torch.distributed.barrier()
        return path

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The task's part of the checkpoint. With a sharded head it is collective (every rank must call it)
        and its ``head`` / ``optimizer`` entries are whole (C x d, as a replicated run's) on rank 0 only."""
        return self._state(whole=True)

    def local_state_dict(self) -> Dict[str, Any]:
        """This rank's state: :meth:`state_dict`, but a sharded head keeps its own rows (no collective; the
        rollback start state)."""
        return self._state(whole=False)

    def _state(self, whole: bool) -> Dict[str, Any]:
        head = self.model.head
        state = {
            "model": self.network.state_dict(),
            "head": self.layout.head_state(head, whole),
            "optimizer": self.layout.optimizer_state(self.optimizer, head, whole),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.capture_rng(),
            "iteration": self.iteration,
            "bad_images": self.bad_images,
            "config": self.cfg.to_dict(),
        }
        if self.model.mhe_term is not None:  # the objective's projections / poles and their optimisers
            state["mhe_state"] = self.model.mhe_term.state_dict()
        if self.resolved.preprocessing is not None:  # verify / export put the same input adapter in front
            state[PREPROCESSING_KEY] = dict(self.resolved.preprocessing)
        if self.threshold is not None:  # docs/interfaces.md: used by `sphereface-plus compare`
            state["threshold"] = self.threshold
        if self.best_accuracy is not None:
            state["best_accuracy"] = self.best_accuracy
        rows = self.layout.rank_rows(head)
        if not whole and rows is not None:
            state["rank_rows"] = rows
        return state

    def load_state_dict(self, state: Dict[str, Any], source: Any = "checkpoint") -> None:
        """Load a :meth:`state_dict` (whole head: from a run on any number of processes, sharded or
        replicated) or this rank's own :meth:`local_state_dict`."""
        head = self.model.head
        self.network.load_state_dict(state["model"])
        if state.get("rank_rows") is not None:  # this rank's own rows (the rollback start state)
            self.layout.load_rank_state(head, self.optimizer, state["head"], state["optimizer"])
        else:
            self.layout.load_head_state(head, state["head"], source)
            self.layout.load_optimizer_state(self.optimizer, head, state["optimizer"], source)
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("mhe_state") is not None and self.model.mhe_term is not None:
            self.model.mhe_term.load_state_dict(state["mhe_state"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state["rng"])
        self.iteration = int(state["iteration"])
        self.bad_images = int(state.get("bad_images", 0))
        self.threshold = float(state["threshold"]) if state.get("threshold") is not None else None
        self.best_accuracy = float(state["best_accuracy"]) if state.get("best_accuracy") is not None else None

    def healthy(self) -> bool:
        """Every weight and optimiser value finite and within :data:`HEALTHY_BOUND` (all ranks agree)."""
        # NaN compares False, so this also catches non-finite values
        tensors = list(self.model.parameters()) + [v for st in self.optimizer.state.values() for v in st.values()
                                                   if torch.is_tensor(v) and v.is_floating_point()]
        bad = not all(bool((t.detach().abs() <= HEALTHY_BOUND).all()) for t in tensors)
        flag = torch.tensor(float(bad), device=self.device)
        if self.dist.distributed:  # a sharded head: each rank checked its own rows
            flag = all_reduce_sum(flag)
        return float(flag.item()) == 0.0

    def resume(self, resume: str) -> Optional[Path]:
        """``auto``: the newest readable checkpoint of ``out_dir`` (a fresh start when there is none); else a
        path. A checkpoint whose settings differ from this run's (other than the resumable ones,
        :func:`~sphereface_plus.config.resumable_keys`) is refused."""
        found = ckpt.resume_run_state(self.out_dir, resume, self.cfg.to_dict(), resumable_keys(FaceConfig),
                                      map_location=self.device, view=saved_settings_in_force,
                                      fix="use the original recipe and overrides, or another out_dir for the new "
                                          "settings")
        if found is None:
            logger.info("--resume auto: no checkpoint in %s, starting from scratch", ckpt.checkpoint_dir(self.out_dir))
            return None
        path, state = found
        self.loop.restore(state, source=path)  # the source named in its messages
        logger.info("resumed from %s at iteration %d (lambda %.4g)", path, self.iteration, self.current_lambda())
        return path

    def save(self) -> Optional[Path]:
        """Write the checkpoint now (collective); None when the state is not healthy (see the loop)."""
        return self.loop.save()

    def rollback(self) -> None:
        self.loop.rollback()

    # ------------------------------------------------------------------ the run
    def fit(self) -> Dict[str, Any]:
        """Train to ``train.iterations``: log every ``train.log_every``, verify every ``eval.every`` (when a
        verifier was given), checkpoint every ``checkpoint.every`` and at the end; returns the summary (also
        written to ``out_dir/summary.json``)."""
        cfg, start = self.cfg, self.iteration
        run = self.loop.run()
        bad_list, bad_total = self._bad_image_list(), self.bad_images
        if self.dist.distributed:  # each rank read its own share of the images
            bad_total = int(all_reduce_sum(torch.tensor(self.bad_images, device=self.device)).item())
        summary = {
            "out_dir": str(self.out_dir), "checkpoint": str(ckpt.checkpoint_dir(self.out_dir) / "last.pt"),
            "iteration": self.iteration, "history": self.history, "final": self.last_report,
            "eval": plain(self.eval_report), "bad_images": bad_list, "bad_reads": bad_total,
            "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks, "lambda": self.current_lambda(),
            "num_classes": self.num_classes,
            "images_per_s": run["steps_per_s"] * cfg.train.batch_size if self.iteration > start else 0.0,
            "precision": "fp64" if self.dtype == torch.float64 else self.precision,
        }
        if self.dist.is_main:
            atomic_write_json(self.out_dir / "summary.json", summary)
            logger.info("done: %d iterations, %d unreadable images replaced, %d steps skipped, %d rollbacks",
                        self.iteration, bad_total, self.skipped_steps, self.rollbacks)
        return summary

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


def _eval_scalars(report: Dict[str, Any]) -> Dict[str, float]:
    """What a verification logs: ``mean_accuracy`` and, for several sets (packs), each set's accuracy."""
    return {"mean_accuracy": float(report["mean_accuracy"]),
            **{str(k): float(v) for k, v in (report.get("accuracies") or {}).items()}}
