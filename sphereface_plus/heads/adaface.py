"""AdaFace (Kim et al., "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022): the head
``adaface``, docs/theory.md#adaface.

The feature norm ``|x|`` is the image-quality proxy. With the batch statistics of the (clipped,
detached) norms kept as exponential moving averages ``μ``, ``σ`` (buffers, so checkpointed), the
normalised norm ``ẑ = clip(h (|x| - μ) / (σ + ε), -1, 1)`` sets both margins of the target (the paper's adaptive margin):

    f_y = s [ cos(clip(θ_y + g_angle, ε, π - ε)) - g_add ],  g_angle = -m ẑ,  g_add = m ẑ + m,

non-targets ``s cos θ_j``; ``θ = arccos(clamp(cos, -1 + ε, 1 - ε))``, ``ε = 1e-3``; loss: cross-entropy. The
official code (mk-minchul/AdaFace ``head.py``, ``AdaFace.forward``): norms clipped to [0.001, 100] and
detached, statistics ``mean`` and unbiased ``std`` of the batch, EMA ``μ ← α mean + (1 - α) μ`` (α = t_alpha)
before use, initial ``μ = 20``, ``σ = 100``; both x and W normalised in the graph.

Data parallel (``norm_stats``): the official run (PyTorch Lightning DDP) takes each rank's own batch
statistics (``'local'``), so its model depends on the number of GPUs. The default ``'global'`` takes
the statistics of the whole global batch (the norms are all-gathered in rank order, B floats), so the
same seed gives the same model on any number of processes and with a replicated or a sharded
classifier (a sharded classifier already sees the whole batch). On one process the two are the same.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from sphereface_plus.heads import register_head
from sphereface_plus.heads.base import ClassifierHead
from sphereface_plus.heads.geometry import WEIGHT_GRADIENTS, check_choice, feature_cosine, target_mask, unit_rows

__all__ = ["NORM_STATS", "ADAFACE_EPS", "adaface_margin_scaler", "adaface_logits", "AdaFaceHead"]

NORM_STATS = ("global", "local")
ADAFACE_EPS = 1e-3
NORM_CLIP = (0.001, 100.0)


def adaface_margin_scaler(norms: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, h: float) -> torch.Tensor:
    """``ẑ = clip(h (|x| - μ) / (σ + 1e-3), -1, 1)`` of the clipped, detached norms (B x 1)."""
    return torch.clip((norms - mean) / (std + ADAFACE_EPS) * h, -1.0, 1.0)


def adaface_logits(cos: torch.Tensor, target: torch.Tensor, scaler: torch.Tensor, m: float, s: float) -> torch.Tensor:
    """AdaFace logits (B x C) from the raw cosines, the one-hot ``target`` and ``ẑ`` (B x 1)."""
    cos = cos.clamp(-1.0 + ADAFACE_EPS, 1.0 - ADAFACE_EPS)
    one_hot = target.to(cos.dtype)
    g_angle = -float(m) * scaler
    theta = torch.acos(cos)
    theta_m = torch.clip(theta + one_hot * g_angle, min=ADAFACE_EPS, max=math.pi - ADAFACE_EPS)
    g_add = float(m) + float(m) * scaler
    return (torch.cos(theta_m) - one_hot * g_add) * float(s)


@register_head("adaface")
class AdaFaceHead(ClassifierHead):
    """AdaFace (CVPR 2022); formulas in the module docstring and docs/theory.md#adaface.

    Args:
        m: margin (0.4, the official MS1MV2 / WebFace4M scripts). h: concentration of ẑ (0.333).
        s: scale (64). t_alpha: EMA momentum of the norm statistics (0.01).
        norm_stats: ``'global'`` (default: the global batch's statistics, world-size independent) or
            ``'local'`` (each rank's batch, the official DDP behaviour).
        weight_gradient: ``'normalized'`` (default: the official code normalises W in the graph) or ``'stored'``.

    Buffers: ``batch_mean`` (20), ``batch_std`` (100), updated at each training forward with labels.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: float = 0.4,
        h: float = 0.333,
        s: float = 64.0,
        t_alpha: float = 0.01,
        norm_stats: str = "global",
        weight_gradient: str = "normalized",
    ):
        super().__init__(in_features, num_classes, renorm_weight=(weight_gradient == "stored"))
        self.m, self.h, self.s, self.t_alpha = float(m), float(h), float(s), float(t_alpha)
        if self.s <= 0 or self.m < 0 or self.h < 0 or not 0.0 <= self.t_alpha <= 1.0:
            raise ValueError(f"AdaFace needs s > 0, m >= 0, h >= 0, 0 <= t_alpha <= 1; got s={s}, m={m}, h={h}, "
                             f"t_alpha={t_alpha}")
        self.norm_stats = check_choice(norm_stats, NORM_STATS, "AdaFace norm_stats")
        self.weight_gradient = check_choice(weight_gradient, WEIGHT_GRADIENTS, "weight gradient")
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))
        self.reset_parameters()

    def _global_norms(self, norms: torch.Tensor) -> torch.Tensor:
        """The norms of the whole global batch, in rank order (``norm_stats='global'`` under DDP with a
        replicated head; a row block of a sharded classifier already has the whole batch)."""
        if (self.norm_stats == "local" or self.row_block or not dist.is_available() or not dist.is_initialized()
                or dist.get_world_size() == 1):
            return norms
        out = norms.new_empty((dist.get_world_size() * norms.shape[0],) + tuple(norms.shape[1:]))
        dist.all_gather_into_tensor(out, norms.contiguous())
        return out

    @torch.no_grad()
    def update_statistics(self, safe_norms: torch.Tensor) -> None:
        """EMA of the batch mean and unbiased std of the clipped norms (a batch of one keeps σ)."""
        batch = self._global_norms(safe_norms)
        mean = batch.mean()
        self.batch_mean.copy_(mean * self.t_alpha + (1.0 - self.t_alpha) * self.batch_mean)
        if batch.numel() > 1:
            std = batch.std()
            self.batch_std.copy_(std * self.t_alpha + (1.0 - self.t_alpha) * self.batch_std)

    def margin_logits(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        cos, x_norm = feature_cosine(embeddings, unit_rows(self.weight, self.weight_gradient))
        if labels is None:
            return self.s * cos
        safe_norms = torch.clip(x_norm, *NORM_CLIP).detach()
        if self.training:
            self.update_statistics(safe_norms)
        scaler = adaface_margin_scaler(safe_norms, self.batch_mean.to(cos.dtype), self.batch_std.to(cos.dtype), self.h)
        return adaface_logits(cos, target_mask(labels, cos), scaler, self.m, self.s)

    def state_terms(self):
        return {"norm_mean": self.batch_mean.detach().reshape(()).clone(),
                "norm_std": self.batch_std.detach().reshape(()).clone()}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, m={self.m}, h={self.h}, "
                f"s={self.s}, t_alpha={self.t_alpha}, norm_stats={self.norm_stats!r}, "
                f"weight_gradient={self.weight_gradient!r}")
