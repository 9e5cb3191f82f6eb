"""The classifier heads of the SphereFace family's peers, on the :class:`~.base.ClassifierHead` contract.

Each head holds a ``C x d`` parameter ``.weight``, implements :meth:`margin_logits` from
:mod:`.functional` and returns a :class:`~.base.HeadOutput` from ``forward(embeddings, labels)``.
Registered by name in :mod:`sphereface_plus.heads`: ``a_softmax``, ``softmax``, ``cosface``, ``arcface``.
A head's constructor keyword arguments are its settings (``head.<name>`` in a recipe), with their
defaults; docs/heads.md lists them and why.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
import torch.nn as nn

from sphereface_plus.heads import functional as HF
from sphereface_plus.heads import register_head
from sphereface_plus.heads.base import ClassifierHead

logger = logging.getLogger(__name__)

__all__ = ["ASoftmaxHead", "SoftmaxHead", "CosFaceHead", "ArcFaceHead"]


@register_head("a_softmax")
class ASoftmaxHead(ClassifierHead):
    """A-Softmax (SphereFace, Liu et al. 2017, eq. 7; docs/theory.md#a-softmax) with λ annealing.

    λ = max(λ_min, base · (1 + γ t)^(-power)), where ``t`` is the buffer ``iteration`` (saved in the
    state dict, so a resumed run continues the schedule). Like the Caffe layer, a training-mode forward
    first advances ``t`` by one and then uses λ(t); evaluation forwards use λ(t) without advancing.
    ``current_lambda`` is that λ(t): the value the latest training forward used, reported in the
    output's ``terms["lambda"]``.

    Args:
        in_features: embedding size d (512).
        num_classes: C.
        m: angular margin, a number in [1, 4] (SphereFace: 4; OpenSphere: 1.5 with s=30, 1.7 with s=64).
            An integer keeps the Chebyshev form of cos(mθ); a real m goes through arccos
            (docs/theory.md#a-softmax-real-m).
        base, gamma, power, lambda_min: the λ schedule (SphereFace: 1000, 0.12, 1, 5). A fixed λ (as in
            SphereFace+ fine-tuning, λ = 5): ``base=5, lambda_min=5``; no annealing (OpenSphere): ``base=0,
            lambda_min=0``.
        renorm_weight: rescale the stored rows to unit length at each training forward (Caffe, OpenSphere).
        gradient: ``'exact'`` (autograd), ``'caffe'`` (the released SphereFace layer's backward) or
            ``'detached'`` (OpenSphere: the margin is a constant of the backward), whenever autograd runs.
            The forward is the same. Default exact: the gradient of the loss that is reported.
        feature_norm: ``'none'`` (the logit scale is ‖x‖, SphereFace, the default) or ``'hard'`` (the
            scale is ``s``, OpenSphere's SphereFace).
        s: the scale of ``feature_norm='hard'`` (64; not used with ``'none'``).
        weight_gradient: ``'normalized'`` (through ŵ = w/‖w‖, the default) or ``'stored'`` (‖w‖ held
            constant, as OpenSphere differentiates its renormalised rows).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: float = 4,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
        renorm_weight: bool = True,
        gradient: str = "exact",
        feature_norm: str = "none",
        s: float = 64.0,
        weight_gradient: str = "normalized",
    ):
        super().__init__(in_features, num_classes, renorm_weight)
        self.m = HF.check_a_softmax_m(m)
        self.gradient = HF.check_gradient(gradient)
        self.feature_norm = HF.check_choice(feature_norm, HF.FEATURE_NORMS, "A-Softmax feature_norm")
        self.weight_gradient = HF.check_choice(weight_gradient, HF.WEIGHT_GRADIENTS, "weight_gradient")
        if base < 0 or lambda_min < 0 or gamma < 0:
            raise ValueError(f"A-Softmax λ schedule needs base, gamma, lambda_min >= 0; got {base}, {gamma}, {lambda_min}")
        if not s > 0:
            raise ValueError(f"A-Softmax needs s > 0, got s={s}")
        if self.gradient == "caffe" and (self.feature_norm != "none" or not isinstance(self.m, int)):
            raise ValueError(f"gradient='caffe' (the SphereFace Caffe layer's backward) needs an integer m and "
                             f"feature_norm='none', got m={m}, feature_norm={feature_norm!r}")
        self.base = float(base)
        self.gamma = float(gamma)
        self.power = float(power)
        self.lambda_min = float(lambda_min)
        self.s = float(s)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.reset_parameters()

    def lambda_at(self, iteration: int) -> float:
        return HF.a_softmax_lambda(iteration, self.base, self.gamma, self.power, self.lambda_min)

    @property
    def current_lambda(self) -> float:
        return self.lambda_at(int(self.iteration))

    def begin_forward(self) -> None:
        super().begin_forward()
        if self.training:
            self.iteration += 1

    def state_terms(self) -> Dict[str, torch.Tensor]:
        return {"lambda": torch.tensor(self.current_lambda, dtype=torch.float64)}

    def margin_logits(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        return HF.a_softmax_logits(embeddings, self.weight, labels, m=self.m, lam=self.current_lambda,
                                   gradient=self.gradient, feature_norm=self.feature_norm, s=self.s,
                                   weight_gradient=self.weight_gradient)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, m={self.m}, base={self.base}, "
            f"gamma={self.gamma}, power={self.power}, lambda_min={self.lambda_min}, gradient={self.gradient!r}, "
            f"feature_norm={self.feature_norm!r}" + (f", s={self.s}" if self.feature_norm == "hard" else "")
        )


@register_head("softmax")
class SoftmaxHead(ClassifierHead):
    """Plain linear classifier ``x W^T + b`` (the softmax-loss baseline); the labels only pick the CE target.

    Its rows are not unit length (``unit_rows=False``); the bias is a per-class (row) parameter."""

    unit_rows = False
    row_parameters = ("weight", "bias")

    def __init__(self, in_features: int, num_classes: int, bias: bool = True):
        super().__init__(in_features, num_classes, renorm_weight=False)
        self.bias = nn.Parameter(torch.zeros(self.num_classes)) if bias else None
        if not bias:
            self.row_parameters = ("weight",)
        self.reset_parameters()

    def margin_logits(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        return HF.softmax_logits(embeddings, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}"


@register_head("cosface")
class CosFaceHead(ClassifierHead):
    """CosFace / LMCL (docs/theory.md#cosface): ``s (cos θ_j - m [j = y])``, normalised features and weights.

    Args: ``s`` (64), ``m`` (0.35: the CosFace paper's best, Table 1), ``renorm_weight`` (False),
    ``gradient`` (``exact`` | ``detached``: identical here, the margin being a constant), ``weight_gradient``.
    """

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.35,
                 renorm_weight: bool = False, gradient: str = "exact", weight_gradient: str = "normalized"):
        super().__init__(in_features, num_classes, renorm_weight)
        if s <= 0 or m < 0:
            raise ValueError(f"CosFace needs s > 0 and m >= 0, got s={s}, m={m}")
        self.s, self.m = float(s), float(m)
        self.gradient = HF.check_choice(gradient, HF.MARGIN_GRADIENTS, "CosFace gradient")
        self.weight_gradient = HF.check_choice(weight_gradient, HF.WEIGHT_GRADIENTS, "weight_gradient")
        self.reset_parameters()

    def margin_logits(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        return HF.cosface_logits(embeddings, self.weight, labels, s=self.s, m=self.m, gradient=self.gradient,
                                 weight_gradient=self.weight_gradient)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, s={self.s}, m={self.m}"


@register_head("arcface")
class ArcFaceHead(ClassifierHead):
    """ArcFace (docs/theory.md#arcface): ``s cos(θ_y + m)`` on the target, ``s cos θ_j`` elsewhere.

    Args: ``s`` (64), ``m`` (0.5, the ArcFace paper's), ``easy_margin`` (False), ``renorm_weight``
    (False), ``gradient`` (``exact``: the gradient of the loss that is reported; ``detached``:
    insightface's and OpenSphere's), ``wrap`` (θ + m > π: ``toolkit``, the ArcFace paper's linear
    continuation, default; ``insightface``; ``opensphere``), ``weight_gradient``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        easy_margin: bool = False,
        renorm_weight: bool = False,
        gradient: str = "exact",
        wrap: str = "toolkit",
        weight_gradient: str = "normalized",
    ):
        super().__init__(in_features, num_classes, renorm_weight)
        if s <= 0 or not 0 <= m < 3.14159:
            raise ValueError(f"ArcFace needs s > 0 and 0 <= m < π, got s={s}, m={m}")
        self.s, self.m, self.easy_margin = float(s), float(m), bool(easy_margin)
        self.gradient = HF.check_choice(gradient, HF.MARGIN_GRADIENTS, "ArcFace gradient")
        self.wrap = HF.check_choice(wrap, HF.ARCFACE_WRAPS, "ArcFace wrap")
        self.weight_gradient = HF.check_choice(weight_gradient, HF.WEIGHT_GRADIENTS, "weight_gradient")
        self.reset_parameters()

    def margin_logits(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        return HF.arcface_logits(embeddings, self.weight, labels, s=self.s, m=self.m, easy_margin=self.easy_margin,
                                 gradient=self.gradient, wrap=self.wrap, weight_gradient=self.weight_gradient)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, s={self.s}, m={self.m}, "
                f"easy_margin={self.easy_margin}, gradient={self.gradient!r}, wrap={self.wrap!r}")
