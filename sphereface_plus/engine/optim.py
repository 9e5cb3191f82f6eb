"""SGD with the SphereFace weight-decay rule and an iteration-based multistep schedule.

SPEC sections 3 and 6: SGD momentum 0.9, weight decay 5e-4 on weights and PReLU slopes but not on
biases (Caffe's ``decay_mult: 0`` for biases), learning rate x0.1 at fixed iterations; optionally a
linear warm-up from ``warmup_factor * lr`` over ``warmup_iters`` iterations.
"""
from __future__ import annotations

import bisect
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn as nn

__all__ = ["param_groups", "build_optimizer", "build_scheduler", "lr_factor"]


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> List[Dict]:
    """Two groups: with decay (conv/linear/classifier weights, PReLU slopes) and without (biases).

    A parameter is "bias" when its name ends in ``bias``; everything else (including the 1-d PReLU
    ``weight``, which is the slope) is decayed, as in the original Caffe prototxts.
    """
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if name.rsplit(".", 1)[-1] == "bias" else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(modules: Iterable[nn.Module], optim_cfg) -> torch.optim.SGD:
    return torch.optim.SGD(
        param_groups(modules, optim_cfg.weight_decay),
        lr=optim_cfg.lr,
        momentum=optim_cfg.momentum,
        nesterov=optim_cfg.nesterov,
    )


def lr_factor(iteration: int, milestones: Tuple[int, ...], gamma: float, warmup_iters: int, warmup_factor: float) -> float:
    """Multiplier of the base lr at ``iteration``: ``gamma ** (#milestones <= iteration)`` x warm-up ramp."""
    factor = gamma ** bisect.bisect_right(list(milestones), iteration)
    if warmup_iters > 0 and iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1.0 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per iteration; its state dict is plain numbers (weights_only-safe)."""
    milestones = tuple(int(m) for m in optim_cfg.milestones)
    gamma, wi, wf = float(optim_cfg.lr_gamma), int(optim_cfg.warmup_iters), float(optim_cfg.warmup_factor)

    def fn(it: int) -> float:
        return lr_factor(it, milestones, gamma, wi, wf)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
