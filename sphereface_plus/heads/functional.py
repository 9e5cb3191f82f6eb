"""Pure functions of the classifier heads: ψ, A-Softmax, CosFace and ArcFace logits, the λ schedule.

Stateless and differentiable (plain autograd, which gives the exact gradient, except where a caller asks
A-Softmax for ``gradient='caffe'``: the released SphereFace models' backward, see
:func:`a_softmax_logits`); the modules in :mod:`sphereface_plus.heads.modules` only hold parameters and
the λ iteration counter.

References: SphereFace (Liu et al., CVPR 2017, eq. 6-7; docs/theory.md#a-softmax), CosFace (Wang et al., CVPR 2018),
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
    "caffe_target_coefficients",
    "A_SOFTMAX_GRADIENTS",
    "check_gradient",
    "softmax_logits",
    "cosface_logits",
    "arcface_logits",
    "arcface_target",
    "check_margin_m",
    "check_a_softmax_m",
    "psi_angular",
    "FEATURE_NORMS",
    "MARGIN_GRADIENTS",
    "WEIGHT_GRADIENTS",
    "ARCFACE_WRAPS",
    "unit_weight",
    "cosine",
    "check_choice",
    "check_labels",
    "NO_TARGET",
]

NORM_EPS = 1e-12  # guards the division by ‖x‖ for an all-zero feature

# A label of -1 given to the margin functions means "this sample's class is not among these rows": its
# row of logits is margin-free. A row-sharded classifier (each process holds a block of the classes)
# calls them with its block's weight and the labels shifted into the block, -1 elsewhere.
NO_TARGET = -1

# The backward passes A-Softmax offers: "exact" (autograd of the forward), "caffe" (the
# MarginInnerProduct layer's Backward of wy1iu/sphereface, which trained the released models) and
# "detached" (OpenSphere: the margin is added under no_grad, so backpropagation sees scale * cos θ).
A_SOFTMAX_GRADIENTS = ("exact", "caffe", "detached")
# The margin's gradient of CosFace / ArcFace: "exact" (autograd) or "detached" (insightface's
# CombinedMarginLoss and OpenSphere's heads: margin under no_grad). docs/theory.md#detached-margin
MARGIN_GRADIENTS = ("exact", "detached")
# The weight rows' gradient: "normalized" (through ŵ = w/‖w‖, insightface, the toolkit's default) or
# "stored" (‖w‖ held constant: OpenSphere and the Caffe layer rescale the stored rows in place and then
# use them as they are, so the gradient of x̂·w is taken with respect to w itself). docs/theory.md#weight-gradient
WEIGHT_GRADIENTS = ("normalized", "stored")
# A-Softmax's feature scale: "none" (‖x‖, SphereFace) or "hard" (a fixed s, OpenSphere / SphereFace-R)
FEATURE_NORMS = ("none", "hard")
# ArcFace where θ + m > π: "toolkit" (the linear continuation cos θ - m sin m of the ArcFace paper's
# code), "insightface" (plain cos(θ + m), arcface_torch's CombinedMarginLoss), "opensphere" (θ + m
# clamped at 3.14159, OpenSphere's ArcFace). docs/theory.md#arcface-wrap
ARCFACE_WRAPS = ("toolkit", "insightface", "opensphere")

OPENSPHERE_ACOS_EPS = 1e-5  # OpenSphere's arccos argument clamp: cos θ in [-1 + 1e-5, 1 - 1e-5]
OPENSPHERE_PI = 3.14159  # OpenSphere's clamp of θ + m


def check_choice(value: str, choices, what: str) -> str:
    """``value`` must be one of ``choices`` (a ``ValueError`` naming them otherwise)."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")
    return value


def check_gradient(gradient: str) -> str:
    """``gradient`` must be one of :data:`A_SOFTMAX_GRADIENTS`."""
    if gradient not in A_SOFTMAX_GRADIENTS:
        raise ValueError(
            f"unknown A-Softmax gradient {gradient!r}: choose one of {', '.join(A_SOFTMAX_GRADIENTS)} "
            f"('caffe' is the released SphereFace backward, 'detached' OpenSphere's)"
        )
    return gradient


