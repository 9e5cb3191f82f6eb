"""Parameter groups, optimisers and iteration-based learning-rate schedules for every trainer.

- :func:`param_groups`: the SphereFace rule (docs/theory.md#sphere-backbones and
  docs/theory.md#sphereface-recipe: weight decay on weights and PReLU slopes, never on biases, Caffe's
  ``decay_mult: 0``), or with ``decay_biases=True`` weight decay on every parameter (the MHE CIFAR
  recipe, docs/theory.md#cifar-setup, which puts ``l2_regularizer(5e-4)`` on the filters *and* the BN
  variables).
- :func:`build_sgd` / :func:`build_adam`: the two optimisers the recipes use, on those groups.
- :func:`lr_factor` / :func:`multistep_scheduler`: ``gamma ** (#milestones <= iteration)`` times an
  optional linear warm-up, as a ``LambdaLR`` stepped once per iteration (its state dict is plain
  numbers, so it checkpoints under ``weights_only``).

A trainer builds its optimiser and schedule from these and steps the scheduler once per update.
"""
from __future__ import annotations

import bisect
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["param_groups", "build_sgd", "build_adam", "build_optimizer", "lr_factor", "multistep_scheduler",
           "build_scheduler", "SCHEDULES", "poly_factor", "poly_scheduler"]


def param_groups(modules: Iterable[nn.Module], weight_decay: float, decay_biases: bool = False) -> List[Dict]:
    """Two groups: with decay (conv/linear/classifier weights, PReLU slopes) and without (biases).

    A parameter is "bias" when its name ends in ``bias``; everything else (including the 1-d PReLU
    ``weight``, which is the slope) is decayed, as in the original Caffe prototxts. With
    ``decay_biases`` every parameter is in the first group (the second is empty). A parameter shared
    by two modules is counted once; frozen parameters are left out.
    """
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_bias = name.rsplit(".", 1)[-1] == "bias"
            (no_decay if is_bias and not decay_biases else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_sgd(modules: Iterable[nn.Module], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
              nesterov: bool = False, decay_biases: bool = False) -> torch.optim.SGD:
    """SGD on :func:`param_groups`.

    ``torch.optim.SGD``'s update ``v = momentum v + g + wd w; w -= lr v`` is exactly Caffe's and TF's
    ``MomentumOptimizer`` with an L2 term ``wd |w|^2 / 2``, including how a changed lr acts on ``v``.
    """
    return torch.optim.SGD(param_groups(modules, weight_decay, decay_biases), lr=lr, momentum=momentum,
                           nesterov=nesterov)


def build_adam(modules: Iterable[nn.Module], lr: float, betas: Tuple[float, float] = (0.9, 0.999),
               weight_decay: float = 0.0, decay_biases: bool = False, eps: float = 1e-8) -> torch.optim.Adam:
    """Adam on :func:`param_groups` (L2 weight decay added to the gradient, as TF's ``l2_regularizer``)."""
    return torch.optim.Adam(param_groups(modules, weight_decay, decay_biases), lr=lr, betas=tuple(betas), eps=eps)


def build_optimizer(modules: Iterable[nn.Module], optim_cfg, backbone: Optional[nn.Module] = None) -> torch.optim.SGD:
    """The face trainer's SGD from its ``optim`` config section (biases not decayed).

    With ``optim.backbone_lr_scale`` below 1, the parameters of ``backbone`` (one of ``modules``' submodules)
    form two groups of their own at that fraction of the lr, ahead of the rest's two; at 1 the two groups
    of :func:`build_sgd` are built as they always were (checkpoints of earlier runs load unchanged)."""
    modules = list(modules)
    scale = float(getattr(optim_cfg, "backbone_lr_scale", 1.0))
    if backbone is None or scale == 1.0:
        return build_sgd(modules, optim_cfg.lr, optim_cfg.momentum, optim_cfg.weight_decay, optim_cfg.nesterov)
    own = param_groups([backbone], optim_cfg.weight_decay)
    for group in own:
        group["lr"] = optim_cfg.lr * scale
    taken = {id(p) for group in own for p in group["params"]}
    rest = [{**group, "params": [p for p in group["params"] if id(p) not in taken]}
            for group in param_groups(modules, optim_cfg.weight_decay)]
    return torch.optim.SGD(own + rest, lr=optim_cfg.lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov)


def lr_factor(iteration: int, milestones: Sequence[int], gamma: float, warmup_iters: int = 0,
              warmup_factor: float = 1.0) -> float:
    """Multiplier of the base lr at ``iteration``: ``gamma ** (#milestones <= iteration)`` x warm-up ramp.

    The update whose 0-based index equals a milestone already uses the reduced rate (the reference
    loops' ``if i == 20000: lr *= 0.1`` before step ``i``).
    """
    factor = gamma ** bisect.bisect_right(list(milestones), iteration)
    if warmup_iters > 0 and iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1.0 - alpha) + alpha
    return factor


def multistep_scheduler(optimizer: torch.optim.Optimizer, milestones: Sequence[int], gamma: float = 0.1,
                        warmup_iters: int = 0, warmup_factor: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` of :func:`lr_factor`, stepped once per iteration (after the optimiser step)."""
    milestones = tuple(int(m) for m in milestones)
    gamma, wi, wf = float(gamma), int(warmup_iters), float(warmup_factor)

    def fn(it: int) -> float:
        return lr_factor(it, milestones, gamma, wi, wf)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


#: the face trainer's lr schedules (``optim.schedule``)
SCHEDULES = ("multistep", "poly")


def poly_factor(iteration: int, total_iters: int, power: float = 2.0, warmup_iters: int = 0) -> float:
    """Multiplier of the base lr at ``iteration`` for insightface arcface_torch's ``PolynomialLRWarmup``
    (its closed form): ``t / w`` during a linear warm-up of ``w`` updates, then ``(1 - (t - w) / (T - w))^power``
    up to ``T = total_iters`` (0 after). The update of index 0 uses the base lr (the scheduler's first
    ``get_lr`` returns it unchanged)."""
    t, w, total = int(iteration), int(warmup_iters), int(total_iters)
    if t == 0:
        return 1.0
    if w > 0 and t <= w:
        return t / w
    return max(0.0, 1.0 - (min(total, t) - w) / (total - w)) ** float(power)


def poly_scheduler(optimizer: torch.optim.Optimizer, total_iters: int, power: float = 2.0,
                   warmup_iters: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` of :func:`poly_factor`, stepped once per iteration (after the optimiser step)."""
    total, p, w = int(total_iters), float(power), int(warmup_iters)
    if total <= w:
        raise ValueError(f"the poly schedule needs total_iters > warmup_iters, got {total} and {w}")

    def fn(it: int) -> float:
        return poly_factor(it, total, p, w)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, total_iters: Optional[int] = None
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """The face trainer's schedule from its ``optim`` config section: ``multistep`` (milestones, gamma,
    warm-up) or ``poly`` (insightface's, to ``total_iters``: the run's ``train.iterations``)."""
    schedule = getattr(optim_cfg, "schedule", "multistep")
    if schedule == "poly":
        if total_iters is None:
            raise ValueError("optim.schedule=poly needs the run's total number of iterations")
        return poly_scheduler(optimizer, total_iters, optim_cfg.poly_power, optim_cfg.warmup_iters)
    return multistep_scheduler(optimizer, optim_cfg.milestones, optim_cfg.lr_gamma, optim_cfg.warmup_iters,
                               optim_cfg.warmup_factor)
