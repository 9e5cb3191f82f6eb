"""Shared geometry of the newer heads (SphereFace-R, SphereFace2, AdaFace, MagFace; docs/heads_family.md).

Two ways the peers' code differentiates the unit weight rows, offered as :data:`WEIGHT_GRADIENTS` (the
names of the ported heads' ``weight_gradient``):

``"stored"``
    OpenSphere (``OpenSphere_v0``, ``main``, ``SphereFace2_ICLR21``): every training forward rescales
    the stored rows to unit length in place (``w.data = F.normalize(w.data)``) and then multiplies by
    ``w`` itself, so the weight gradient is the plain ``dL/dŵ`` with no Jacobian of the normalisation.
    Here: the forward uses ``w / stop_gradient(|w|)``, whose gradient at a unit row is exactly that
    plain gradient (and whose value is the unit row whatever the stored norm, so evaluation-mode
    logits stay normalised).
``"normalized"``
    AdaFace (mk-minchul/AdaFace ``head.py``) and MagFace (IrvingMeng/MagFace ``models/magface.py``)
    normalise in the graph (``l2_norm(kernel)``, ``F.normalize(weight)``): the gradient carries the
    Jacobian ``(I - ŵ ŵ^T) / |w|``.

See docs/theory.md#sphereface-r for where each head uses which.
"""
from __future__ import annotations

from typing import Optional

import torch

from sphereface_plus.heads.functional import WEIGHT_GRADIENTS, check_choice, unit_weight

__all__ = [
    "WEIGHT_GRADIENTS",
    "check_choice",
    "unit_rows",
    "feature_cosine",
    "clamped_acos",
    "target_mask",
    "PI_CLAMP",
]

NORM_EPS = 1e-12  # F.normalize's eps


def unit_rows(weight: torch.Tensor, gradient: str = "stored") -> torch.Tensor:
    """The unit rows ŵ of ``weight`` (C x d) with the chosen gradient (:data:`WEIGHT_GRADIENTS`, owned by
    :mod:`sphereface_plus.heads.functional`); ``stored`` by default, as the OpenSphere heads ported here."""
    return unit_weight(weight, gradient)


def feature_cosine(embeddings: torch.Tensor, w_hat: torch.Tensor):
    """``(cos B x C, |x| B x 1)``: ``cos θ_ij = x_i · ŵ_j / |x_i|`` (exact gradient through x / |x|),
    not clamped (the heads clamp where their reference code does)."""
    if embeddings.dim() != 2 or w_hat.dim() != 2 or embeddings.shape[1] != w_hat.shape[1]:
        raise ValueError(
            f"embeddings must be B x d and weight C x d with the same d; got {tuple(embeddings.shape)} and "
            f"{tuple(w_hat.shape)}"
        )
    norm = embeddings.norm(dim=1, keepdim=True)
    cos = (embeddings / norm.clamp_min(NORM_EPS)) @ w_hat.t()
    return cos, norm


def clamped_acos(cos: torch.Tensor, eps: float) -> torch.Tensor:
    """``arccos(clamp(cos, -1 + eps, 1 - eps))``: OpenSphere's angle (finite slope everywhere)."""
    return torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))


def target_mask(labels: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``B x C`` boolean one-hot of ``labels`` (:data:`~sphereface_plus.heads.functional.NO_TARGET`
    rows and ``labels=None``: all False)."""
    mask = torch.zeros(like.shape, dtype=torch.bool, device=like.device)
    if labels is None:
        return mask
    labels = labels.reshape(-1).to(like.device)
    rows = torch.nonzero(labels >= 0).squeeze(1)
    mask[rows, labels[rows]] = True
    return mask


PI_CLAMP = 3.14159  # OpenSphere's upper clamp of a margin angle (below pi, so cos stays decreasing)
