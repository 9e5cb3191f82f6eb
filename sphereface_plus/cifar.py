"""``sphereface-plus cifar``: the MHE CIFAR experiments (SPEC section 7; Liu et al., NeurIPS 2018).

The seed's second entry point (``python train.py --model_name=mhe --power_s=0``), with its flags kept::

    sphereface-plus cifar --model_name mhe --power_s 0 --data cifar-100-python
    sphereface-plus cifar --model_name half_mhe --power_s 2 --dataset cifar10 --data DIR --iterations N --out DIR
    sphereface-plus cifar --sweep --data cifar-100-python --out runs/cifar-sweep

The recipe is the reference code's, step for step:

- network ``cifar_cnn9`` (9 convs with BN + ReLU, ``fc6`` 4x4 conv, ``score`` 1x1 conv), input RGB
  ``(x - 127.5) / 128``;
- MHE (``sphereface_plus.mhe.MHERegularizer``) on the 9 convs and ``fc6`` (hidden; half-space for
  ``half_mhe``) and on ``score`` (output, always full-space), with the SPEC section 5 coefficients
  ``(λ_h, λ_o) = (1, 10)`` for s in {0, 1, 2, a0} and ``(0.1, 1)`` for a1/a2, times ``--mhe_scale``;
- loss ``-Σ_j t_j log(softmax_j + 1e-4)`` with label-smoothed targets ``t = 0.99·onehot + 0.01/C``
  (see :func:`smoothed_cross_entropy` for why the +1e-4 is kept);
- augmentation: symmetric padding by 4, random 32x32 crop, random horizontal flip, done on the whole
  batch at once in torch (:func:`random_pad_crop_flip`);
- SGD momentum 0.9, weight decay 5e-4 on every parameter (BN included), batch 128, lr 0.1 divided by
  10 at iterations 20k, 30k, 37.5k of 42.5k (a shorter or longer ``--iterations`` scales these
  milestones proportionally, :func:`scaled_milestones`);
- data: each epoch a fresh permutation, ``floor(N / batch)`` batches (the last partial batch is
  dropped, as the reference's 390 batches of 128 per epoch did);
- evaluation on the whole test set before the first update, every 500 iterations and after the last.

Outputs in ``--out``: ``metrics.jsonl`` (one JSON object per evaluation), ``log_train.txt`` and
``log_test.txt``, ``config.json``, TensorBoard events in ``tb/``, ``checkpoints/last.pt`` (resumable with
``--resume``). ``--sweep`` runs the 13 settings of the published table into ``OUT/<setting>/`` and writes
``OUT/results.md`` beside the published CIFAR-100 numbers.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from sphereface_plus.mhe import DEFAULT_COEFFICIENTS, POWERS

log = logging.getLogger(__name__)

HELP = "MHE CIFAR-100/10 experiments (9-conv CNN; baseline, full- and half-space MHE, s in 0/1/2/a0/a1/a2)"

MODEL_NAMES = ("baseline", "mhe", "half_mhe")

# The reference schedule (SPEC section 7): 42.5k iterations, lr x0.1 at 20k, 30k and 37.5k.
REFERENCE_ITERATIONS = 42500
REFERENCE_MILESTONES = (20000, 30000, 37500)
LR_GAMMA = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
LABEL_SMOOTHING = 0.01
LOG_EPS = 1e-4
PAD = 4
EVAL_BATCH = 500

# (hidden, output) MHE coefficients of the reference code by power_s (SPEC section 5); --mhe_scale
# multiplies both. The published full-space logs match these x 0.1, the half-space logs exactly.
COEFFICIENTS: Dict[str, Tuple[float, float]] = DEFAULT_COEFFICIENTS

# Published CIFAR-100 test accuracy (%) at the final iteration (SPEC section 7).
PUBLISHED_CIFAR100: Dict[Tuple[str, str], float] = {
    ("baseline", "-"): 69.74,
    ("mhe", "0"): 73.16,
    ("mhe", "1"): 72.85,
    ("mhe", "2"): 72.78,
    ("mhe", "a0"): 71.97,
    ("mhe", "a1"): 72.50,
    ("mhe", "a2"): 72.76,
    ("half_mhe", "0"): 73.75,
    ("half_mhe", "1"): 73.60,
    ("half_mhe", "2"): 73.99,
    ("half_mhe", "a0"): 73.53,
    ("half_mhe", "a1"): 73.42,
    ("half_mhe", "a2"): 73.94,
}

# The 13 settings of the published table, in its order.
SWEEP_SETTINGS: List[Tuple[str, str]] = [("baseline", "-")] + [(m, s) for m in ("mhe", "half_mhe") for s in POWERS]

# hidden layers of cifar_cnn9 (the 9 convs and fc6) and its output layer
HIDDEN_LAYERS = tuple(f"features.conv{i}_{j}" for i in (1, 2, 3) for j in (1, 2, 3)) + ("fc6",)
OUTPUT_LAYER = "score"


class CifarRunError(RuntimeError):
    """A run cannot start or resume as asked (the message says why and what to do)."""


@dataclass
class CifarConfig:
    """Everything that defines a run; stored in ``config.json`` and in every checkpoint."""

    model_name: str = "mhe"
    power_s: str = "0"
    dataset: str = "cifar100"
    data: str = "."
    iterations: int = REFERENCE_ITERATIONS
    batch_size: int = 128
    lr: float = 0.1
    eval_every: int = 500
    log_every: int = 100
    seed: int = 0
    mhe_scale: float = 1.0
    label_smoothing: float = LABEL_SMOOTHING
    log_eps: float = LOG_EPS
    bn_momentum: Optional[float] = None  # None: the network's own (0.001, SPEC section 7)

    def __post_init__(self) -> None:
        if self.model_name not in MODEL_NAMES:
            raise ValueError(f"model_name {self.model_name!r}: choose one of {', '.join(MODEL_NAMES)}")
        if self.model_name == "baseline":
            self.power_s = "-"
        elif self.power_s not in POWERS:
            raise ValueError(f"power_s {self.power_s!r}: choose one of {', '.join(POWERS)}")
        if self.dataset not in ("cifar100", "cifar10"):
            raise ValueError(f"dataset {self.dataset!r}: choose cifar100 or cifar10")
        for name, lo in (("iterations", 0), ("batch_size", 1), ("eval_every", 1), ("log_every", 1)):
            if int(getattr(self, name)) < lo:
                raise ValueError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.mhe_scale >= 0:
            raise ValueError(f"mhe_scale must be >= 0, got {self.mhe_scale}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.log_eps >= 0:
            raise ValueError(f"log_eps must be >= 0, got {self.log_eps}")
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")

    @property
    def setting(self) -> str:
        """``baseline``, ``mhe_0`` .. ``half_mhe_a2`` (the reference's log folder names)."""
        return "baseline" if self.model_name == "baseline" else f"{self.model_name}_{self.power_s}"

    @property
    def num_classes(self) -> int:
        return 100 if self.dataset == "cifar100" else 10

    @property
    def milestones(self) -> Tuple[int, ...]:
        return scaled_milestones(self.iterations)

    def coefficients(self) -> Tuple[float, float]:
        """``(λ_h, λ_o)`` actually used: the SPEC table times ``mhe_scale`` (0, 0 for the baseline)."""
        if self.model_name == "baseline":
            return 0.0, 0.0
        h, o = COEFFICIENTS[self.power_s]
        return h * self.mhe_scale, o * self.mhe_scale

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# pure pieces: schedule, loss, augmentation, model, regulariser


def scaled_milestones(iterations: int) -> Tuple[int, ...]:
    """The lr milestones for a run of ``iterations`` updates.

    The reference's 20k/30k/37.5k of 42.5k are kept as fractions of the run, so ``--iterations 42500``
    gives exactly (20000, 30000, 37500) and a shorter run keeps the same shape (e.g. 4250 ->
    (2000, 3000, 3750)). Scaling was chosen over truncating because a truncated run would never leave
    lr 0.1, and the last two thirds of the schedule are where the published accuracy is made.
    """
    return tuple(int(round(m * iterations / REFERENCE_ITERATIONS)) for m in REFERENCE_MILESTONES)


def lr_at(update: int, base_lr: float, milestones: Sequence[int], gamma: float = LR_GAMMA) -> float:
    """Learning rate of the update with 0-based index ``update``.

    As in the reference loop (``if i == 20000: lr *= 0.1`` before the step ``i``), the update whose
    index equals a milestone already uses the reduced rate.
    """
    return base_lr * gamma ** sum(1 for m in milestones if update >= m)


def smoothed_cross_entropy(
    logits, labels, smoothing: float = LABEL_SMOOTHING, log_eps: float = LOG_EPS
):
    """The reference's classification loss: ``mean_b -Σ_j t_bj log(p_bj + log_eps)``.

    Targets ``t = (1 - smoothing)·onehot + smoothing / C`` (0.99 / 0.0001 for CIFAR-100), ``p`` the
    softmax of ``logits``.

    Why the ``+1e-4`` inside the log is reproduced (``log_eps=1e-4``, the default): it is part of the
    published dynamics. It caps each sample's loss at ``-log(1e-4) ≈ 9.21``, and where the softmax is
    saturated on a wrong class the gradient through ``p + 1e-4`` all but vanishes; with lr 0.1 this is
    why the reference logs sit at a training loss of 9.07-9.21 (chance accuracy) for the first
    ~1,200-2,500 iterations until weight decay has shrunk the logits (SPEC section 7). The published
    logs match this formula to four digits (9.2094 for a batch with no correct sample, 9.1382 with one
    of 128). ``log_eps=0`` gives the usual numerically stable ``log_softmax`` form instead.
    """
    import torch

    num_classes = logits.shape[1]
    target = torch.full_like(logits, smoothing / num_classes, dtype=torch.float32)
    target.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + smoothing / num_classes)
    logits = logits.float()
    if log_eps > 0:
        logp = torch.log(torch.softmax(logits, dim=1) + log_eps)
    else:
        logp = torch.log_softmax(logits, dim=1)
    return -(target * logp).sum(dim=1).mean()


