"""``sphereface-plus cifar``: the MHE CIFAR experiments (Liu et al., NeurIPS 2018).

The seed's second entry point (``python train.py --model_name=mhe --power_s=0``), with its flags kept
as aliases of the YAML recipes in ``configs/cifar_*.yaml`` (any field also as ``key=value``)::

    sphereface-plus cifar --model_name mhe --power_s 0 --data cifar-100-python
    sphereface-plus cifar --config configs/cifar_half_mhe.yaml mhe_power=2 dataset=cifar10 data=DIR iterations=N --out DIR
    sphereface-plus cifar --sweep --data cifar-100-python --out runs/cifar-sweep

The recipe is the reference code's, step for step:

- network ``cifar_cnn9`` (9 convs with BN + ReLU, ``fc6`` 4x4 conv, ``score`` 1x1 conv), input RGB
  ``(x - 127.5) / 128``;
- MHE (``sphereface_plus.mhe.MHERegularizer``) on the 9 convs and ``fc6`` (hidden; half-space for
  ``half_mhe``) and on ``score`` (output, always full-space), with the wy1iu/MHE coefficients
  ``(λ_h, λ_o) = (1, 10)`` for s in {0, 1, 2, a0} and ``(0.1, 1)`` for a1/a2, times ``mhe_scale``;
- loss ``-Σ_j t_j log(softmax_j + 1e-4)`` with label-smoothed targets ``t = 0.99·onehot + 0.01/C``
  (:func:`sphereface_plus.losses.smoothed_cross_entropy` says why the +1e-4 is kept);
- augmentation: symmetric padding by 4, random 32x32 crop, random horizontal flip, on the whole batch
  at once (:func:`data_prep.cifar.random_pad_crop_flip`), drawn from a generator of (seed, update);
- SGD momentum 0.9, weight decay 5e-4 on every parameter (BN included), batch 128, lr 0.1 divided by
  10 at iterations 20k, 30k, 37.5k of 42.5k (a shorter or longer run scales these milestones
  proportionally, :func:`scaled_milestones`);
- data: each epoch a fresh permutation, ``floor(N / batch)`` batches (the last partial batch is
  dropped, as the reference's 390 batches of 128 per epoch did);
- evaluation on the whole test set before the first update, every ``eval_every`` and after the last.

Everything generic comes from the engine: device, optimiser and schedule, the resumable sampler,
metrics (``metrics.jsonl``, text logs, TensorBoard, progress bar), checkpoints and the settings check.
Outputs in ``--out``: ``metrics.jsonl`` (one JSON object per evaluation), ``log_train.txt`` and
``log_test.txt``, ``config.json``, TensorBoard events in ``tb/``, ``checkpoints/last.pt`` (resumable with
``--resume``). ``--sweep`` runs the 13 settings of the published table into ``OUT/<setting>/`` and writes
``OUT/results.md`` beside the published CIFAR-100 numbers.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from data_prep.cifar import CIFAR_DATASETS, load_cifar, random_pad_crop_flip, to_network_input
from sphereface_plus.config import (ConfigError, add_field_flags, config_to_yaml, load_config_from_args,
                                    stored_config_as_read)
from sphereface_plus.engine import checkpoint as ckpt
from sphereface_plus.engine.device import resolve_device
from sphereface_plus.engine.run_log import MetricsLogger, RunningMeans, open_tensorboard
from sphereface_plus.engine.optim import build_sgd, lr_factor, multistep_scheduler
from sphereface_plus.engine.precision import SETTINGS as PRECISION_SETTINGS
from sphereface_plus.engine.precision import autocast, resolve_precision
from sphereface_plus.engine.preempt import Preemption, preempted
from sphereface_plus.engine.run_folder import RunFolder
from sphereface_plus.engine.sampler import ResumableSampler, derive_seed, step_generator
from sphereface_plus.errors import UsageError
from sphereface_plus.losses import smoothed_cross_entropy
from sphereface_plus.mhe import (OBJECTIVES, POWERS, MHERegularizer, check_objective, default_coefficients,
                                 normalize_power, resolve_settings)
from sphereface_plus.models import create_backbone
from sphereface_plus.utils import atomic_write_json, atomic_write_text, progress

log = logging.getLogger(__name__)

HELP = "MHE CIFAR-100/10 experiments (9-conv CNN; baseline, full- and half-space MHE, s in 0/1/2/a0/a1/a2)"

MODEL_NAMES = ("baseline", "mhe", "half_mhe")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # cifar_<model_name>.yaml

# The reference schedule (docs/theory.md#cifar-setup): 42.5k iterations, lr x0.1 at 20k, 30k and 37.5k.
REFERENCE_ITERATIONS = 42500
REFERENCE_MILESTONES = (20000, 30000, 37500)
# lr_schedule -> (iterations, milestones) of the authors' train.py: wy1iu/MHE, and rmlin/CoMHE with
# wy1iu/Sphere-Uniformity (75k iterations, x0.1 at 30k, 50k, 65k); scaled to a run's length
LR_SCHEDULES: Dict[str, Tuple[int, Tuple[int, ...]]] = {
    "mhe": (REFERENCE_ITERATIONS, REFERENCE_MILESTONES),
    "comhe": (75000, (30000, 50000, 65000)),
}
EVAL_BATCH = 500

# Published CIFAR-100 test accuracy (%) at the final iteration (docs/theory.md#cifar-setup).
PUBLISHED_CIFAR100: Dict[Tuple[str, str], float] = {
    ("baseline", "-"): 69.74,
    ("mhe", "0"): 73.16, ("mhe", "1"): 72.85, ("mhe", "2"): 72.78,
    ("mhe", "a0"): 71.97, ("mhe", "a1"): 72.50, ("mhe", "a2"): 72.76,
    ("half_mhe", "0"): 73.75, ("half_mhe", "1"): 73.60, ("half_mhe", "2"): 73.99,
    ("half_mhe", "a0"): 73.53, ("half_mhe", "a1"): 73.42, ("half_mhe", "a2"): 73.94,
}
# The 13 settings of the published table, in its order.
SWEEP_SETTINGS: List[Tuple[str, str]] = [("baseline", "-")] + [(m, s) for m in ("mhe", "half_mhe") for s in POWERS]

# hidden layers of cifar_cnn9 (the 9 convs and fc6) and its output layer
HIDDEN_LAYERS = tuple(f"features.conv{i}_{j}" for i in (1, 2, 3) for j in (1, 2, 3)) + ("fc6",)
OUTPUT_LAYER = "score"

# settings that may differ on resume: the data folder moves between machines; the log and evaluation
# cadences change what is recorded, not what is computed (issue 20)
RESUMABLE_CHANGES = ("data", "log_every", "eval_every")


@dataclass
class CifarConfig:
    """Everything that defines a run (the YAML schema); stored in ``config.json`` and in every checkpoint."""

    model_name: str = "mhe"  # baseline | mhe | half_mhe
    mhe_power: str = "0"  # MHE kernel s: sphereface_plus.mhe.POWERS (the seed's --power_s)
    dataset: str = "cifar100"  # data_prep.cifar.CIFAR_DATASETS
    data: str = "."  # folder with the CIFAR python pickles
    iterations: int = REFERENCE_ITERATIONS
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on every parameter, BN included (the reference's l2_regularizer)
    lr_gamma: float = 0.1
    eval_every: int = 500
    log_every: int = 100
    seed: int = 0
    mhe_scale: float = 1.0
    label_smoothing: float = 0.01
    log_eps: float = 1e-4
    bn_momentum: Optional[float] = None  # None: the network's own (0.001, docs/theory.md#cifar-setup)
    # network precision: sphereface_plus.engine.precision.SETTINGS; auto = bf16 where the CPU/GPU has
    # native bf16, else fp32 (fp32 / off = float32). The loss and the MHE terms are always float32.
    precision: str = "auto"
    # the regulariser: sphereface_plus.mhe.OBJECTIVES (docs/theory.md#mhe-family); null settings take the
    # authors' defaults of the objective (CoMHE pd/pn, inner steps of projections and poles, MHC's gamma)
    mhe_objective: str = "mhe"
    mhe_projection_dim: Optional[int] = None
    mhe_projections: Optional[int] = None
    mhe_inner_steps: Optional[int] = None
    mhe_gamma: Optional[float] = None
    lr_schedule: str = "mhe"  # LR_SCHEDULES: the authors' milestones, scaled to `iterations`

    #: keys of earlier releases, still read (with a warning) from old recipes and checkpoints
    RENAMED_KEYS = {"amp": "precision", "power_s": "mhe_power"}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.model_name not in MODEL_NAMES:
            raise ConfigError(f"model_name {self.model_name!r}: choose one of {', '.join(MODEL_NAMES)}")
        try:
            self.mhe_objective = check_objective(self.mhe_objective)
            self.mhe_settings()
        except ValueError as e:
            raise ConfigError(str(e).replace("MHE objective", "mhe_objective")) from None  # names the recipe's keys
        if self.model_name == "half_mhe" and not OBJECTIVES[self.mhe_objective].half_space:
            raise ConfigError(f"mhe_objective {self.mhe_objective} has no half-space form: use model_name mhe")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule {self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
        if self.model_name == "baseline" or not OBJECTIVES[self.mhe_objective].uses_power:
            self.mhe_power = "-"
        else:
            try:
                self.mhe_power = normalize_power(self.mhe_power)  # parsed once, here
            except ValueError:
                raise ConfigError(f"mhe_power {self.mhe_power!r}: choose one of {', '.join(POWERS)}") from None
        if self.dataset not in CIFAR_DATASETS:
            raise ConfigError(f"dataset {self.dataset!r}: choose one of {', '.join(CIFAR_DATASETS)}")
        for name, lo in (("iterations", 0), ("batch_size", 1), ("eval_every", 1), ("log_every", 1)):
            if int(getattr(self, name)) < lo:
                raise ConfigError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not self.mhe_scale >= 0:
            raise ConfigError(f"mhe_scale must be >= 0, got {self.mhe_scale}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.log_eps >= 0:
            raise ConfigError(f"log_eps must be >= 0, got {self.log_eps}")
        if self.precision not in PRECISION_SETTINGS:
            raise ConfigError(f"precision {self.precision!r}: choose one of {', '.join(PRECISION_SETTINGS)}")
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            raise ConfigError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")

    @property
    def setting(self) -> str:
        """``baseline``, ``mhe_0`` .. ``half_mhe_a2`` (the reference's log folder names); another objective:
        its name, its kernel for CoMHE, ``half_`` first for the half-space form (``half_comhe_rp_2``,
        ``half_mhs``, ``r_mhp``)."""
        if self.model_name == "baseline":
            return "baseline"
        if self.mhe_objective == "mhe":
            return f"{self.model_name}_{self.mhe_power}"
        name = self.mhe_objective + ("" if self.mhe_power == "-" else f"_{self.mhe_power}")
        return f"half_{name}" if self.model_name == "half_mhe" else name

    def mhe_settings(self):
        """The objective's settings in force (``sphereface_plus.mhe.resolve_settings``)."""
        return resolve_settings(self.mhe_objective, self.mhe_projection_dim, self.mhe_projections,
                                self.mhe_inner_steps, self.mhe_gamma, self.seed, prefix="mhe_")

    @property
    def num_classes(self) -> int:
        return 100 if self.dataset == "cifar100" else 10

    @property
    def milestones(self) -> Tuple[int, ...]:
        return scaled_milestones(self.iterations, self.lr_schedule)

    def coefficients(self) -> Tuple[float, float]:
        """``(λ_h, λ_o)`` actually used: the coefficients of docs/theory.md#mhe-regularizer times
        ``mhe_scale`` (0, 0 for the baseline)."""
        if self.model_name == "baseline":
            return 0.0, 0.0
        # the reference's (hidden, output) coefficients by power (docs/theory.md#mhe-regularizer, owned by mhe.py); the
        # published full-space logs match these x 0.1, the half-space logs exactly; the other objectives' own
        h, o = default_coefficients(self.mhe_objective, None if self.mhe_power == "-" else self.mhe_power)
        return h * self.mhe_scale, o * self.mhe_scale

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# pieces of the recipe


def scaled_milestones(iterations: int, schedule: str = "mhe") -> Tuple[int, ...]:
    """The lr milestones for a run of ``iterations`` updates (``schedule``: :data:`LR_SCHEDULES`).

    The reference's 20k/30k/37.5k of 42.5k are kept as fractions of the run, so ``iterations=42500``
    gives exactly (20000, 30000, 37500) and a shorter run keeps the same shape (e.g. 4250 ->
    (2000, 3000, 3750)). Scaling was chosen over truncating because a truncated run would never leave
    lr 0.1, and the last two thirds of the schedule are where the published accuracy is made.
    """
    reference, milestones = LR_SCHEDULES[schedule]
    return tuple(int(round(m * iterations / reference)) for m in milestones)


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


def evaluate(model, images, labels, cfg: CifarConfig, device, batch_size: int = EVAL_BATCH,
             precision: str = "fp32") -> Tuple[float, float]:
    """Accuracy (in [0, 1]) and mean classification loss on a whole split, BN in inference mode."""
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, images.shape[0]
    with torch.inference_mode():
        for s in range(0, n, batch_size):
            x = to_network_input(images[s : s + batch_size].to(device, non_blocking=True))
            y = labels[s : s + batch_size].to(device, non_blocking=True)
            logits = forward(model, x, precision)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(smoothed_cross_entropy(logits, y, cfg.label_smoothing, cfg.log_eps)) * y.shape[0]
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


# ----------------------------------------------------------------------------------------------------
# the run


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
    # issue 20: the engine's run-folder policy (lock, refusal without --resume) and preemption
    with RunFolder(out_dir, resume, command=f"sphereface-plus cifar ({cfg.setting})", resume_hint="--resume",
                   out_hint="--out <another folder>", what="--out") as run, Preemption() as stop:
        return _train_cifar(cfg, out_dir, device, bool(run.resume), stop_after, stop)


def _train_cifar(cfg: CifarConfig, out_dir, device: str, resume: bool, stop_after: Optional[int],
                 stop: Preemption) -> Dict[str, Any]:
    """The body of :func:`train_cifar`, inside its run folder."""
    out = Path(out_dir)
    dev = resolve_device(device, setting="--device")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # a checkpoint of an earlier release lacks the settings added since: compared at their defaults
    found = ckpt.resume_run_state(out, resume, cfg.to_dict(), RESUMABLE_CHANGES,
                                  view=lambda c: stored_config_as_read(c, CifarConfig))
    state = found[1] if found else None
    if found:
        log.info("resuming %s from iteration %d (%s)", cfg.setting, int(state["iteration"]), found[0])
    elif resume:
        log.info("no checkpoint in %s: starting %s from scratch", out, cfg.setting)

    data = load_cifar(cfg.data, cfg.dataset)
    train_x, train_y = torch.from_numpy(data["train_images"]), torch.from_numpy(data["train_labels"])
    test_x, test_y = torch.from_numpy(data["test_images"]), torch.from_numpy(data["test_labels"])
    if dev.type == "cuda":  # 150 MB for CIFAR-100: keep it on the GPU, augment there
        train_x, train_y = train_x.to(dev), train_y.to(dev)
    sampler = ResumableSampler(train_x.shape[0], cfg.batch_size, cfg.iterations, seed=cfg.seed, flip=False,
                               drop_last=True, epoch_seed=lambda e: derive_seed(cfg.seed, 1, e))

    model = build_model(cfg.num_classes, cfg.seed, cfg.bn_momentum).to(dev)
    precision = resolve_precision(cfg.precision, dev, what="precision")
    log.info("%s: training precision %s (precision=%s)", cfg.setting, precision, cfg.precision)
    reg = build_regularizer(model, cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = multistep_scheduler(optimizer, cfg.milestones, cfg.lr_gamma)
    log_window, eval_window = RunningMeans(), RunningMeans()
    start, elapsed_before = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["iteration"])
        log_window.load_state_dict(state["windows"]["log"])
        eval_window.load_state_dict(state["windows"]["eval"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        if reg is not None and state.get("mhe_state") is not None:
            reg.load_state_dict(state["mhe_state"])

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {**cfg.to_dict(), "setting": cfg.setting, "milestones": list(cfg.milestones),
                                            "coefficients": list(cfg.coefficients()), "device": str(dev)})
    header = f"model_name: {cfg.model_name}, power_s: {cfg.mhe_power}, dataset: {cfg.dataset}\n"
    writer = open_tensorboard(out / "tb", purge_step=start)
    bar = progress(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=cfg.setting)
    train_log = MetricsLogger(out, jsonl=None, text="log_train.txt", text_header=header, text_format=_fmt_train,
                              writer=writer, tb_prefix="train", bar=bar, postfix=("loss", "train_accuracy"))
    test_log = MetricsLogger(out, jsonl="metrics.jsonl", text="log_test.txt", text_header=header,
                             text_format=_fmt_test, writer=None)
    if state is not None:
        train_log.load_state_dict(state["logs"]["train"])
        test_log.load_state_dict(state["logs"]["test"])
    t0 = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def save(iteration: int) -> None:
        ckpt.save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "iteration": iteration, "config": cfg.to_dict(),
                              "logs": {"train": train_log.state_dict(), "test": test_log.state_dict()},
                              "windows": {"log": log_window.state_dict(), "eval": eval_window.state_dict()},
                              "elapsed_s": elapsed(), "mhe_state": reg.state_dict() if reg is not None else None}, out)

    def batch(update: int):
        idx = sampler.batch_indices(update)
        x = random_pad_crop_flip(train_x[idx.to(train_x.device)], step_generator(cfg.seed, 2, update))
        return to_network_input(x.to(dev, non_blocking=True)), train_y[idx.to(train_y.device)].to(dev)

    def record_eval(iteration: int, train_means: Dict[str, float], snap: Optional[Dict[str, Any]] = None) -> None:
        acc, test_loss = evaluate(model, test_x, test_y, cfg, dev, precision=precision)
        snap = snap if snap is not None else mhe_snapshot(reg)
        row = test_log.log(iteration, test_accuracy=acc, test_loss=test_loss, loss=train_means["loss"],
                           task_loss=train_means["task_loss"], train_accuracy=train_means["train_accuracy"],
                           mhe_hidden=snap["mhe_hidden"], mhe_output=snap["mhe_output"],
                           lr=cfg.lr * lr_factor(max(iteration - 1, 0), cfg.milestones, cfg.lr_gamma),
                           elapsed_s=round(elapsed(), 3), mhe_layers=snap["mhe_layers"])
        train_log.scalars(iteration, "test", accuracy=acc, loss=test_loss)
        train_log.scalars(iteration, "mhe_layer", **snap["mhe_layers"])
        train_log.flush()
        log.info("%s %s", cfg.setting, _fmt_test(row))

    stopped, done = False, start
    try:
        if start == 0:
            # iteration 0: before any update. `loss` is the objective on the first training batch at
            # the initial weights (train-mode BN, running statistics left untouched).
            model.train()
            with torch.no_grad(), frozen_batchnorm_stats(model):
                x, y = batch(0)
                logits = forward(model, x, precision)
                task = float(smoothed_cross_entropy(logits, y, cfg.label_smoothing, cfg.log_eps))
                train_acc = float((logits.argmax(1) == y).float().mean())
            snap = mhe_snapshot(reg)
            record_eval(0, {"loss": task + snap["mhe_hidden"] + snap["mhe_output"], "task_loss": task,
                            "train_accuracy": train_acc}, snap)
            save(0)
        model.train()
        for update in bar:
            lr = optimizer.param_groups[0]["lr"]
            x, y = batch(update)
            vals = train_step(model, reg, optimizer, x, y, cfg, precision)
            scheduler.step()
            it = done = update + 1  # updates done
            if not math.isfinite(vals["loss"]):
                raise UsageError(f"{cfg.setting}: the loss became {vals['loss']} at iteration {it} (lr {lr}); lower lr")
            log_window.add(**vals)
            eval_window.add(**vals)
            train_log.scalars(it, **vals, lr=lr)
            if it % cfg.log_every == 0 or it == cfg.iterations:
                train_log.log(it, **log_window.means(), lr=lr)
                log_window.reset()
            if it % cfg.eval_every == 0 or it == cfg.iterations:
                record_eval(it, eval_window.means())
                eval_window.reset()
                save(it)
            signal_name = stop.requested() if it < cfg.iterations else None
            if signal_name:  # SIGTERM / SIGINT / SIGUSR1: this update's checkpoint, then stop
                if it % cfg.eval_every != 0:
                    save(it)
                raise preempted(signal_name, it, ckpt.checkpoint_dir(out) / "last.pt",
                                how="rerun the same command with --resume")
            if stop_after is not None and it >= stop_after and it < cfg.iterations:
                if it % cfg.eval_every != 0:
                    save(it)
                stopped = True
                break
    except KeyboardInterrupt:
        log.warning("interrupted: the last checkpoint (%s) resumes this run with --resume", ckpt.checkpoint_dir(out))
        raise
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    rows = test_log.rows
    return {"setting": cfg.setting, "final_accuracy": rows[-1]["test_accuracy"],
            "best_accuracy": max(r["test_accuracy"] for r in rows), "iterations": done, "out": str(out),
            "elapsed_s": round(elapsed(), 1), "stopped": stopped, "precision": precision}


