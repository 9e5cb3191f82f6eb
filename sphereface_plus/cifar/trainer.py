"""The MHE CIFAR trainer (Liu et al., NeurIPS 2018; wy1iu/MHE ``train.py``), on the engine's one loop.

The recipe is the reference code's, step for step (docs/theory.md#cifar-setup):

- network ``cifar_cnn9`` (9 convs with BN + ReLU, ``fc6`` 4x4 conv, ``score`` 1x1 conv), input RGB
  ``(x - 127.5) / 128``;
- MHE (:class:`sphereface_plus.mhe.MHERegularizer`) on the 9 convs and ``fc6`` (hidden; half-space for
  ``half_mhe``) and on ``score`` (output, always full-space), with the wy1iu/MHE coefficients
  ``(λ_h, λ_o) = (1, 10)`` for s in {0, 1, 2, a0} and ``(0.1, 1)`` for a1/a2, times ``mhe_scale``;
- loss ``-Σ_j t_j log(softmax_j + 1e-4)`` with label-smoothed targets ``t = 0.99·onehot + 0.01/C``
  (:func:`sphereface_plus.losses.smoothed_cross_entropy` says why the +1e-4 is kept);
- SGD momentum 0.9, weight decay 5e-4 on every parameter (BN included), batch 128, lr 0.1 divided by
  10 at iterations 20k, 30k, 37.5k of 42.5k (:func:`~sphereface_plus.cifar.config.scaled_milestones`);
- evaluation on the whole test set before the first update, every ``eval_every`` and after the last.

The data (the batches of each update, augmented, and the test batches) come from outside: the command
builds them with ``data_prep.cifar.CifarData``. :class:`CifarTrainer` is a
:class:`~sphereface_plus.engine.loop.Task`; the engine's :class:`~sphereface_plus.engine.loop.Loop` runs
it. Outputs in the run folder: ``metrics.jsonl`` (one JSON object per evaluation), ``log_train.txt`` and
``log_test.txt``, ``config.json``, TensorBoard events in ``tb/``, ``checkpoints/last.pt``.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from sphereface_plus.cifar.config import EVAL_BATCH, HIDDEN_LAYERS, OUTPUT_LAYER, CifarConfig
from sphereface_plus.config import resumable_keys, stored_config_as_read
from sphereface_plus.engine import checkpoint as ckpt
from sphereface_plus.engine.loop import Cadence, Loop, StepOutcome, Task
from sphereface_plus.engine.optim import build_sgd, lr_factor, multistep_scheduler
from sphereface_plus.engine.precision import autocast
from sphereface_plus.engine.run_log import MetricsLogger, open_tensorboard
from sphereface_plus.losses import smoothed_cross_entropy
from sphereface_plus.mhe import MHERegularizer
from sphereface_plus.models import create_backbone
from sphereface_plus.utils import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["CifarTrainer", "build_model", "build_optimizer", "build_regularizer", "split_terms", "mhe_snapshot",
           "frozen_batchnorm_stats", "forward", "evaluate", "train_step"]


def build_model(num_classes: int, seed: int = 0, bn_momentum: Optional[float] = None) -> nn.Module:
    """``cifar_cnn9`` initialised from ``torch.manual_seed(seed)`` (so a seed always gives the same weights)."""
    torch.manual_seed(seed)
    model = create_backbone("cifar_cnn9", num_classes=num_classes)
    if bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = float(bn_momentum)
    return model


def build_optimizer(model: nn.Module, cfg: CifarConfig) -> torch.optim.SGD:
    """SGD, momentum 0.9, weight decay 5e-4 on every parameter, BN gamma/beta included.

    The reference put ``l2_regularizer(5e-4)`` (gradient ``5e-4 * w``) on the filters and the BN
    variables and used TF's momentum update ``v = 0.9 v + g; w -= lr v``: exactly
    ``torch.optim.SGD(momentum=0.9, weight_decay=5e-4)``, including how a changed lr acts on ``v``.
    """
    return build_sgd([model], cfg.lr, cfg.momentum, cfg.weight_decay, decay_biases=True)


def build_regularizer(model: nn.Module, cfg: CifarConfig) -> Optional[MHERegularizer]:
    """The MHE regulariser of a setting, or None for the baseline (and for ``mhe_scale`` 0)."""
    if cfg.model_name == "baseline" or cfg.mhe_scale == 0:
        return None
    hidden_coef, output_coef = cfg.coefficients()
    reg = MHERegularizer(model, power=None if cfg.mhe_power == "-" else cfg.mhe_power,
                         half_space=cfg.model_name == "half_mhe", hidden_coef=hidden_coef, output_coef=output_coef,
                         include=list(HIDDEN_LAYERS) + [OUTPUT_LAYER], output_layers=[OUTPUT_LAYER],
                         objective=cfg.mhe_objective, settings=cfg.mhe_settings())
    if tuple(reg.hidden_layers) != HIDDEN_LAYERS or tuple(reg.output_layers) != (OUTPUT_LAYER,):
        raise RuntimeError(f"MHE selected hidden={reg.hidden_layers}, output={reg.output_layers}; expected the 9 "
                           f"convs and fc6 as hidden layers and score as output (has cifar_cnn9 renamed its layers?)")
    return reg


def split_terms(reg: Optional[MHERegularizer], values: Dict[str, Any]) -> Tuple[float, float]:
    """Weighted hidden and output MHE terms (as added to the loss) from the per-layer energies."""
    if reg is None:
        return 0.0, 0.0
    hidden = sum(float(values[n]) for n in reg.hidden_layers)
    output = sum(float(values[n]) for n in reg.output_layers)
    return reg.hidden_coef * hidden, reg.output_coef * output


def mhe_snapshot(reg: Optional[MHERegularizer]) -> Dict[str, Any]:
    """MHE terms at the current weights: ``mhe_hidden``, ``mhe_output`` (weighted) and per-layer energies."""
    if reg is None:
        return {"mhe_hidden": 0.0, "mhe_output": 0.0, "mhe_layers": {}}
    with torch.no_grad():
        _, values = reg()
    hidden, output = split_terms(reg, values)
    return {"mhe_hidden": hidden, "mhe_output": output, "mhe_layers": {k: float(v) for k, v in values.items()}}


@contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Train-mode forward passes that leave the BN running statistics untouched (momentum 0)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in bns]
    try:
        for m in bns:
            m.momentum = 0.0
        yield
    finally:
        for m, (mom, nbt) in zip(bns, saved):
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def forward(model, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """float32 logits of the network run in ``precision`` (a resolved one: fp32 | bf16 | fp16)."""
    with autocast(x.device, precision):
        return model(x).float()


def evaluate(model, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], cfg: CifarConfig,
             precision: str = "fp32") -> Tuple[float, float]:
    """Accuracy (in [0, 1]) and mean classification loss over ``batches`` (network-ready ``(x, y)``, e.g.
    ``data_prep.cifar.CifarData.test_batches``), BN in inference mode."""
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    with torch.inference_mode():
        for x, y in batches:
            logits = forward(model, x, precision)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(smoothed_cross_entropy(logits, y, cfg.label_smoothing, cfg.log_eps)) * y.shape[0]
            n += y.shape[0]
    model.train(was_training)
    return correct / max(n, 1), loss_sum / max(n, 1)


def train_step(model, reg, optimizer, x, y, cfg: CifarConfig, precision: str = "fp32") -> Dict[str, float]:
    """One SGD update on a prepared batch: task loss + weighted MHE terms, backward, step.

    Returns the quantities of the update as floats: ``loss`` (the full objective), ``task_loss``,
    ``mhe_hidden``, ``mhe_output`` (weighted, as added to the loss) and ``train_accuracy``. The network
    runs in ``precision``; the loss and the MHE terms (on the float32 weights, outside autocast) in float32.
    """
    logits = forward(model, x, precision)
    task = smoothed_cross_entropy(logits, y, cfg.label_smoothing, cfg.log_eps)
    loss = task
    hidden = output = 0.0
    if reg is not None:
        reg.advance(optimizer.param_groups[0]["lr"])  # the objective's projections / poles (docs/theory.md#mhe-family)
        mhe_loss, values = reg()
        loss = loss + mhe_loss
        hidden, output = split_terms(reg, values)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": float(loss.detach()), "task_loss": float(task.detach()), "mhe_hidden": hidden,
            "mhe_output": output, "train_accuracy": float((logits.detach().argmax(1) == y).float().mean())}


def _fmt_train(row: Dict[str, Any]) -> str:
    return (f"iter {row['iteration']:6d}  loss {row['loss']:.4f}  task {row['task_loss']:.4f}  "
            f"mhe_hidden {row['mhe_hidden']:.4f}  mhe_output {row['mhe_output']:.4f}  "
            f"acc {row['train_accuracy']:.4f}  lr {row['lr']:.6g}")


def _fmt_test(row: Dict[str, Any]) -> str:
    return (f"iter {row['iteration']:6d}  test_acc {row['test_accuracy']:.4f}  test_loss {row['test_loss']:.4f}  "
            f"loss {row['loss']:.4f}  mhe_hidden {row['mhe_hidden']:.4f}  mhe_output {row['mhe_output']:.4f}  "
            f"lr {row['lr']:.6g}")


class CifarTrainer(Task):
    """One CIFAR setting: model, regulariser, optimiser, schedule and its logs (``train()`` runs it).

    ``data``: ``batch(update) -> (x, y)`` (the augmented, network-ready batch of an update, a function of
    ``(seed, update)``) and ``test_batches(batch_size)`` (network-ready ``(x, y)`` of the test set), on
    ``device``. ``precision``: a resolved one (fp32 | bf16 | fp16).
    """

    resume_hint = "rerun the same command with --resume"

    def __init__(self, cfg: CifarConfig, data, out_dir, device: torch.device, precision: str = "fp32",
                 stop_after: Optional[int] = None, preemption=None):
        self.cfg, self.data, self.out = cfg, data, Path(out_dir)
        self.device, self.precision = device, precision
        self.model = build_model(cfg.num_classes, cfg.seed, cfg.bn_momentum).to(device)
        self.reg = build_regularizer(self.model, cfg)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = multistep_scheduler(self.optimizer, cfg.milestones, cfg.lr_gamma)
        self.iteration = 0
        self.last_lr = cfg.lr
        self.train_log: Optional[MetricsLogger] = None
        self.test_log: Optional[MetricsLogger] = None
        self._logs_state: Optional[Dict[str, Any]] = None
        self._writer = None
        self.loop = Loop(self, Cadence(iterations=cfg.iterations, checkpoint_every=cfg.eval_every,
                                       log_every=cfg.log_every, eval_every=cfg.eval_every, eval_at_start=True),
                         self.out, preemption=preemption, nan_policy="stop", desc=cfg.setting, stop_after=stop_after,
                         divergence_fix="lower lr")

    # ------------------------------------------------------------------ the task
    def batches(self, start: int, restarts: int) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
        return (self.data.batch(update) for update in range(start, self.cfg.iterations))

    def step(self, batch) -> StepOutcome:
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        x, y = batch
        vals = train_step(self.model, self.reg, self.optimizer, x, y, self.cfg, self.precision)
        self.scheduler.step()
        self.iteration += 1
        self.train_log.scalars(self.iteration, **vals, lr=self.last_lr)
        return StepOutcome(math.isfinite(vals["loss"]), vals,
                           message=f"{self.cfg.setting}: the loss became {vals['loss']} (lr {self.last_lr:g})")

    def initial_values(self) -> Dict[str, Any]:
        """Iteration 0, before any update: the objective on the first training batch at the initial weights
        (train-mode BN, running statistics left untouched), and the MHE terms."""
        self.model.train()
        with torch.no_grad(), frozen_batchnorm_stats(self.model):
            x, y = self.data.batch(0)
            logits = forward(self.model, x, self.precision)
            task = float(smoothed_cross_entropy(logits, y, self.cfg.label_smoothing, self.cfg.log_eps))
            train_acc = float((logits.argmax(1) == y).float().mean())
        snap = mhe_snapshot(self.reg)
        return {"loss": task + snap["mhe_hidden"] + snap["mhe_output"], "task_loss": task,
                "train_accuracy": train_acc, "_snapshot": snap}

    def log(self, iteration: int, means: Dict[str, float], steps: int, seconds: float) -> None:
        self.train_log.log(iteration, **means, lr=self.last_lr)

    def evaluate(self, iteration: int, means: Dict[str, Any]) -> None:
        acc, test_loss = evaluate(self.model, self.data.test_batches(EVAL_BATCH), self.cfg, self.precision)
        snap = means.pop("_snapshot", None) or mhe_snapshot(self.reg)
        cfg = self.cfg
        row = self.test_log.log(iteration, test_accuracy=acc, test_loss=test_loss, loss=means["loss"],
                                task_loss=means["task_loss"], train_accuracy=means["train_accuracy"],
                                mhe_hidden=snap["mhe_hidden"], mhe_output=snap["mhe_output"],
                                lr=cfg.lr * lr_factor(max(iteration - 1, 0), cfg.milestones, cfg.lr_gamma),
                                elapsed_s=round(self.loop.elapsed(), 3), mhe_layers=snap["mhe_layers"])
        self.train_log.scalars(iteration, "test", accuracy=acc, loss=test_loss)
        self.train_log.scalars(iteration, "mhe_layer", **snap["mhe_layers"])
        self.train_log.flush()
        log.info("%s %s", cfg.setting, _fmt_test(row))

    def open(self, bar, start: int) -> None:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "config.json", {**cfg.to_dict(), "setting": cfg.setting,
                                                     "milestones": list(cfg.milestones),
                                                     "coefficients": list(cfg.coefficients()),
                                                     "device": str(self.device)})
        header = f"model_name: {cfg.model_name}, power_s: {cfg.mhe_power}, dataset: {cfg.dataset}\n"
        self._writer = open_tensorboard(self.out / "tb", purge_step=start)
        self.train_log = MetricsLogger(self.out, jsonl=None, text="log_train.txt", text_header=header,
                                       text_format=_fmt_train, writer=self._writer, tb_prefix="train", bar=bar,
                                       postfix=("loss", "train_accuracy"))
        self.test_log = MetricsLogger(self.out, jsonl="metrics.jsonl", text="log_test.txt", text_header=header,
                                      text_format=_fmt_test, writer=None)
        if self._logs_state is not None:
            self.train_log.load_state_dict(self._logs_state["train"])
            self.test_log.load_state_dict(self._logs_state["test"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "iteration": self.iteration, "config": self.cfg.to_dict(),
                "logs": {"train": self.train_log.state_dict(), "test": self.test_log.state_dict()},
                "mhe_state": self.reg.state_dict() if self.reg is not None else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = int(state["iteration"])
        if self.reg is not None and state.get("mhe_state") is not None:  # projections, poles, inner optimisers
            self.reg.load_state_dict(state["mhe_state"])
        self._logs_state = state["logs"]
        if self.train_log is not None:
            self.train_log.load_state_dict(state["logs"]["train"])
            self.test_log.load_state_dict(state["logs"]["test"])

    # ------------------------------------------------------------------ the run
    def resume(self, resume: bool) -> None:
        """Continue from the newest readable checkpoint of the run folder (its settings must be this run's)."""
        # a checkpoint of an earlier release lacks the settings added since: compared at their defaults
        found = ckpt.resume_run_state(self.out, resume, self.cfg.to_dict(), resumable_keys(CifarConfig),
                                      view=lambda c: stored_config_as_read(c, CifarConfig))
        if found:
            log.info("resuming %s from iteration %d (%s)", self.cfg.setting, int(found[1]["iteration"]), found[0])
            self.loop.restore(found[1])
        elif resume:
            log.info("no checkpoint in %s: starting %s from scratch", self.out, self.cfg.setting)

    def train(self) -> Dict[str, Any]:
        """Train and evaluate; the summary (``final_accuracy`` in [0, 1], paths, timing)."""
        run = self.loop.run()
        rows = self.test_log.rows
        return {"setting": self.cfg.setting, "final_accuracy": rows[-1]["test_accuracy"],
                "best_accuracy": max(r["test_accuracy"] for r in rows), "iterations": run["iterations"],
                "out": str(self.out), "elapsed_s": round(run["elapsed_s"], 1), "stopped": run["stopped"],
                "precision": self.precision}