def _symmetric_index(pos, size: int):
    """Map positions in ``[-size, 2*size)`` onto ``[0, size)`` by edge-including mirroring.

    This is numpy's ``np.pad(mode='symmetric')``: ``-1 -> 0``, ``-2 -> 1``, ``size -> size - 1``.
    (``torch.nn.functional.pad(mode='reflect')`` would exclude the edge: ``-1 -> 1``.)
    """
    import torch

    pos = torch.where(pos < 0, -pos - 1, pos)
    return torch.where(pos >= size, 2 * size - 1 - pos, pos)


def random_pad_crop_flip(images, generator=None, pad: int = PAD):
    """Symmetric padding by ``pad``, a random crop back to the input size, a random horizontal flip.

    The reference did this image by image in numpy (``np.pad(..., 'symmetric')``, ``randint(9)``
    offsets, ``fliplr`` with probability 1/2); here the three steps are folded into one gather over
    the batch: each output pixel ``(b, y, x)`` reads the input at ``(row[b, y], col[b, x])``.

    Args:
        images: ``B x H x W x C`` tensor (any dtype, any device), ``pad <= min(H, W)``.
        generator: a CPU ``torch.Generator`` for the offsets and flips (None: the global one).

    Returns:
        ``B x H x W x C`` tensor of the same dtype and device.
    """
    import torch

    b, h, w = images.shape[:3]
    if pad > min(h, w):
        raise ValueError(f"symmetric padding of {pad} needs images of at least {pad} pixels, got {h}x{w}")
    off_y = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    off_x = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    flip = torch.randint(0, 2, (b, 1), generator=generator).bool()
    rows = _symmetric_index(off_y + torch.arange(h) - pad, h)
    cols = off_x + torch.arange(w) - pad
    cols = _symmetric_index(torch.where(flip, cols.flip(1), cols), w)
    dev = images.device
    bidx = torch.arange(b, device=dev).view(b, 1, 1)
    return images[bidx, rows.to(dev).view(b, h, 1), cols.to(dev).view(b, 1, w)]


