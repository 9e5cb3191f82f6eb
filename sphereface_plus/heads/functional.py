"""Pure functions of the classifier heads: ψ, A-Softmax, CosFace and ArcFace logits, the λ schedule.

Stateless and differentiable (plain autograd everywhere, which gives the exact gradient); the modules in
:mod:`sphereface_plus.heads.modules` only hold parameters and the λ iteration counter.

References: SphereFace (Liu et al., CVPR 2017, eq. 6-7; SPEC section 4), CosFace (Wang et al., CVPR 2018),
ArcFace (Deng et al., CVPR 2019).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "psi",
    "chebyshev_cos",
    "a_softmax_lambda",
    "a_softmax_logits",
    "softmax_logits",
    "cosface_logits",
    "arcface_logits",
    "check_margin_m",
    "check_labels",
    "NO_TARGET",
]

NORM_EPS = 1e-12  # guards the division by ‖x‖ for an all-zero feature

# A label of -1 given to the margin functions means "this sample's class is not among these rows": its
# row of logits is margin-free. A row-sharded classifier (each process holds a block of the classes)
# calls them with its block's weight and the labels shifted into the block, -1 elsewhere.
NO_TARGET = -1


def check_margin_m(m) -> int:
    """A-Softmax's angular margin must be an integer in 1..4 (ψ uses the Chebyshev polynomial of m)."""
    if isinstance(m, bool) or int(m) != m or not 1 <= int(m) <= 4:
        raise ValueError(f"A-Softmax margin m must be an integer in 1, 2, 3, 4 (SPEC section 4), got {m!r}")
    return int(m)


def check_labels(
    labels: torch.Tensor, batch_size: Optional[int], num_classes: int, allow_no_target: bool = False
) -> torch.Tensor:
    """``labels``: integer class indices in ``[0, num_classes)`` (exactly ``batch_size`` of them unless
    that is None); returns them as a flat long tensor. Shared by the heads and the MHE terms.
    ``allow_no_target`` also accepts :data:`NO_TARGET` (-1) entries (the margin functions do)."""
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.reshape(-1).long()
    if batch_size is not None and labels.numel() != batch_size:
        raise ValueError(f"got {labels.numel()} labels for a batch of {batch_size} embeddings")
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < (NO_TARGET if allow_no_target else 0) or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"label {bad} is outside [0, {num_classes}) for a classifier with {num_classes} classes "
                f"(check the list file's labels and num_classes)"
            )
    return labels


def chebyshev_cos(c: torch.Tensor, m: int) -> torch.Tensor:
    """``cos(m θ)`` as the Chebyshev polynomial ``T_m(cos θ)``, m = 1..4 (no arccos needed)."""
    if m == 1:
        return c
    if m == 2:
        return 2 * c * c - 1
    if m == 3:
        return (4 * c * c - 3) * c
    c2 = c * c
    return (8 * c2 - 8) * c2 + 1


def psi(cos_theta: torch.Tensor, m: int = 4) -> torch.Tensor:
    """SphereFace's ψ(θ) = (-1)^k cos(mθ) - 2k for θ ∈ [kπ/m, (k+1)π/m], k = 0..m-1 (SPEC section 4).

    Takes ``cos θ`` (clamped to [-1, 1]) and returns ψ, monotonically decreasing in θ from ψ(0) = 1 to
    ψ(π) = -(2m-1) and continuous. ``k`` comes from sign tests on ``c`` (θ ≥ jπ/m ⇔ c ≤ cos(jπ/m)); it
    is piecewise constant, so it carries no gradient. At a boundary either neighbouring k gives the same
    value (continuity).
    """
    m = check_margin_m(m)
    c = cos_theta.clamp(-1.0, 1.0)
    k = torch.zeros_like(c)
    for j in range(1, m):
        k = k + (c <= math.cos(j * math.pi / m)).to(c.dtype)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k
    return sign * chebyshev_cos(c, m) - 2.0 * k


def a_softmax_lambda(iteration, base: float = 1000.0, gamma: float = 0.12, power: float = 1.0, lambda_min: float = 5.0) -> float:
    """λ = max(λ_min, base · (1 + γ t)^(-power)) at iteration ``t`` (SPEC section 4).

    With the SphereFace values (1000, 0.12, 1, 5) λ reaches 5 at t = 1659.
    """
    t = float(iteration)
    return max(float(lambda_min), float(base) * (1.0 + float(gamma) * t) ** (-float(power)))