def unit_weight(weight: torch.Tensor, weight_gradient: str = "normalized") -> torch.Tensor:
    """The unit rows ŵ = w / ‖w‖: differentiated through the norm (``normalized``) or with the norm
    held constant (``stored``; equal to the stored rows themselves when they are already unit length,
    as after an in-place renorm, which is how OpenSphere and the Caffe layer use them)."""
    check_choice(weight_gradient, WEIGHT_GRADIENTS, "weight_gradient")
    if weight_gradient == "stored":
        return weight / weight.detach().norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return F.normalize(weight, dim=1)


def cosine(embeddings: torch.Tensor, weight: torch.Tensor, weight_gradient: str = "normalized") -> torch.Tensor:
    """``cos θ_j = x̂ · ŵ_j`` (B x C), clamped to [-1, 1]."""
    return (F.normalize(embeddings, dim=1) @ unit_weight(weight, weight_gradient).t()).clamp(-1.0, 1.0)


def check_margin_m(m) -> int:
    """A-Softmax's angular margin must be an integer in 1..4 (ψ uses the Chebyshev polynomial of m)."""
    if isinstance(m, bool) or int(m) != m or not 1 <= int(m) <= 4:
        raise ValueError(f"A-Softmax margin m must be an integer in 1, 2, 3, 4 (as in SphereFace, Liu et al., CVPR 2017), got {m!r}")
    return int(m)


def check_labels(
    labels: torch.Tensor, batch_size: Optional[int], num_classes: int, allow_no_target: bool = False,
    check_range: bool = True,
) -> torch.Tensor:
    """``labels``: integer class indices in ``[0, num_classes)`` (exactly ``batch_size`` of them unless
    that is None); returns them as a flat long tensor. Shared by the heads and the MHE terms.
    ``allow_no_target`` also accepts :data:`NO_TARGET` (-1) entries (the margin functions do).
    ``check_range=False`` leaves out the range check (a reduction, so a host sync for labels on a GPU): for
    labels their owner checked already (the face trainer checks each batch once, on the host)."""
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.reshape(-1).long()
    if batch_size is not None and labels.numel() != batch_size:
        raise ValueError(f"got {labels.numel()} labels for a batch of {batch_size} embeddings")
    if check_range and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < (NO_TARGET if allow_no_target else 0) or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"label {bad} is outside [0, {num_classes}) for a classifier with {num_classes} classes "
                f"(check the list file's labels and num_classes)"
            )
    return labels


def check_a_softmax_m(m) -> float:
    """A-Softmax's multiplicative margin: a number in [1, 4]; an integer value keeps the exact
    Chebyshev form (:func:`psi`), a real one uses :func:`psi_angular`. Returns an int for integer m."""
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 1 <= float(m) <= 4:
        raise ValueError(f"A-Softmax margin m must be a number in [1, 4] (integers 1, 2, 3, 4 use the Chebyshev "
                         f"form of cos(m θ); SphereFace uses 4, OpenSphere 1.5 or 1.7), got {m!r}")
    return int(m) if float(m).is_integer() else float(m)