# ----------------------------------------------------------------------------------------------------
# sweep


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
    "mhe_scale": (float, "multiplies the original's coefficients (λ_h, λ_o) = (1, 10) for 0/1/2/a0, (0.1, 1) for a1/a2; "
                         "0.1 matches the published full-space logs"),
    "dataset": (str, f"{' | '.join(CIFAR_DATASETS)} (fine labels for cifar100)"),
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
        "  sphereface-plus cifar --config configs/cifar_half_mhe.yaml mhe_power=a0 data=cifar-100-python\n"
        "  sphereface-plus cifar --sweep --data cifar-100-python --out runs/cifar-sweep\n"
        "\nThe published full-space (mhe) logs used the coefficients x 0.1: add --mhe-scale 0.1 to match them.\n"
        "Every flag of the seed is accepted with dashes or underscores; the defaults are the recipe's "
        "(configs/cifar_<model_name>.yaml)."
    )
    parser.add_argument("--config", help="YAML recipe (configs/cifar_baseline.yaml, cifar_mhe.yaml, cifar_half_mhe.yaml); "
                                         "default: the built-in recipe (= cifar_mhe.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe fields, e.g. mhe_power=2 iterations=2000")
    g = parser.add_argument_group("recipe fields as flags (the reference's flags; override the YAML)")
    add_field_flags(g, _SETTING_FLAGS, _FLAG_ALIASES)
    r = parser.add_argument_group("run")
    r.add_argument("--sweep", action="store_true",
                   help="run all 13 settings of the published table into OUT/<setting>/ and write OUT/results.md")
    r.add_argument("--out", default=None, help="run folder (default: runs/cifar/<dataset>/<setting>, or .../sweep)")
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    r.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ... (default: auto)")
    r.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (torch.set_num_threads); 0 keeps torch's default. The augmentation "
                        "is vectorised on the batch, so no loader processes (--workers elsewhere) are needed")


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


__all__ = ["CifarConfig", "train_cifar", "run_sweep", "results_table", "scaled_milestones", "build_model",
           "build_optimizer", "build_regularizer", "mhe_snapshot", "evaluate", "train_step", "forward"]
