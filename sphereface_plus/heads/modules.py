"""Thin classifier-head modules: parameters and schedule state around :mod:`.functional`.

Every head holds a ``C x d`` parameter ``.weight`` and maps ``forward(embeddings, labels)`` to B x C
logits (``labels=None``: the margin-free logits, for inference). Registered by name in
:mod:`sphereface_plus.heads`: ``a_softmax``, ``softmax``, ``cosface``, ``arcface``.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from sphereface_plus.heads import functional as HF
from sphereface_plus.heads import register_head

logger = logging.getLogger(__name__)

__all__ = ["ASoftmaxHead", "SoftmaxHead", "CosFaceHead", "ArcFaceHead"]


def _check_sizes(in_features: int, num_classes: int) -> None:
    if int(in_features) < 1 or int(num_classes) < 2:
        raise ValueError(
            f"a classifier head needs in_features >= 1 and num_classes >= 2, got in_features={in_features}, "
            f"num_classes={num_classes}"
        )


class _NormalisedClassifier(nn.Module):
    """Shared part of the hyperspherical heads: a ``C x d`` weight whose rows live on the unit sphere."""

    # True on a head that holds one block of rows of a row-sharded classifier (sphereface_plus.parallel
    # sets it on its instance): its labels may then be NO_TARGET (-1), "this sample's class is elsewhere"
    row_block: bool = False

    def __init__(self, in_features: int, num_classes: int, renorm_weight: bool = True):
        super().__init__()
        _check_sizes(in_features, num_classes)
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.renorm_weight = bool(renorm_weight)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Caffe's xavier filler, then unit rows (the layer normalises them anyway)
        nn.init.xavier_uniform_(self.weight)
        with torch.no_grad():
            self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def _renorm(self) -> None:
        # The SphereFace Caffe layer rescales the stored weight rows to unit length at every training
        # forward; doing the same keeps the effective learning rate of the directions constant (with
        # only in-graph normalisation the row norms drift). The logits still normalise in the graph, so
        # the gradient is the exact one of the normalised model. Note: this is an in-place update of the
        # parameter, so call backward() on one forward's loss before the next training forward.
        if self.renorm_weight and self.training:
            with torch.no_grad():
                self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def _check(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        # a head holds every class, so a label must name one of them; only a head that is one block of
        # a row-sharded classifier (row_block) also accepts -1, "not in this block of rows"
        if labels is not None:
            HF.check_labels(labels, embeddings.shape[0], self.num_classes, allow_no_target=self.row_block)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


class ASoftmaxHead(_NormalisedClassifier):
    """A-Softmax (SphereFace, SPEC section 4) with λ annealing.

    λ = max(λ_min, base · (1 + γ t)^(-power)), where ``t`` is the buffer ``iteration`` (saved in the
    state dict, so a resumed run continues the schedule). Like the Caffe layer, a training-mode forward
    first advances ``t`` by one and then uses λ(t); evaluation forwards use λ(t) without advancing.
    ``current_lambda`` is that λ(t): the value the latest training forward used.

    Args:
        in_features: embedding size d (512).
        num_classes: C.
        m: angular margin, 1..4 (4 in SphereFace).
        base, gamma, power, lambda_min: the λ schedule (SphereFace: 1000, 0.12, 1, 5). A fixed λ (as in
            SphereFace+ fine-tuning, λ = 5): ``base=5, lambda_min=5``.
        renorm_weight: rescale the stored rows to unit length at each training forward (Caffe).
        gradient: ``'exact'`` (autograd) or ``'caffe'`` (the released SphereFace layer's backward, see
            :func:`~sphereface_plus.heads.functional.a_softmax_logits`), whenever autograd runs
            (training or evaluation mode); the forward is the same.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: int = 4,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
        renorm_weight: bool = True,
        gradient: str = "exact",
    ):
        super().__init__(in_features, num_classes, renorm_weight)
        self.m = HF.check_margin_m(m)
        self.gradient = HF.check_gradient(gradient)
        if base < 0 or lambda_min < 0 or gamma < 0:
            raise ValueError(f"A-Softmax λ schedule needs base, gamma, lambda_min >= 0; got {base}, {gamma}, {lambda_min}")
        self.base = float(base)
        self.gamma = float(gamma)
        self.power = float(power)
        self.lambda_min = float(lambda_min)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def lambda_at(self, iteration: int) -> float:
        return HF.a_softmax_lambda(iteration, self.base, self.gamma, self.power, self.lambda_min)

    @property
    def current_lambda(self) -> float:
        return self.lambda_at(int(self.iteration))

    def forward(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check(embeddings, labels)
        self._renorm()
        if self.training:
            self.iteration += 1
        return HF.a_softmax_logits(embeddings, self.weight, labels, m=self.m, lam=self.current_lambda,
                                   gradient=self.gradient)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, m={self.m}, base={self.base}, gamma={self.gamma}, power={self.power}, "
            f"lambda_min={self.lambda_min}, gradient={self.gradient!r}"
        )