def to_network_input(images):
    """``B x 32 x 32 x 3`` uint8 RGB -> ``B x 3 x 32 x 32`` float32 ``(x - 127.5) / 128`` (SPEC section 7)."""
    return images.permute(0, 3, 1, 2).float().sub_(127.5).div_(128.0).contiguous()


def build_model(num_classes: int, seed: int = 0, bn_momentum: Optional[float] = None):
    """``cifar_cnn9`` initialised from ``torch.manual_seed(seed)`` (so a seed always gives the same weights)."""
    import torch
    import torch.nn as nn

    from sphereface_plus.models import create_backbone

    torch.manual_seed(seed)
    model = create_backbone("cifar_cnn9", num_classes=num_classes)
    if bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = float(bn_momentum)
    return model


def build_regularizer(model, cfg: CifarConfig):
    """The MHE regulariser of a setting, or None for the baseline (and for ``--mhe_scale 0``)."""
    from sphereface_plus.mhe import MHERegularizer

    if cfg.model_name == "baseline" or cfg.mhe_scale == 0:
        return None
    hidden_coef, output_coef = cfg.coefficients()
    reg = MHERegularizer(
        model,
        power=cfg.power_s,
        half_space=cfg.model_name == "half_mhe",
        hidden_coef=hidden_coef,
        output_coef=output_coef,
        include=list(HIDDEN_LAYERS) + [OUTPUT_LAYER],
        output_layers=[OUTPUT_LAYER],
    )
    if tuple(reg.hidden_layers) != HIDDEN_LAYERS or tuple(reg.output_layers) != (OUTPUT_LAYER,):
        raise CifarRunError(
            f"MHE selected hidden={reg.hidden_layers}, output={reg.output_layers}; expected the 9 convs "
            f"and fc6 as hidden layers and score as output (has cifar_cnn9 renamed its layers?)"
        )
    return reg


