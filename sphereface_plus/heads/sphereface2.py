"""SphereFace2 (Wen et al., "SphereFace2: Binary Classification is All You Need for Deep Face
Recognition", ICLR 2022): the head ``sphereface2``, a binary (one-vs-all) loss, docs/theory.md#sphereface2.

For every sample ``b`` and class ``i``: ``z_bi = r (g(cos θ_bi) ∓ margin) + b`` with the similarity
adjustment ``g(c) = 2 ((c + 1) / 2)^t - 1`` (the paper's g), one learnable scalar bias ``b``, and the loss
(paper eq. 5, OpenSphere's weighted ``binary_cross_entropy_with_logits``)

    L = (lw / r) * mean_b [ λ softplus(-z_{b y_b}) + (1 - λ) Σ_{i ≠ y_b} softplus(z_bi) ].

Variants (``variant``; OpenSphere_v0 ``model/head/sphereface2.py`` ``magn_type``, OpenSphere ``main`` has C):

- ``C`` (additive cosine margin): ``g(cos θ) - m`` on the target, ``g(cos θ) + m`` elsewhere.
- ``A`` (additive angular margin): ``g(cos(min(θ_y + m, 3.14159)))`` on the target, ``g(cos θ)`` elsewhere.
- ``M`` (multiplicative angular margin): ``g(cos(min(m θ_y, 3.14159)))`` on the target, ``g(cos θ)`` elsewhere.

(``θ = arccos(clamp(cos, -1 + 1e-5, 1 - 1e-5))`` for A and M, lower clamp 1e-5.) ``gradient``:
``'detached'`` (OpenSphere ``main`` / ``OpenSphere_v0``: the logit is ``r (cos θ + d) + b`` with the offset
``d = g̃ - cos θ`` under no_grad, so backpropagation sees ``r cos θ + b``) or ``'exact'`` (the ICLR21
branch's ``SphereFace2C``: autograd through g).

The bias starts at the closed form of the original code: the ``b`` where the loss's derivative in ``b``
vanishes when every angle is π/2 (:func:`sphereface2_bias_init`). It is a shared (replicated)
parameter of a sharded classifier and is not used at test time (the margin-free inference logits are
``r cos θ``; verification compares embeddings).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from sphereface_plus.heads import register_head
from sphereface_plus.heads.base import ClassifierHead
from sphereface_plus.heads.geometry import (PI_CLAMP, WEIGHT_GRADIENTS, check_choice, clamped_acos,
                                            feature_cosine, target_mask, unit_rows)

__all__ = [
    "SPHEREFACE2_VARIANTS",
    "SPHEREFACE2_GRADIENTS",
    "sphereface2_g",
    "sphereface2_similarity",
    "sphereface2_bias_init",
    "sphereface2_binary_terms",
    "SphereFace2Head",
]

SPHEREFACE2_VARIANTS = ("C", "A", "M")
SPHEREFACE2_GRADIENTS = ("detached", "exact")
ACOS_EPS = 1e-5  # OpenSphere_v0's arccos clamp and lower angle clamp for A and M
DEFAULT_M = {"C": 0.4, "A": 0.5, "M": 1.7}  # the SphereFace2_ICLR21 classes' (and appendix recipes') margins


def sphereface2_g(c, t: float):
    """The similarity adjustment ``g(c) = 2 ((c + 1) / 2)^t - 1`` (SphereFace2's g); tensors or floats."""
    return 2.0 * ((c + 1.0) / 2.0) ** t - 1.0


def sphereface2_similarity(cos: torch.Tensor, target: torch.Tensor, variant: str, m: float, t: float) -> torch.Tensor:
    """The margin-adjusted similarity ``g̃`` of every column (B x C), before ``r`` and the bias."""
    check_choice(variant, SPHEREFACE2_VARIANTS, "SphereFace2 variant")
    if variant == "C":
        sign = torch.where(target, torch.ones_like(cos), -torch.ones_like(cos))  # 2 onehot - 1
        return sphereface2_g(cos, t) - float(m) * sign
    theta = clamped_acos(cos, ACOS_EPS)
    if variant == "A":
        theta = torch.where(target, theta + float(m), theta)
    else:
        theta = torch.where(target, theta * float(m), theta)
    return sphereface2_g(torch.cos(theta.clamp(ACOS_EPS, PI_CLAMP)), t)


def sphereface2_bias_init(num_classes: int, lam: float, r: float, m: float, t: float, variant: str = "C") -> float:
    """The bias of the original code (OpenSphere ``SphereFace2.__init__``): with every angle π/2, the target
    logit is ``a_y + b`` and the others ``a_i + b``; the loss's derivative in ``b`` vanishes at

        b = log(2 z) - a_i - log(1 - z + sqrt((1 - z)^2 + 4 z exp(a_y - a_i))),  z = λ / ((1 - λ)(C - 1)).

    C: ``a_y = r (g(0) - m)``, ``a_i = r (g(0) + m)``; A: ``a_y = r g(cos(min(π, π/2 + m)))``; M: ``a_y = r
    g(cos(min(π, m π/2)))``, ``a_i = r g(0)``.
    """
    check_choice(variant, SPHEREFACE2_VARIANTS, "SphereFace2 variant")
    z = lam / ((1.0 - lam) * (num_classes - 1.0))
    if variant == "C":
        ay = r * (sphereface2_g(0.0, t) - m)
        ai = r * (sphereface2_g(0.0, t) + m)
    else:
        theta_y = min(math.pi, math.pi / 2.0 + m) if variant == "A" else min(math.pi, m * math.pi / 2.0)
        ay = r * sphereface2_g(math.cos(theta_y), t)
        ai = r * sphereface2_g(0.0, t)
    tmp = (1.0 - z) ** 2 + 4.0 * z * math.exp(ay - ai)
    return math.log(2.0 * z) - ai - math.log(1.0 - z + math.sqrt(tmp))


def sphereface2_binary_terms(logits: torch.Tensor, target: torch.Tensor, lam: float) -> torch.Tensor:
    """``λ softplus(-z)`` on the targets, ``(1 - λ) softplus(z)`` elsewhere (B x C), with PyTorch's
    ``binary_cross_entropy_with_logits`` (OpenSphere's), so the values agree to the last bit."""
    one_hot = target.to(logits.dtype)
    weight = lam * one_hot + (1.0 - lam) * (1.0 - one_hot)
    return F.binary_cross_entropy_with_logits(logits, one_hot, weight=weight, reduction="none")


@register_head("sphereface2")
class SphereFace2Head(ClassifierHead):
    """SphereFace2 (ICLR 2022); formulas in the module docstring and docs/theory.md#sphereface2.

    Args:
        variant: ``'C'`` (default), ``'A'``, ``'M'``.
        lam: λ, the weight of the positive term (OpenSphere's ``alpha``; 0.7).
        r: scale (40). m: margin (C 0.4, A 0.5, M 1.7). t: exponent of g (3). lw: loss weight (50, the
            code default; the VGGFace2 recipes use 10).
        gradient: ``'detached'`` (default, OpenSphere ``main``) or ``'exact'`` (SphereFace2_ICLR21's C).
        weight_gradient: ``'stored'`` (default, OpenSphere) or ``'normalized'``.
    """

    loss_kind = "binary"
    shared_parameters = ("bias",)

    @classmethod
    def settings_in_force(cls, settings: Dict[str, Any]) -> Dict[str, Any]:
        """``m`` follows the variant when not given (:data:`DEFAULT_M`)."""
        out = dict(settings)
        if out.get("m") is None and out.get("variant", "C") in DEFAULT_M:
            out["m"] = float(DEFAULT_M[out.get("variant", "C")])
        return out

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        variant: str = "C",
        lam: float = 0.7,
        r: float = 40.0,
        m: Optional[float] = None,
        t: float = 3.0,
        lw: float = 50.0,
        gradient: str = "detached",
        weight_gradient: str = "stored",
    ):
        super().__init__(in_features, num_classes, renorm_weight=(weight_gradient == "stored"))
        self.variant = check_choice(variant, SPHEREFACE2_VARIANTS, "SphereFace2 variant")
        self.gradient = check_choice(gradient, SPHEREFACE2_GRADIENTS, "SphereFace2 gradient")
        self.weight_gradient = check_choice(weight_gradient, WEIGHT_GRADIENTS, "weight gradient")
        self.lam = float(lam)
        self.r = float(r)
        self.m = float(DEFAULT_M[self.variant] if m is None else m)
        self.t = float(t)
        self.lw = float(lw)
        if not 0.0 < self.lam < 1.0 or self.r <= 0 or self.t <= 0 or self.lw < 0:
            raise ValueError(f"SphereFace2 needs 0 < lam < 1, r > 0, t > 0, lw >= 0; got lam={lam}, r={r}, t={t}, lw={lw}")
        self.bias = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.bias.fill_(self.initial_bias(self.num_classes))

    def init_rows_(self, seed: int, start: int = 0, num_classes: Optional[int] = None) -> None:
        """The rows as every head (world-size independent); the bias from the closed form for the WHOLE
        classifier's ``num_classes`` (a row block of a sharded classifier holds fewer rows)."""
        super().init_rows_(seed, start, num_classes)
        with torch.no_grad():
            self.bias.fill_(self.initial_bias(int(num_classes or self.num_classes)))

    def initial_bias(self, num_classes: int) -> float:
        return sphereface2_bias_init(num_classes, self.lam, self.r, self.m, self.t, self.variant)

    @property
    def loss_weight(self) -> float:
        return self.lw / self.r

    def margin_logits(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        cos, _ = feature_cosine(embeddings, unit_rows(self.weight, self.weight_gradient))
        if labels is None:
            return self.r * cos  # inference: no margin, no bias
        target = target_mask(labels, cos)
        if self.gradient == "exact":
            value = sphereface2_similarity(cos, target, self.variant, self.m, self.t)
        else:
            with torch.no_grad():
                d = sphereface2_similarity(cos, target, self.variant, self.m, self.t) - cos
            value = cos + d
        return self.r * value + self.bias.to(cos.dtype)

    def binary_loss_terms(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sphereface2_binary_terms(logits, target_mask(labels, logits), self.lam)

    def state_terms(self):
        return {"bias": self.bias.detach().reshape(())}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, variant={self.variant!r}, "
                f"lam={self.lam}, r={self.r}, m={self.m}, t={self.t}, lw={self.lw}, gradient={self.gradient!r}, "
                f"weight_gradient={self.weight_gradient!r}")