def _cosine_and_norm(embeddings: torch.Tensor, weight: torch.Tensor):
    """Raw scores ``x · ŵ_j`` with unit rows ŵ, the feature norms ‖x‖, and cos θ_j = x·ŵ_j / ‖x‖."""
    if embeddings.dim() != 2 or weight.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings must be B x d and weight C x d with the same d; got {tuple(embeddings.shape)} "
            f"and {tuple(weight.shape)}"
        )
    w_hat = F.normalize(weight, dim=1)
    raw = embeddings @ w_hat.t()  # ‖x‖ cos θ_j
    x_norm = embeddings.norm(dim=1, keepdim=True)
    cos = (raw / x_norm.clamp_min(NORM_EPS)).clamp(-1.0, 1.0)
    return raw, x_norm, cos


def a_softmax_logits(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: Optional[torch.Tensor],
    m: int = 4,
    lam: float = 0.0,
) -> torch.Tensor:
    """A-Softmax logits (SPEC section 4): B x C.

    Weight rows are normalised to unit length (in the graph, so the gradient is exact); features are
    not. Non-target ``f_j = ‖x‖ cos θ_j`` (= ``x · ŵ_j``); target
    ``f_y = (λ ‖x‖ cos θ_y + ‖x‖ ψ(θ_y)) / (1 + λ)``. ``labels=None`` gives the margin-free logits
    (inference). ``lam`` is the annealing weight λ ≥ 0 (0: the pure angular margin). A label of
    :data:`NO_TARGET` leaves that sample's row margin-free (its class is in another block of rows).
    """
    m = check_margin_m(m)
    if lam < 0:
        raise ValueError(f"A-Softmax λ must be >= 0, got {lam}")
    raw, x_norm, cos = _cosine_and_norm(embeddings, weight)
    if labels is None:
        return raw
    has_target, idx = _target_index(labels, embeddings, weight)
    cos_y = cos.gather(1, idx)
    target = x_norm * (lam * cos_y + psi(cos_y, m)) / (1.0 + lam)
    return raw.scatter(1, idx, torch.where(has_target, target, raw.gather(1, idx)))


def _target_index(labels: torch.Tensor, embeddings: torch.Tensor, weight: torch.Tensor):
    """``(has_target B x 1, index B x 1)``: which rows have their class among ``weight``'s rows, and where
    (a :data:`NO_TARGET` row points at column 0, whose value the caller leaves unchanged)."""
    labels = check_labels(labels, embeddings.shape[0], weight.shape[0], allow_no_target=True)
    labels = labels.to(embeddings.device).unsqueeze(1)
    return labels >= 0, labels.clamp_min(0)


def softmax_logits(embeddings: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain linear classifier ``x W^T + b`` (the softmax-loss baseline)."""
    return F.linear(embeddings, weight, bias)


def cosface_logits(
    embeddings: torch.Tensor, weight: torch.Tensor, labels: Optional[torch.Tensor], s: float = 64.0, m: float = 0.35
) -> torch.Tensor:
    """CosFace / LMCL: ``s (cos θ_j - m [j = y])`` with normalised features and weights
    (:data:`NO_TARGET` labels: no margin in that row)."""
    x_hat = F.normalize(embeddings, dim=1)
    cos = (x_hat @ F.normalize(weight, dim=1).t()).clamp(-1.0, 1.0)
    if labels is None:
        return s * cos
    has_target, idx = _target_index(labels, embeddings, weight)
    return s * cos.scatter_add(1, idx, -float(m) * has_target.to(cos.dtype))


def arcface_logits(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: Optional[torch.Tensor],
    s: float = 64.0,
    m: float = 0.5,
    easy_margin: bool = False,
) -> torch.Tensor:
    """ArcFace: ``s cos(θ_y + m)`` for the target, ``s cos θ_j`` otherwise (normalised x and W).

    ``cos(θ + m) = c cos m - sin θ sin m``. Where ``θ + m > π`` the target logit would increase with θ
    again, so (as in the ArcFace reference code) it is replaced there by the linear ``c - m sin m``
    continuation, which keeps it monotonic; ``easy_margin`` applies the margin only where c > 0.
    :data:`NO_TARGET` labels: no margin in that row.
    """
    x_hat = F.normalize(embeddings, dim=1)
    cos = (x_hat @ F.normalize(weight, dim=1).t()).clamp(-1.0, 1.0)
    if labels is None:
        return s * cos
    has_target, idx = _target_index(labels, embeddings, weight)
    c = cos.gather(1, idx)
    # sin θ = sqrt(1 - c^2); the clamp keeps the sqrt's gradient finite at c = ±1
    sin = torch.sqrt((1.0 - c * c).clamp_min(1e-12))
    phi = c * math.cos(m) - sin * math.sin(m)
    if easy_margin:
        phi = torch.where(c > 0, phi, c)
    else:
        phi = torch.where(c > math.cos(math.pi - m), phi, c - math.sin(math.pi - m) * m)
    return s * cos.scatter(1, idx, torch.where(has_target, phi, c))