def split_terms(reg, values: Dict[str, Any]) -> Tuple[float, float]:
    """Weighted hidden and output MHE terms (as added to the loss) from the per-layer energies."""
    if reg is None:
        return 0.0, 0.0
    hidden = sum(float(values[n]) for n in reg.hidden_layers)
    output = sum(float(values[n]) for n in reg.output_layers)
    return reg.hidden_coef * hidden, reg.output_coef * output


def mhe_snapshot(reg) -> Dict[str, Any]:
    """MHE terms at the current weights: ``mhe_hidden``, ``mhe_output`` (weighted) and per-layer energies."""
    import torch

    if reg is None:
        return {"mhe_hidden": 0.0, "mhe_output": 0.0, "mhe_layers": {}}
    with torch.no_grad():
        _, values = reg()
    hidden, output = split_terms(reg, values)
    return {"mhe_hidden": hidden, "mhe_output": output, "mhe_layers": {k: float(v) for k, v in values.items()}}


@contextmanager
def frozen_batchnorm_stats(model) -> Iterator[None]:
    """Train-mode forward passes that leave the BN running statistics untouched (momentum 0)."""
    import torch.nn as nn

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


def evaluate(model, images, labels, cfg: CifarConfig, device, batch_size: int = EVAL_BATCH) -> Tuple[float, float]:
    """Accuracy (in [0, 1]) and mean classification loss on a whole split, BN in inference mode."""
    import torch

    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, images.shape[0]
    with torch.inference_mode():
        for s in range(0, n, batch_size):
            x = to_network_input(images[s : s + batch_size].to(device, non_blocking=True))
            y = labels[s : s + batch_size].to(device, non_blocking=True)
            logits = model(x)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(smoothed_cross_entropy(logits, y, cfg.label_smoothing, cfg.log_eps)) * y.shape[0]
    model.train(was_training)
    return correct / max(n, 1), loss_sum / max(n, 1)


def build_optimizer(model, lr: float):
    """SGD, momentum 0.9, weight decay 5e-4 on every parameter, BN gamma/beta included.

    The reference put ``l2_regularizer(5e-4)`` (``5e-4 * |w|^2 / 2``, gradient ``5e-4 * w``) on the
    filters and the BN variables and used TF's momentum update ``v = 0.9 v + g; w -= lr v``: exactly
    ``torch.optim.SGD(momentum=0.9, weight_decay=5e-4)``, including how a changed lr acts on ``v``.
    """
    import torch

    return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def train_step(model, reg, optimizer, x, y, cfg: CifarConfig) -> Dict[str, float]:
    """One SGD update on a prepared batch: task loss + weighted MHE terms, backward, step.

    Returns the quantities of the update as floats: ``loss`` (the full objective), ``task_loss``,
    ``mhe_hidden``, ``mhe_output`` (weighted, as added to the loss) and ``train_accuracy``.
    """
    logits = model(x)
    task = smoothed_cross_entropy(logits, y, cfg.label_smoothing, cfg.log_eps)
    loss = task
    hidden = output = 0.0
    if reg is not None:
        mhe_loss, values = reg()
        loss = loss + mhe_loss
        hidden, output = split_terms(reg, values)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {
        "loss": float(loss.detach()),
        "task_loss": float(task.detach()),
        "mhe_hidden": hidden,
        "mhe_output": output,
        "train_accuracy": float((logits.detach().argmax(1) == y).float().mean()),
    }


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class BatchSchedule:
    """Which training images update ``k`` uses, as a pure function of (seed, k): resumable exactly.

    Epoch ``e`` is a permutation drawn from a generator seeded by ``(seed, e)``; it is cut into
    ``floor(N / batch)`` batches. Augmentation draws come from a generator seeded by ``(seed, k)``.
    """

    def __init__(self, num_images: int, batch_size: int, seed: int):
        import torch

        if batch_size > num_images:
            raise CifarRunError(f"--batch_size {batch_size} is larger than the training set ({num_images} images)")
        self.n, self.batch, self.seed = num_images, batch_size, seed
        self.steps_per_epoch = num_images // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, update: int):
        import torch

        epoch, pos = divmod(update, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_derived_seed(self.seed, 1, epoch))
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[pos * self.batch : (pos + 1) * self.batch]

    def augment_generator(self, update: int):
        import torch

        return torch.Generator().manual_seed(_derived_seed(self.seed, 2, update))


