"""MagFace (Meng et al., "MagFace: A Universal Representation for Face Recognition and Quality
Assessment", CVPR 2021): the head ``magface``, docs/theory.md#magface.

With the clamped feature norm ``a = clamp(|x|, l_a, u_a)`` (gradient flows inside the interval), the
target's additive angular margin grows linearly with it (the paper's m(a), the official ``_margin``):

    m(a) = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m,
    f_y = s cos(θ_y + m(a)),  f_j = s cos θ_j,

and the regulariser ``g(a) = a / u_a² + 1 / a`` (the paper's g(a)) joins the loss:
``L = CE + λ_g mean_b g(a_b)``. As in IrvingMeng/MagFace ``models/magface.py`` (``MagLinear``, ``MagLoss``):
x and W normalised in the graph, ``cos θ`` clamped to [-1, 1], ``sin θ = sqrt(1 - cos² θ)``, and with
``easy_margin`` (the official default) the margin only where ``cos θ_y > 0``; without it, ArcFace's rule
``cos θ_y - m sin(π - m)`` where ``cos θ_y <= cos(π - m)``. Defaults: the official ``run/run.sh``
(l_a 10, u_a 110, l_m 0.45, u_m 0.8, λ_g 35, s 64).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from sphereface_plus.heads import register_head
from sphereface_plus.heads.base import ClassifierHead
from sphereface_plus.heads.geometry import WEIGHT_GRADIENTS, check_choice, feature_cosine, unit_rows

__all__ = ["magface_margin", "magface_regulariser", "magface_target", "MagFaceHead"]


def magface_margin(a: torch.Tensor, l_a: float, u_a: float, l_m: float, u_m: float) -> torch.Tensor:
    """``m(a) = (u_m - l_m) / (u_a - l_a) (a - l_a) + l_m`` (a: the clamped norms)."""
    return (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m


def magface_regulariser(a: torch.Tensor, u_a: float) -> torch.Tensor:
    """``g(a) = a / u_a² + 1 / a``, elementwise."""
    return a / (u_a ** 2) + 1.0 / a


def magface_target(cos_y: torch.Tensor, margin: torch.Tensor, easy_margin: bool = True) -> torch.Tensor:
    """``cos(θ_y + m)`` of the (clamped) target cosine, with the official fallbacks (unscaled)."""
    sin_y = torch.sqrt(1.0 - cos_y * cos_y)
    phi = cos_y * torch.cos(margin) - sin_y * torch.sin(margin)
    if easy_margin:
        return torch.where(cos_y > 0, phi, cos_y)
    threshold = torch.cos(math.pi - margin)
    return torch.where(cos_y > threshold, phi, cos_y - torch.sin(math.pi - margin) * margin)


@register_head("magface")
class MagFaceHead(ClassifierHead):
    """MagFace (CVPR 2021); formulas in the module docstring and docs/theory.md#magface.

    Args:
        s: scale (64). l_a, u_a: the norm interval (10, 110). l_m, u_m: the margins at its ends (0.45, 0.8).
        lambda_g: weight of the regulariser (35, ``run/run.sh``). easy_margin: (True, the official default).
        weight_gradient: ``'normalized'`` (default, as the official code) or ``'stored'``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        easy_margin: bool = True,
        weight_gradient: str = "normalized",
    ):
        super().__init__(in_features, num_classes, renorm_weight=(weight_gradient == "stored"))
        self.s, self.l_a, self.u_a, self.l_m, self.u_m = float(s), float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g, self.easy_margin = float(lambda_g), bool(easy_margin)
        if self.s <= 0 or not 0 < self.l_a < self.u_a or self.lambda_g < 0:
            raise ValueError(f"MagFace needs s > 0, 0 < l_a < u_a, lambda_g >= 0; got s={s}, l_a={l_a}, u_a={u_a}, "
                             f"lambda_g={lambda_g}")
        self.weight_gradient = check_choice(weight_gradient, WEIGHT_GRADIENTS, "weight gradient")
        self.reset_parameters()

    def clamped_norm(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings.norm(dim=1, keepdim=True).clamp(self.l_a, self.u_a)

    def margin_logits(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        cos, _ = feature_cosine(embeddings, unit_rows(self.weight, self.weight_gradient))
        cos = cos.clamp(-1.0, 1.0)
        if labels is None:
            return self.s * cos
        has = (labels >= 0).unsqueeze(1)
        idx = labels.clamp_min(0).unsqueeze(1)
        cos_y = cos.gather(1, idx)
        margin = magface_margin(self.clamped_norm(embeddings), self.l_a, self.u_a, self.l_m, self.u_m)
        phi = magface_target(cos_y, margin, self.easy_margin)
        return self.s * cos.scatter(1, idx, torch.where(has, phi, cos_y))

    def aux_loss(self, embeddings: torch.Tensor):
        g = magface_regulariser(self.clamped_norm(embeddings), self.u_a).mean()
        return self.lambda_g * g, {"mag_g": g}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, s={self.s}, l_a={self.l_a}, "
                f"u_a={self.u_a}, l_m={self.l_m}, u_m={self.u_m}, lambda_g={self.lambda_g}, "
                f"easy_margin={self.easy_margin}, weight_gradient={self.weight_gradient!r}")