def psi_angular(cos_theta: torch.Tensor, m: float) -> torch.Tensor:
    """ψ(θ) = (-1)^k cos(mθ) - 2k, k = ⌊mθ/π⌋, for a real margin m ≥ 1, through θ = arccos(c).

    The arccos argument is clamped to [-1 + 1e-5, 1 - 1e-5] as in OpenSphere (it also keeps the
    gradient of arccos finite). For integer m it equals :func:`psi` (up to that clamp); k is piecewise
    constant, so it carries no gradient. docs/theory.md#a-softmax-real-m
    """
    theta = torch.acos(cos_theta.clamp(-1.0 + OPENSPHERE_ACOS_EPS, 1.0 - OPENSPHERE_ACOS_EPS))
    m_theta = float(m) * theta
    k = torch.floor(m_theta.detach() / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k
    return sign * torch.cos(m_theta) - 2.0 * k


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
    """SphereFace's ψ(θ) = (-1)^k cos(mθ) - 2k for θ ∈ [kπ/m, (k+1)π/m], k = 0..m-1 (docs/theory.md#a-softmax-psi).

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
    """λ = max(λ_min, base · (1 + γ t)^(-power)) at iteration ``t`` (docs/theory.md#lambda-schedule).

    With the SphereFace values (1000, 0.12, 1, 5) λ reaches 5 at t = 1659.
    """
    t = float(iteration)
    return max(float(lambda_min), float(base) * (1.0 + float(gamma) * t) ** (-float(power)))


def _check_shapes(embeddings: torch.Tensor, weight: torch.Tensor) -> None:
    if embeddings.dim() != 2 or weight.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings must be B x d and weight C x d with the same d; got {tuple(embeddings.shape)} "
            f"and {tuple(weight.shape)}"
        )


def _cosine_and_norm(embeddings: torch.Tensor, weight: torch.Tensor):
    """Raw scores ``x · ŵ_j`` with unit rows ŵ, the feature norms ‖x‖, and cos θ_j = x·ŵ_j / ‖x‖."""
    _check_shapes(embeddings, weight)
    w_hat = F.normalize(weight, dim=1)
    raw = embeddings @ w_hat.t()  # ‖x‖ cos θ_j
    x_norm = embeddings.norm(dim=1, keepdim=True)
    cos = (raw / x_norm.clamp_min(NORM_EPS)).clamp(-1.0, 1.0)
    return raw, x_norm, cos


def a_softmax_logits(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: Optional[torch.Tensor],
    m: float = 4,
    lam: float = 0.0,
    gradient: str = "exact",
    feature_norm: str = "none",
    s: float = 64.0,
    weight_gradient: str = "normalized",
) -> torch.Tensor:
    """A-Softmax logits (SphereFace eq. 7, docs/theory.md#a-softmax): B x C.

    Weight rows are normalised to unit length (in the graph); features are not. Non-target
    ``f_j = ‖x‖ cos θ_j`` (= ``x · ŵ_j``); target ``f_y = (λ ‖x‖ cos θ_y + ‖x‖ ψ(θ_y)) / (1 + λ)``.
    ``labels=None`` gives the margin-free logits (inference). ``lam`` is the annealing weight λ ≥ 0 (0:
    the pure angular margin). A label of :data:`NO_TARGET` leaves that sample's row margin-free (its
    class is in another block of rows).

    ``m``: a number in [1, 4]; an integer keeps the Chebyshev ψ (:func:`psi`), a real m uses
    :func:`psi_angular` (OpenSphere, docs/theory.md#a-softmax-real-m). ``feature_norm``: ``'none'`` (the
    scale is ‖x‖, SphereFace) or ``'hard'`` (docs/theory.md#a-softmax-feature-norm; the scale is ``s``:
    ``f_j = s cos θ_j``, target ``s (λ cos θ_y + ψ) / (1 + λ)``, OpenSphere's SphereFace). ``weight_gradient``: :data:`WEIGHT_GRADIENTS`
    (:func:`unit_weight`).

    ``gradient``: ``'exact'`` (autograd of this forward); ``'detached'``: the same forward with the
    margin ``(λ cos θ_y + ψ)/(1 + λ) - cos θ_y`` added as a constant (OpenSphere computes it under
    ``no_grad``), so backpropagation sees ``scale · cos θ_y`` (docs/theory.md#detached-margin); or
    ``'caffe'``: the same forward with the backward of the SphereFace Caffe layer (wy1iu/sphereface,
    ``margin_inner_product_layer.cpp`` / ``.cu``, Backward), which trained the released models (integer
    m and ``feature_norm='none'`` only). With ``G = dL/dlogits``:

    - features: ``G ŵ`` for every non-target column (exact); for the target column the exact
      ``∂f_y/∂x = (coeff_w ŵ_y + coeff_x x) / (1 + λ) + λ/(1 + λ) ŵ_y`` with the pair
      ``(coeff_w, coeff_x)`` rescaled to unit length (:func:`caffe_target_coefficients`);
    - weights: ``G^T x`` with respect to the weight parameter itself: no margin, and no Jacobian of the
      row normalisation (Caffe normalises the stored rows in place and differentiates the plain inner
      product).

    It is not the gradient of any function (the wy1iu/sphereface README calls it a normalised gradient;
    that README also says the weight gradient is rescaled the same way, which the code does not do: we
    follow the code). A row block with :data:`NO_TARGET` labels gets only the margin-free parts, so the
    blocks of a row-sharded classifier sum to the full classifier's Caffe gradient.
    """
    m = check_a_softmax_m(m)
    check_gradient(gradient)
    check_choice(feature_norm, FEATURE_NORMS, "A-Softmax feature_norm")
    check_choice(weight_gradient, WEIGHT_GRADIENTS, "weight_gradient")
    if lam < 0:
        raise ValueError(f"A-Softmax λ must be >= 0, got {lam}")
    if feature_norm == "hard" and not s > 0:
        raise ValueError(f"A-Softmax feature_norm='hard' needs a scale s > 0, got {s}")
    if gradient == "caffe":
        if feature_norm != "none" or not isinstance(m, int):
            raise ValueError(f"gradient='caffe' is the SphereFace Caffe layer's backward: it needs an integer m and "
                             f"feature_norm='none', got m={m}, feature_norm={feature_norm!r}")
        if labels is None:
            labels = torch.full((embeddings.shape[0],), NO_TARGET, dtype=torch.long)
        has_target, idx = _target_index(labels, embeddings, weight)
        return _CaffeASoftmax.apply(embeddings, weight, has_target, idx, m, float(lam))
    if feature_norm == "none" and gradient == "exact" and isinstance(m, int) and weight_gradient == "normalized":
        # SphereFace's own setting: this path is unchanged since the Chebyshev form was written
        raw, x_norm, cos = _cosine_and_norm(embeddings, weight)
        if labels is None:
            return raw
        has_target, idx = _target_index(labels, embeddings, weight)
        return _a_softmax_with_target(raw, x_norm, cos, has_target, idx, m, lam)
    _check_shapes(embeddings, weight)
    w_hat = unit_weight(weight, weight_gradient)
    if feature_norm == "none":
        raw = embeddings @ w_hat.t()
        scale = embeddings.norm(dim=1, keepdim=True)
        cos = (raw / scale.clamp_min(NORM_EPS)).clamp(-1.0, 1.0)
    else:
        cos = (F.normalize(embeddings, dim=1) @ w_hat.t()).clamp(-1.0, 1.0)
        scale = float(s)
        raw = scale * cos
    if labels is None:
        return raw
    has_target, idx = _target_index(labels, embeddings, weight)
    cos_y = cos.gather(1, idx)
    psi_y = psi(cos_y, m) if isinstance(m, int) else psi_angular(cos_y, m)
    target = (lam * cos_y + psi_y) / (1.0 + lam)
    if gradient == "detached":
        target = cos_y + (target - cos_y).detach()
    target = scale * target
    return raw.scatter(1, idx, torch.where(has_target, target, raw.gather(1, idx)))


def _a_softmax_with_target(raw, x_norm, cos, has_target, idx, m: int, lam: float) -> torch.Tensor:
    """The forward's target column, shared by both gradients (so ``gradient='caffe'`` changes no value)."""
    cos_y = cos.gather(1, idx)
    target = x_norm * (lam * cos_y + psi(cos_y, m)) / (1.0 + lam)
    return raw.scatter(1, idx, torch.where(has_target, target, raw.gather(1, idx)))


def _caffe_sign(v: torch.Tensor) -> torch.Tensor:
    # caffe_sign: (0 < v) - (v < 0), so sign(0) = 0 (torch.sign agrees)
    return torch.sign(v)


def caffe_target_coefficients(cos_theta: torch.Tensor, x_norm: torch.Tensor, m: int):
    """The Caffe layer's target-column feature-gradient pair ``(coeff_w, coeff_x)``, rescaled to unit length.

    Transcribed from ``MarginInnerProductLayer::Backward_cpu`` (wy1iu/sphereface), with the same sign
    variables as its forward (``caffe_sign(0) = 0``), so the cosines on ψ's boundaries ``cos(kπ/m)`` take
    the layer's branch (the pair is continuous there):

    ====  ==========================================  =======================================================
    m     coeff_w                                      coeff_x · (-‖x‖)
    ====  ==========================================  =======================================================
    1     1                                            0 (the layer's SINGLE type: a plain inner product)
    2     4 s0 c                                       2 s0 c² + 1,                    s0 = sign(c)
    3     s1 (12 c² - 3)                               8 s1 c³ - s2,                   s1 = sign(|c| - 1/2),
                                                                                       s2 = s0 (1 + s1) - 2
    4     s3 (32 c³ - 16 c)                            s3 (24 c⁴ - 8 c² - 1) - s4,     s3 = s0 sign(2c² - 1),
                                                                                       s4 = 2 s0 + s3 - 3
    ====  ==========================================  =======================================================

    Without the rescaling, ``coeff_w ŵ + coeff_x x`` is the exact ``∂(‖x‖ ψ)/∂x`` at fixed ŵ.
    """
    m = check_margin_m(m)
    c = cos_theta
    if m == 1:
        return torch.ones_like(c), torch.zeros_like(c)
    s0 = _caffe_sign(c)
    c2 = c * c
    if m == 2:
        cw = 4.0 * s0 * c
        cx = (2.0 * s0 * c2 + 1.0) / (-x_norm)
    elif m == 3:
        s1 = _caffe_sign(c.abs() - 0.5)
        s2 = s0 * (1.0 + s1) - 2.0
        cw = s1 * (12.0 * c2 - 3.0)
        cx = (8.0 * s1 * c2 * c - s2) / (-x_norm)
    else:
        s3 = s0 * _caffe_sign(2.0 * c2 - 1.0)
        s4 = 2.0 * s0 + s3 - 3.0
        cw = s3 * (32.0 * c2 * c - 16.0 * c)
        cx = (s3 * (24.0 * c2 * c2 - 8.0 * c2 - 1.0) - s4) / (-x_norm)
    norm = torch.sqrt(cw * cw + cx * cx)
    return cw / norm, cx / norm


class _CaffeASoftmax(torch.autograd.Function):
    """A-Softmax logits with the Caffe layer's backward (see :func:`a_softmax_logits`, ``gradient='caffe'``)."""

    @staticmethod
    def forward(ctx, x, weight, has_target, idx, m: int, lam: float):
        raw, x_norm, cos = _cosine_and_norm(x, weight)
        logits = _a_softmax_with_target(raw, x_norm, cos, has_target, idx, m, lam)
        ctx.save_for_backward(x, weight, has_target, idx)
        ctx.m, ctx.lam = m, lam
        return logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, has_target, idx = ctx.saved_tensors
        m, lam = ctx.m, ctx.lam
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad.t().mm(x)  # top_diff^T x: the stored rows' diff, no margin, no normalisation
        if ctx.needs_input_grad[0]:
            w_hat = F.normalize(weight, dim=1)
            grad_x = grad.mm(w_hat)  # every column as a plain inner product ...
            if m > 1:
                # ... and the target column replaced: G_y [(cw ŵ_y + cx x)/(1+λ) + λ/(1+λ) ŵ_y] - G_y ŵ_y
                w_y = w_hat[idx.squeeze(1)]
                x_norm = x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
                cos_y = (x * w_y).sum(dim=1, keepdim=True) * (1.0 / x_norm)  # cos_theta_ of the layer: no clamp
                cw, cx = caffe_target_coefficients(cos_y, x_norm, m)
                g_y = grad.gather(1, idx) * has_target.to(grad.dtype)
                grad_x = grad_x + (g_y / (1.0 + lam)) * ((cw - 1.0) * w_y + cx * x)
        return grad_x, grad_w, None, None, None, None


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
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: Optional[torch.Tensor],
    s: float = 64.0,
    m: float = 0.35,
    gradient: str = "exact",
    weight_gradient: str = "normalized",
) -> torch.Tensor:
    """CosFace / LMCL (Wang et al. 2018, eq. 4; docs/theory.md#cosface): ``s (cos θ_j - m [j = y])`` with
    normalised features and weights (:data:`NO_TARGET` labels: no margin in that row).

    ``gradient``: :data:`MARGIN_GRADIENTS` (docs/theory.md#detached-margin). The margin is a constant,
    so ``'detached'`` (insightface's and OpenSphere's spelling) gives the same values and the same
    gradient; it is accepted so that every margin head takes the option."""
    check_choice(gradient, MARGIN_GRADIENTS, "CosFace gradient")
    cos = cosine(embeddings, weight, weight_gradient)
    if labels is None:
        return s * cos
    has_target, idx = _target_index(labels, embeddings, weight)
    return s * cos.scatter_add(1, idx, -float(m) * has_target.to(cos.dtype))


def arcface_target(c: torch.Tensor, m: float, easy_margin: bool = False, wrap: str = "toolkit") -> torch.Tensor:
    """ArcFace's target cosine ``cos(θ + m)`` from ``c = cos θ``, with the rule for θ + m > π
    (:data:`ARCFACE_WRAPS`; docs/theory.md#arcface-wrap):

    - ``toolkit`` (default): ``c cos m - sin θ sin m`` where ``θ < π - m``, else the linear continuation
      ``c - m sin m`` (the ArcFace paper's reference code), which keeps the target logit decreasing in θ;
    - ``insightface``: plain ``cos(θ + m)`` everywhere (arcface_torch's ``CombinedMarginLoss``), which
      increases again past π - m;
    - ``opensphere``: ``cos(clamp(θ + m, 1e-5, 3.14159))`` with θ = arccos of c clamped to ±(1 - 1e-5)
      (OpenSphere's ArcFace): constant past π - m.

    ``easy_margin``: the margin only where c > 0 (overrides ``wrap``).
    """
    check_choice(wrap, ARCFACE_WRAPS, "ArcFace wrap")
    if wrap == "opensphere" and not easy_margin:
        theta = torch.acos(c.clamp(-1.0 + OPENSPHERE_ACOS_EPS, 1.0 - OPENSPHERE_ACOS_EPS))
        return torch.cos((theta + float(m)).clamp(OPENSPHERE_ACOS_EPS, OPENSPHERE_PI))
    # sin θ = sqrt(1 - c^2); the clamp keeps the sqrt's gradient finite at c = ±1
    sin = torch.sqrt((1.0 - c * c).clamp_min(1e-12))
    phi = c * math.cos(m) - sin * math.sin(m)
    if easy_margin:
        return torch.where(c > 0, phi, c)
    if wrap == "insightface":
        return phi
    return torch.where(c > math.cos(math.pi - m), phi, c - math.sin(math.pi - m) * m)


def arcface_logits(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: Optional[torch.Tensor],
    s: float = 64.0,
    m: float = 0.5,
    easy_margin: bool = False,
    gradient: str = "exact",
    wrap: str = "toolkit",
    weight_gradient: str = "normalized",
) -> torch.Tensor:
    """ArcFace (Deng et al. 2019, eq. 3; docs/theory.md#arcface): ``s cos(θ_y + m)`` for the target,
    ``s cos θ_j`` otherwise (normalised x and W); :func:`arcface_target` for the rule past π - m.

    ``gradient``: ``'exact'`` (autograd of ``cos(θ + m)``) or ``'detached'``: the margin
    ``cos(θ_y + m) - cos θ_y`` is a constant of the backward, so backpropagation sees ``s cos θ_y``
    (insightface's ``CombinedMarginLoss`` and OpenSphere's ArcFace add it under ``no_grad``;
    docs/theory.md#detached-margin). :data:`NO_TARGET` labels: no margin in that row.
    """
    check_choice(gradient, MARGIN_GRADIENTS, "ArcFace gradient")
    cos = cosine(embeddings, weight, weight_gradient)
    if labels is None:
        return s * cos
    has_target, idx = _target_index(labels, embeddings, weight)
    c = cos.gather(1, idx)
    phi = arcface_target(c, m, easy_margin, wrap)
    if gradient == "detached":
        phi = c + (phi - c).detach()
    return s * cos.scatter(1, idx, torch.where(has_target, phi, c))