# ----------------------------------------------------------------------------------------------------
# the run


def resolve_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CifarRunError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
    return dev


def _fmt_train(row: Dict[str, Any]) -> str:
    return (
        f"iter {row['iteration']:6d}  loss {row['loss']:.4f}  task {row['task_loss']:.4f}  "
        f"mhe_hidden {row['mhe_hidden']:.4f}  mhe_output {row['mhe_output']:.4f}  "
        f"acc {row['train_accuracy']:.4f}  lr {row['lr']:.6g}"
    )


def _fmt_test(row: Dict[str, Any]) -> str:
    return (
        f"iter {row['iteration']:6d}  test_acc {row['test_accuracy']:.4f}  test_loss {row['test_loss']:.4f}  "
        f"loss {row['loss']:.4f}  mhe_hidden {row['mhe_hidden']:.4f}  mhe_output {row['mhe_output']:.4f}  "
        f"lr {row['lr']:.6g}"
    )


class _Window:
    """Running means of the training quantities between two log lines."""

    KEYS = ("loss", "task_loss", "mhe_hidden", "mhe_output", "train_accuracy")

    def __init__(self, state: Optional[Dict[str, float]] = None):
        self.sums = {k: 0.0 for k in self.KEYS}
        self.count = 0
        if state:
            self.sums.update({k: float(state["sums"][k]) for k in self.KEYS})
            self.count = int(state["count"])

    def add(self, **vals: float) -> None:
        for k in self.KEYS:
            self.sums[k] += float(vals[k])
        self.count += 1

    def means(self) -> Dict[str, float]:
        c = max(self.count, 1)
        return {k: v / c for k, v in self.sums.items()}

    def state(self) -> Dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count}


def _write_outputs(out: Path, cfg: CifarConfig, history: Dict[str, List[Dict[str, Any]]]) -> None:
    """Rewrite metrics.jsonl and the two text logs from the history (each file atomically)."""
    from sphereface_plus.utils import atomic_write_text

    header = f"model_name: {cfg.model_name}, power_s: {cfg.power_s}, dataset: {cfg.dataset}\n"
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history["test"]))
    atomic_write_text(out / "log_train.txt", header + "".join(_fmt_train(r) + "\n" for r in history["train"]))
    atomic_write_text(out / "log_test.txt", header + "".join(_fmt_test(r) + "\n" for r in history["test"]))


def _check_resume_config(saved: Dict[str, Any], cfg: CifarConfig, path: Path) -> None:
    # the data folder may move between machines; everything else defines the run
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}"
        for k, v in cfg.to_dict().items()
        if k != "data" and saved.get(k) != v
    ]
    if diffs:
        raise CifarRunError(
            f"cannot resume from {path}: the run was started with different settings ({'; '.join(diffs)}). "
            f"Use the original flags, or a new --out folder for the new settings."
        )