class SoftmaxHead(nn.Module):
    """Plain linear classifier ``x W^T + b`` (the softmax-loss baseline); ``labels`` are not used."""

    row_block: bool = False  # as in _NormalisedClassifier

    def __init__(self, in_features: int, num_classes: int, bias: bool = True):
        super().__init__()
        _check_sizes(in_features, num_classes)
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))
        self.bias = nn.Parameter(torch.zeros(self.num_classes)) if bias else None
        nn.init.xavier_uniform_(self.weight)

    def forward(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if labels is not None:
            HF.check_labels(labels, embeddings.shape[0], self.num_classes, allow_no_target=self.row_block)
        return HF.softmax_logits(embeddings, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}"


class CosFaceHead(_NormalisedClassifier):
    """CosFace / LMCL: ``s (cos θ_j - m [j = y])``, normalised features and weights."""

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.35, renorm_weight: bool = False):
        super().__init__(in_features, num_classes, renorm_weight)
        if s <= 0 or m < 0:
            raise ValueError(f"CosFace needs s > 0 and m >= 0, got s={s}, m={m}")
        self.s, self.m = float(s), float(m)

    def forward(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check(embeddings, labels)
        self._renorm()
        return HF.cosface_logits(embeddings, self.weight, labels, s=self.s, m=self.m)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}"


class ArcFaceHead(_NormalisedClassifier):
    """ArcFace: ``s cos(θ_y + m)`` on the target, ``s cos θ_j`` elsewhere, normalised x and W."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        easy_margin: bool = False,
        renorm_weight: bool = False,
    ):
        super().__init__(in_features, num_classes, renorm_weight)
        if s <= 0 or not 0 <= m < 3.14159:
            raise ValueError(f"ArcFace needs s > 0 and 0 <= m < π, got s={s}, m={m}")
        self.s, self.m, self.easy_margin = float(s), float(m), bool(easy_margin)

    def forward(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check(embeddings, labels)
        self._renorm()
        return HF.arcface_logits(embeddings, self.weight, labels, s=self.s, m=self.m, easy_margin=self.easy_margin)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}, easy_margin={self.easy_margin}"


@register_head("a_softmax")
def a_softmax(in_features: int = 512, num_classes: int = 10572, **kwargs) -> ASoftmaxHead:
    """A-Softmax (SphereFace): m, base, gamma, power, lambda_min, gradient ('exact' | 'caffe')."""
    return ASoftmaxHead(in_features, num_classes, **kwargs)


@register_head("softmax")
def softmax(in_features: int = 512, num_classes: int = 10572, **kwargs) -> SoftmaxHead:
    """Plain linear softmax classifier (baseline)."""
    return SoftmaxHead(in_features, num_classes, **kwargs)


@register_head("cosface")
def cosface(in_features: int = 512, num_classes: int = 10572, **kwargs) -> CosFaceHead:
    """CosFace: s, m."""
    return CosFaceHead(in_features, num_classes, **kwargs)


@register_head("arcface")
def arcface(in_features: int = 512, num_classes: int = 10572, **kwargs) -> ArcFaceHead:
    """ArcFace: s, m, easy_margin."""
    return ArcFaceHead(in_features, num_classes, **kwargs)