def train_cifar(
    cfg: CifarConfig, out_dir, device: str = "auto", resume: bool = False, stop_after: Optional[int] = None
) -> Dict[str, Any]:
    """Train and evaluate one setting; returns a summary (``final_accuracy`` in [0, 1], paths, timing).

    Resume: with ``resume=True`` and ``OUT/checkpoints/last.pt`` present, training continues from it
    (weights, momentum buffers, BN statistics, iteration, log history); the data order and augmentation
    are functions of ``(seed, iteration)``, so a resumed run retraces the uninterrupted one. Without
    ``resume`` an existing checkpoint is an error rather than being overwritten.

    ``stop_after``: leave the loop once this many updates are done (as an interruption would), with a
    checkpoint written there; a later call with ``resume=True`` finishes the run. For time-sliced
    jobs (and the resume test). The summary then has ``stopped: True``.
    """
    import torch

    from data_prep.cifar import load_cifar
    from sphereface_plus.utils import atomic_torch_save, atomic_write_json, progress, safe_torch_load

    out = Path(out_dir)
    ckpt_path = out / "checkpoints" / "last.pt"
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    state = None
    if ckpt_path.is_file():
        if not resume:
            raise CifarRunError(
                f"{out} already holds a run ({ckpt_path}); pass --resume to continue it, or choose another --out"
            )
        state = safe_torch_load(ckpt_path, map_location="cpu")
        _check_resume_config(state["config"], cfg, ckpt_path)
        log.info("resuming %s from iteration %d (%s)", cfg.setting, int(state["iteration"]), ckpt_path)
    elif resume:
        log.info("no checkpoint in %s: starting %s from scratch", out, cfg.setting)

    data = load_cifar(cfg.data, cfg.dataset)
    train_x = torch.from_numpy(data["train_images"])
    train_y = torch.from_numpy(data["train_labels"])
    test_x = torch.from_numpy(data["test_images"])
    test_y = torch.from_numpy(data["test_labels"])
    if dev.type == "cuda":  # 150 MB for CIFAR-100: keep it on the GPU, augment there
        train_x, train_y = train_x.to(dev), train_y.to(dev)
    schedule = BatchSchedule(train_x.shape[0], cfg.batch_size, cfg.seed)

    model = build_model(cfg.num_classes, cfg.seed, cfg.bn_momentum).to(dev)
    reg = build_regularizer(model, cfg)
    optimizer = build_optimizer(model, cfg.lr)

    history: Dict[str, List[Dict[str, Any]]] = {"train": [], "test": []}
    start = 0
    log_window, eval_window = _Window(), _Window()
    elapsed_before = 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["iteration"])
        history = {"train": list(state["history"]["train"]), "test": list(state["history"]["test"])}
        log_window = _Window(state["windows"]["log"])
        eval_window = _Window(state["windows"]["eval"])
        elapsed_before = float(state.get("elapsed_s", 0.0))

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {**cfg.to_dict(), "setting": cfg.setting, "milestones": list(cfg.milestones),
                                            "coefficients": list(cfg.coefficients()), "device": str(dev)})

    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(str(out / "tb"), purge_step=start if start > 0 else None)
    stopped = False
    done = start
    t0 = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def save(iteration: int) -> None:
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "iteration": iteration,
                "config": cfg.to_dict(),
                "history": history,
                "windows": {"log": log_window.state(), "eval": eval_window.state()},
                "elapsed_s": elapsed(),
            },
            ckpt_path,
        )

    def batch(update: int):
        idx = schedule.indices(update)
        x = random_pad_crop_flip(train_x[idx.to(train_x.device)], schedule.augment_generator(update))
        return to_network_input(x.to(dev, non_blocking=True)), train_y[idx.to(train_y.device)].to(dev)

    def record_eval(iteration: int, train_means: Dict[str, float], snap: Optional[Dict[str, Any]] = None):
        acc, test_loss = evaluate(model, test_x, test_y, cfg, dev)
        snap = snap if snap is not None else mhe_snapshot(reg)
        row = {
            "iteration": iteration,
            "test_accuracy": acc,
            "test_loss": test_loss,
            "loss": train_means["loss"],
            "task_loss": train_means["task_loss"],
            "train_accuracy": train_means["train_accuracy"],
            "mhe_hidden": snap["mhe_hidden"],
            "mhe_output": snap["mhe_output"],
            "lr": lr_at(max(iteration - 1, 0), cfg.lr, cfg.milestones),
            "elapsed_s": round(elapsed(), 3),
            "mhe_layers": snap["mhe_layers"],
        }
        history["test"] = [r for r in history["test"] if r["iteration"] < iteration] + [row]
        tb.add_scalar("test/accuracy", acc, iteration)
        tb.add_scalar("test/loss", test_loss, iteration)
        for name, v in snap["mhe_layers"].items():
            tb.add_scalar(f"mhe_layer/{name}", v, iteration)
        tb.flush()
        log.info("%s %s", cfg.setting, _fmt_test(row))
        return row

    try:
        if start == 0:
            # iteration 0: before any update. `loss` is the objective on the first training batch at
            # the initial weights (train-mode BN, running statistics left untouched).
            model.train()
            with torch.no_grad(), frozen_batchnorm_stats(model):
                x, y = batch(0)
                logits = model(x)
                task = float(smoothed_cross_entropy(logits, y, cfg.label_smoothing, cfg.log_eps))
                train_acc = float((logits.argmax(1) == y).float().mean())
            snap = mhe_snapshot(reg)
            first = {
                "loss": task + snap["mhe_hidden"] + snap["mhe_output"],
                "task_loss": task,
                "train_accuracy": train_acc,
            }
            record_eval(0, first, snap)
            _write_outputs(out, cfg, history)
            save(0)

        model.train()
        bar = progress(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=cfg.setting)
        for update in bar:
            lr = lr_at(update, cfg.lr, cfg.milestones)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = batch(update)
            vals = train_step(model, reg, optimizer, x, y, cfg)
            it = done = update + 1  # updates done
            if not math.isfinite(vals["loss"]):
                raise CifarRunError(
                    f"{cfg.setting}: the loss became {vals['loss']} at iteration {it} (lr {lr}); lower --lr"
                )
            log_window.add(**vals)
            eval_window.add(**vals)
            for k, v in vals.items():
                tb.add_scalar(f"train/{k}", v, it)
            tb.add_scalar("train/lr", lr, it)

            if it % cfg.log_every == 0 or it == cfg.iterations:
                row = {"iteration": it, **log_window.means(), "lr": lr}
                history["train"].append(row)
                log_window = _Window()
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['train_accuracy']:.3f}")
            if it % cfg.eval_every == 0 or it == cfg.iterations:
                record_eval(it, eval_window.means())
                eval_window = _Window()
                _write_outputs(out, cfg, history)
                save(it)
            if stop_after is not None and it >= stop_after and it < cfg.iterations:
                if it % cfg.eval_every != 0:
                    _write_outputs(out, cfg, history)
                    save(it)
                stopped = True
                break
    except KeyboardInterrupt:
        log.warning("interrupted: the last checkpoint (%s) resumes this run with --resume", ckpt_path)
        raise
    finally:
        tb.close()

    if start == cfg.iterations and history["test"]:
        _write_outputs(out, cfg, history)  # a finished run resumed: just make sure the files exist
    final = history["test"][-1]
    return {
        "setting": cfg.setting,
        "final_accuracy": final["test_accuracy"],
        "best_accuracy": max(r["test_accuracy"] for r in history["test"]),
        "iterations": done,
        "out": str(out),
        "elapsed_s": round(elapsed(), 1),
        "stopped": stopped,
    }


# ----------------------------------------------------------------------------------------------------
# sweep


def results_table(results: Dict[str, Dict[str, Any]], dataset: str, iterations: int, mhe_scale: float = 1.0) -> str:
    """Markdown: our final test accuracy for every setting next to the published CIFAR-100 numbers."""
    cols = list(POWERS)
    lines = [
        f"# MHE CIFAR sweep: final test accuracy (%), {dataset}, {iterations} iterations, mhe_scale {mhe_scale:g}",
        "",
        "Each cell: ours / published (CIFAR-100, 42.5k iterations, SPEC section 7; the published full-space "
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
            key = (model, "-") if model == "baseline" else (model, s)
            if model == "baseline" and s != "0":
                cells.append("")
                continue
            name = "baseline" if model == "baseline" else f"{model}_{s}"
            ours = results.get(name)
            ours_txt = f"{100 * ours['final_accuracy']:.2f}" if ours else "-"
            cells.append(f"{ours_txt} / {PUBLISHED_CIFAR100[key]:.2f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def run_sweep(base: CifarConfig, out_dir, device: str = "auto") -> Dict[str, Dict[str, Any]]:
    """Run the 13 settings one after the other (each resumable) and write ``OUT/results.md`` / ``.json``."""
    from sphereface_plus.utils import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    results: Dict[str, Dict[str, Any]] = {}
    for model_name, power in SWEEP_SETTINGS:
        cfg = CifarConfig(**{**base.to_dict(), "model_name": model_name, "power_s": "0" if power == "-" else power})
        results[cfg.setting] = train_cifar(cfg, out / cfg.setting, device=device, resume=True)
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "results.md", results_table(results, base.dataset, base.iterations, base.mhe_scale))
    return results


# ----------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n"
        "  sphereface-plus cifar --model_name mhe --power_s 0 --data cifar-100-python\n"
        "  sphereface-plus cifar --model_name half_mhe --power_s 2 --dataset cifar10 --data DIR --iterations 2000 --out runs/c10\n"
        "  sphereface-plus cifar --sweep --data cifar-100-python --out runs/cifar-sweep\n"
        "\nThe published full-space (mhe) logs used the coefficients x 0.1: add --mhe_scale 0.1 to match them."
    )
    g = parser.add_argument_group("setting (the reference's flags)")
    g.add_argument("--model_name", choices=MODEL_NAMES, default="mhe",
                   help="baseline: no MHE; mhe: full-space MHE; half_mhe: half-space MHE on hidden layers (default: mhe)")
    g.add_argument("--power_s", choices=POWERS, default="0",
                   help="MHE kernel s: 0/1/2 Euclidean (log, 1/d, 1/d^2), a0/a1/a2 angular (default: 0)")
    g.add_argument("--mhe_scale", type=float, default=1.0,
                   help="multiplies the SPEC coefficients (λ_h, λ_o) = (1, 10) for 0/1/2/a0, (0.1, 1) for a1/a2; "
                        "0.1 matches the published full-space logs (default: 1)")
    g.add_argument("--sweep", action="store_true",
                   help="run all 13 settings of the published table into OUT/<setting>/ and write OUT/results.md")
    d = parser.add_argument_group("data and output")
    d.add_argument("--data", default=".",
                   help="folder with the CIFAR python pickles (cifar-100-python/ or cifar-10-batches-py/, or its parent; default: .)")
    d.add_argument("--dataset", choices=("cifar100", "cifar10"), default="cifar100", help="default: cifar100 (fine labels)")
    d.add_argument("--out", default=None, help="run folder (default: runs/cifar/<dataset>/<setting>, or .../sweep)")
    d.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt when it exists")
    t = parser.add_argument_group("schedule")
    t.add_argument("--iterations", type=int, default=REFERENCE_ITERATIONS,
                   help="SGD updates (default: 42500); lr milestones 20k/30k/37.5k scale with it")
    t.add_argument("--lr", type=float, default=0.1, help="initial learning rate (default: 0.1)")
    t.add_argument("--batch_size", type=int, default=128, help="default: 128")
    t.add_argument("--eval_every", type=int, default=500, help="evaluate on the whole test set every N updates (default: 500)")
    t.add_argument("--log_every", type=int, default=100, help="train-log line every N updates (default: 100)")
    t.add_argument("--seed", type=int, default=0, help="initialisation, data order and augmentation seed (default: 0)")
    x = parser.add_argument_group("deviations from the recipe (for short runs and experiments)")
    x.add_argument("--log_eps", type=float, default=LOG_EPS,
                   help="the +eps inside log(softmax + eps) of the reference loss; 0: plain log_softmax (default: 1e-4)")
    x.add_argument("--bn_momentum", type=float, default=None,
                   help="BN running-statistics momentum (PyTorch convention; default: the recipe's 0.001)")
    x.add_argument("--label_smoothing", type=float, default=LABEL_SMOOTHING, help="default: 0.01")
    r = parser.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ... (default: auto)")
    r.add_argument("--workers", type=int, default=0,
                   help="CPU threads for torch (torch.set_num_threads); 0 keeps torch's default. The augmentation "
                        "is vectorised on the batch, so no loader processes are needed")


def _config_from_args(args: argparse.Namespace) -> CifarConfig:
    names = {f.name for f in fields(CifarConfig)}
    return CifarConfig(**{k: v for k, v in vars(args).items() if k in names})


def run(args: argparse.Namespace) -> int:
    from data_prep.cifar import CifarDataError

    try:
        cfg = _config_from_args(args)
    except ValueError as exc:
        print(f"sphereface-plus cifar: error: {exc}", file=sys.stderr)
        return 2
    if args.workers < 0:
        print(f"sphereface-plus cifar: error: --workers must be >= 0, got {args.workers}", file=sys.stderr)
        return 2
    if args.workers > 0:
        import torch

        torch.set_num_threads(args.workers)
    root = Path("runs") / "cifar" / cfg.dataset
    try:
        if args.sweep:
            out = Path(args.out) if args.out else root / "sweep"
            results = run_sweep(cfg, out, device=args.device)
            print(results_table(results, cfg.dataset, cfg.iterations, cfg.mhe_scale))
            print(f"results: {out / 'results.md'}")
            return 0
        out = Path(args.out) if args.out else root / cfg.setting
        summary = train_cifar(cfg, out, device=args.device, resume=args.resume)
    except (CifarDataError, CifarRunError) as exc:
        print(f"sphereface-plus cifar: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{summary['setting']}: final test accuracy {100 * summary['final_accuracy']:.2f}% after "
        f"{summary['iterations']} iterations (best {100 * summary['best_accuracy']:.2f}%), "
        f"{summary['elapsed_s']:.0f} s; metrics: {Path(summary['out']) / 'metrics.jsonl'}"
    )
    return 0
