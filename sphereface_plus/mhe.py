"""Minimum Hyperspherical Energy (MHE) regularisers (SPEC section 5; Liu et al., NeurIPS 2018).

Three entry points, all built on the same pairwise kernels:

- :func:`mhe_energy` -- the energy of one layer: its neurons (the rows of ``weight.reshape(N, -1)``)
  are projected to the unit sphere and the kernel ``e(ŵ_i, ŵ_j)`` is averaged over the unordered
  pairs ``i < j``.
- :func:`classifier_mhe` -- the SphereFace+ term on classifier weights ``C x d``: the mini-batch form
  (the classes of the batch against all other classes), the energy among the distinct batch classes,
  or the exact full-space energy computed in row blocks (memory ``O(block * C)``, never ``O(C^2)``).
- :class:`MHERegularizer` -- MHE on the convolution and linear layers of any ``nn.Module`` (hidden
  layers with an optional half-space form, the output layer always full-space), the weighted sum plus
  the per-layer values for logging.

Kernels (``power``), on ``c_ij = ŵ_i · ŵ_j`` with ``ŵ = w / sqrt(|w|^2 + 1e-4)``:

======  =================================  =====================================
power   e_ij                                note
======  =================================  =====================================
``0``   ``-log(2 - 2c)``                    logarithmic energy (s = 0)
``1``   ``(2 - 2c)^(-1/2)``                 Coulomb / Thomson energy (s = 1)
``2``   ``(2 - 2c)^(-1)``                   s = 2
``a0``  ``-log(θ/π + 1e-4)``                angular variants, θ = arccos(c)
``a1``  ``(θ/π + 1e-4)^(-1)``
``a2``  ``(θ/π + 1e-4)^(-2)``
======  =================================  =====================================

``2 - 2c`` is the squared Euclidean distance of the two unit vectors. The angular kernels follow the TF
reference (wy1iu/MHE ``code/architecture.py``, ``_add_thomson_constraint``: ``tf.acos(inner_pro)`` with no
clamp) wherever it is finite: the value is ``arccos(c)`` for ``|c| <= 1`` and its slope is
``-1/sqrt(1 - c^2)`` for ``|c| < 1``. Only where TF would give a non-finite number do we substitute:
``c`` beyond ``+-1`` (possible only through round-off, since the 1e-4 keeps ``|c| < 1`` exactly) takes the
value at ``+-1`` (TF: NaN), and at ``|c| >= 1`` the slope is 0 (TF: infinite or NaN).

:func:`classifier_mhe` also offers ``mode='caffe_among'``: the Caffe ``InterClass`` layer of type
``AMONG`` that trained the released SphereFace+ models (wy1iu/sphereface-plus,
``tools/caffe-sfplus/src/caffe/layers/inter_class_layer.cpp``). It is not a pairwise kernel energy; see
:func:`caffe_among_distance` and :func:`caffe_among_diff`.
"""
from __future__ import annotations

import fnmatch
import logging
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from sphereface_plus.heads.functional import check_labels

logger = logging.getLogger(__name__)

__all__ = [
    "POWERS",
    "DEFAULT_COEFFICIENTS",
    "normalize_power",
    "normalize_rows",
    "mhe_kernel",
    "mhe_energy",
    "classifier_mhe",
    "caffe_among_partial_sums",
    "caffe_among_distance_from_sums",
    "caffe_among_distance",
    "caffe_among_direction",
    "caffe_among_diff",
    "MHERegularizer",
    "MHE_VARIANTS",
    "OPENSPHERE_V0_CLAMP",
    "check_variant",
    "variant_rows",
]

POWERS = ("0", "1", "2", "a0", "a1", "a2")
CLASSIFIER_MODES = ("batch_vs_all", "batch_unique", "full", "caffe_among")

# How the kernels read the rows (``variant``; docs/theory.md#sphereface-plus-v0):
#   "mhe" (default): the MHE paper's reference code, as in the table above.
#   "opensphere_v0": OpenSphere_v0's SphereFacePlus head (model/head/spherefaceplus.py): unit rows w / |w|
#     (the head keeps them unit in place, so the gradient is the plain one: w / stop_gradient(|w|)), the
#     cosine clamped to [-1 + 1e-5, 1 - 1e-5], and the angular kernels on θ itself (a2: θ^-2, a1: θ^-1,
#     a0: -log θ); the Euclidean kernels on 2 - 2c of the clamped c. Modes batch_unique and batch_vs_all.
MHE_VARIANTS = ("mhe", "opensphere_v0")
OPENSPHERE_V0_CLAMP = 1e-5

# (hidden, output) coefficients of the MHE reference code, by power (SPEC section 5 table).
DEFAULT_COEFFICIENTS: Dict[str, Tuple[float, float]] = {
    "0": (1.0, 10.0),
    "1": (1.0, 10.0),
    "2": (1.0, 10.0),
    "a0": (1.0, 10.0),
    "a1": (0.1, 1.0),
    "a2": (0.1, 1.0),
}

NORM_EPS = 1e-4  # ŵ = w / sqrt(|w|^2 + 1e-4)
ANGLE_EPS = 1e-4  # θ/π + 1e-4
# Deliberate deviation: the squared distance 2 - 2c is floored at 1e-6 for the Euclidean kernels. The
# reference code has no floor. Thanks to the 1e-4 in the normalisation, two rows pointing the same way
# are still 2e-4 / (|w|^2 + 1e-4) apart, so the floor only acts on identical rows of norm above ~14
# (and on float32 round-off), where the exact energy would be infinite/NaN and wreck training.
DIST_FLOOR = 1e-6
# mhe_energy switches from the dense N x N form to the blocked one above this many neurons.
DENSE_MAX_NEURONS = 4096
# default block: about 4M kernel entries (16 MB in float32) per temporary.
BLOCK_ENTRIES = 1 << 22


def normalize_power(power: Union[str, int]) -> str:
    """Map ``power`` (``'0'``, ``'1'``, ``'2'``, ``'a0'``, ``'a1'``, ``'a2'`` or the ints 0, 1, 2) to its string.

    Raises ``ValueError`` naming the choices for anything else.
    """
    if isinstance(power, bool):  # bool is an int subclass: True would silently mean '1'
        key = None
    elif isinstance(power, int):
        key = str(power)
    elif isinstance(power, str):
        key = power.strip().lower()
    else:
        key = None
    if key not in POWERS:
        raise ValueError(
            f"unknown MHE power {power!r}: choose one of {', '.join(repr(p) for p in POWERS)} "
            f"(or the integers 0, 1, 2)"
        )
    return key


def _check_weight(weight: torch.Tensor, what: str = "weight", check_finite: bool = True) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 1:
        raise ValueError(f"{what} must have at least one dimension (neurons along dim 0), got a scalar")
    if not weight.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.shape[0] < 2:
        raise ValueError(
            f"{what} of shape {tuple(weight.shape)} has {weight.shape[0]} neuron(s): MHE needs at least 2 "
            f"(neurons are the rows of weight.reshape(N, -1))"
        )
    if weight.numel() == 0:
        raise ValueError(f"{what} of shape {tuple(weight.shape)} is empty")
    if check_finite and not bool(torch.isfinite(weight).all()):
        bad = (~torch.isfinite(weight.detach())).nonzero()[0].tolist()
        raise ValueError(
            f"{what} of shape {tuple(weight.shape)} contains NaN or inf (first at index {bad}); the "
            f"training has diverged or the weights were loaded wrongly"
        )


def normalize_rows(weight: torch.Tensor) -> torch.Tensor:
    """``ŵ_i = w_i / sqrt(|w_i|^2 + 1e-4)`` for the rows of ``weight.reshape(N, -1)`` (SPEC section 5).

    The 1e-4 keeps the map smooth at ``w = 0``; ŵ is therefore slightly shorter than unit length.
    """
    w = weight.reshape(weight.shape[0], -1)
    return w * torch.rsqrt((w * w).sum(dim=1, keepdim=True) + NORM_EPS)


def _tf_acos(c: torch.Tensor) -> torch.Tensor:
    """``arccos(c)`` exactly as TF's ``tf.acos`` wherever TF is finite, finite everywhere.

    Inside ``(-1, 1)`` value and gradient are torch's (= TF's). At ``|c| >= 1`` the gradient is 0 (TF:
    infinite at +-1, NaN beyond) and the value is ``arccos(clamp(c, -1, 1))`` (TF: NaN beyond +-1). The
    inner ``where`` keeps the infinite slope of the other branch out of the graph.
    """
    inside = c.abs() < 1.0
    theta_inside = torch.acos(torch.where(inside, c, torch.zeros_like(c)))
    return torch.where(inside, theta_inside, torch.acos(c.detach().clamp(-1.0, 1.0)))


def check_variant(variant: str, mode: Optional[str] = None) -> str:
    """``variant`` must be one of :data:`MHE_VARIANTS`; ``opensphere_v0`` only with the batch modes."""
    if variant not in MHE_VARIANTS:
        raise ValueError(f"unknown MHE variant {variant!r}: choose one of {', '.join(MHE_VARIANTS)}")
    if variant == "opensphere_v0" and mode is not None and mode not in ("batch_unique", "batch_vs_all"):
        raise ValueError(f"MHE variant 'opensphere_v0' works with mode batch_unique (OpenSphere_v0's) or "
                         f"batch_vs_all, not {mode!r}")
    return variant


def variant_rows(weight: torch.Tensor, variant: str = "mhe") -> torch.Tensor:
    """The rows the kernels see: :func:`normalize_rows` (``mhe``) or ``w / stop_gradient(|w|)``
    (``opensphere_v0``: exactly unit, with the plain gradient of OpenSphere's in-place unit rows)."""
    if check_variant(variant) == "mhe":
        return normalize_rows(weight)
    w = weight.reshape(weight.shape[0], -1)
    return w / w.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)


def mhe_kernel(c: torch.Tensor, power: Union[str, int] = "2", variant: str = "mhe") -> torch.Tensor:
    """The pair energy ``e`` as a function of the cosine ``c`` (elementwise, autograd-friendly).

    See the module docstring for the six kernels, the arccos clamp and the distance floor; ``variant``
    ``'opensphere_v0'``: see :data:`MHE_VARIANTS` (clamped cosine, kernels on θ itself).
    """
    power = normalize_power(power)
    if check_variant(variant) == "opensphere_v0":
        cc = c.clamp(-1.0 + OPENSPHERE_V0_CLAMP, 1.0 - OPENSPHERE_V0_CLAMP)
        if power in ("0", "1", "2"):
            d = 2.0 - 2.0 * cc
            return -torch.log(d) if power == "0" else (torch.rsqrt(d) if power == "1" else torch.reciprocal(d))
        theta = torch.acos(cc)
        if power == "a0":
            return -torch.log(theta)
        return torch.reciprocal(theta) if power == "a1" else torch.reciprocal(theta * theta)
    if power in ("0", "1", "2"):
        d = torch.clamp(2.0 - 2.0 * c, min=DIST_FLOOR)
        if power == "0":
            return -torch.log(d)
        if power == "1":
            return torch.rsqrt(d)
        return torch.reciprocal(d)
    t = _tf_acos(c) / math.pi + ANGLE_EPS
    if power == "a0":
        return -torch.log(t)
    if power == "a1":
        return torch.reciprocal(t)
    return torch.reciprocal(t * t)


def _kernel_and_slope(x: torch.Tensor, power: str, need_slope: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``e`` and ``de/dc`` for the blocked path, overwriting the scratch block ``x``.

    ``x`` holds the squared distance ``2 - 2c`` for the Euclidean kernels and the cosine ``c`` for the
    angular ones. The slope matches autograd through :func:`mhe_kernel` exactly, including where the
    floor and :func:`_tf_acos` substitute (torch.clamp passes the gradient inside the closed interval and
    zero outside; :func:`_tf_acos` gives zero at ``|c| >= 1``).
    """
    if power in ("0", "1", "2"):
        d = x
        clamped = need_slope and float(d.min()) < DIST_FLOOR
        outside = (d < DIST_FLOOR) if clamped else None
        d.clamp_(min=DIST_FLOOR)
        if power == "0":
            slope = torch.reciprocal(d).mul_(2.0) if need_slope else None  # d/dc -log(2-2c) = 2/(2-2c)
            val = d.log_().neg_()
        elif power == "1":
            val = d.rsqrt_()
            slope = val * val * val if need_slope else None  # d/dc (2-2c)^-1/2 = (2-2c)^-3/2
        else:
            val = d.reciprocal_()
            slope = torch.square(val).mul_(2.0) if need_slope else None  # d/dc (2-2c)^-1 = 2 (2-2c)^-2
    else:
        # as _tf_acos: arccos of c clamped to [-1, 1], slope 0 where |c| >= 1
        clamped = need_slope and (float(x.min()) <= -1.0 or float(x.max()) >= 1.0)
        outside = (x.abs() >= 1.0) if clamped else None
        cc = x.clamp_(-1.0, 1.0)  # the slope is infinite at |c| = 1 here and set to 0 at the end
        # dθ/dc = -1 / sqrt(1 - c^2);  t = θ/π + 1e-4;  dt/dc = -1 / (π sqrt(1 - c^2))
        neg_dt = torch.addcmul(torch.ones((), dtype=cc.dtype, device=cc.device), cc, cc, value=-1.0).rsqrt_().mul_(
            1.0 / math.pi
        ) if need_slope else None
        t = cc.acos_().mul_(1.0 / math.pi).add_(ANGLE_EPS)
        if power == "a0":
            slope = neg_dt.div_(t) if need_slope else None  # d/dc -log t = -dt/t
            val = t.log_().neg_()
        elif power == "a1":
            val = t.reciprocal_()  # 1/t
            slope = neg_dt.mul_(val).mul_(val) if need_slope else None  # d/dc t^-1 = -t^-2 dt
        else:
            inv = t.reciprocal_()
            slope = neg_dt.mul_(inv).mul_(inv).mul_(inv).mul_(2.0) if need_slope else None  # -2 t^-3 dt
            val = inv.mul_(inv)
    if outside is not None:
        slope.masked_fill_(outside, 0.0)
    return val, slope


def _default_block(n: int) -> int:
    return int(max(32, min(n, BLOCK_ENTRIES // max(n, 1))))


class _BlockedPairEnergy(torch.autograd.Function):
    """Mean kernel over the pairs ``i < j`` of the rows of ``w_hat``, in row blocks.

    Forward walks the upper triangle: rows ``[s, e)`` against columns ``[s, N)``, so each pair is
    visited once and only a ``block x N`` slab of cosines exists at any time. When a gradient is needed
    the forward also accumulates ``dE/dŵ`` (``N x d``, the size of the weight): for the slab's kernel
    slopes ``K'``, rows get ``K' ŵ_cols`` and columns get ``K'^T ŵ_rows``. Backward only scales it, so
    the whole thing costs about 1.5 ``N^2 d`` multiply-adds (dense autograd: 3) and ``O(block N)`` memory.
    """

    @staticmethod
    def forward(ctx, w_hat: torch.Tensor, power: str, block_size: int) -> torch.Tensor:
        n = w_hat.shape[0]
        need_grad = bool(ctx.needs_input_grad[0])
        euclidean = power in ("0", "1", "2")
        grad = torch.zeros_like(w_hat) if need_grad else None
        two = torch.full((), 2.0, dtype=w_hat.dtype, device=w_hat.device)
        total = torch.zeros((), dtype=torch.float64, device=w_hat.device)
        for s in range(0, n, block_size):
            e = min(s + block_size, n)
            b = e - s
            rows = w_hat[s:e]
            cols = w_hat[s:]
            # b x (N - s) slab; column jj is global index s + jj. The Euclidean kernels take 2 - 2c,
            # folded into the matrix product. Entries on and below the diagonal are not pairs i < j:
            # the diagonal (c_ii ~ 1) is set to the value of an orthogonal pair so that it does not
            # trip the clamps, and the whole lower part is zeroed after the kernel.
            if euclidean:
                x = torch.addmm(two, rows, cols.t(), alpha=-2.0)
                x[:, :b].diagonal().fill_(2.0)
            else:
                x = rows @ cols.t()
                x[:, :b].diagonal().fill_(0.0)
            val, slope = _kernel_and_slope(x, power, need_grad)
            val[:, :b].triu_(1)  # keep the pairs j > i only
            total += val.sum().double()
            if need_grad:
                slope[:, :b].triu_(1)
                grad[s:e].addmm_(slope, cols)
                grad[s:].addmm_(slope.t(), rows)
            del x, val, slope
        pairs = n * (n - 1) / 2.0
        if need_grad:
            grad.mul_(1.0 / pairs)
            ctx.save_for_backward(grad)
        return (total / pairs).to(w_hat.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None


def _dense_pair_energy(w_hat: torch.Tensor, power: str, variant: str = "mhe") -> torch.Tensor:
    """Mean kernel over ``i < j`` with the full ``N x N`` cosine matrix and plain autograd."""
    n = w_hat.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=w_hat.device)
    # the diagonal (c_ii ~ 1) is replaced before the kernel so that no inf enters the graph
    cos = (w_hat @ w_hat.t()).masked_fill(eye, 0.0)
    e = mhe_kernel(cos, power, variant).masked_fill(eye, 0.0)
    # the kernel is symmetric: the ordered off-diagonal sum counts each unordered pair twice
    return e.sum() / (n * (n - 1))


def mhe_energy(
    weight: torch.Tensor,
    power: Union[str, int] = "2",
    half_space: bool = False,
    block_size: Optional[int] = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Hyperspherical energy of one layer (SPEC section 5): mean of ``e(ŵ_i, ŵ_j)`` over pairs ``i < j``.

    Args:
        weight: any tensor whose dim 0 indexes neurons (``Linear``: ``out x in``; ``Conv``:
            ``out x in x kh x kw``); neurons are the rows of ``weight.reshape(N, -1)``.
        power: kernel, ``'0' '1' '2' 'a0' 'a1' 'a2'`` (or 0, 1, 2).
        half_space: use ``[W; -W]`` (2N neurons), the half-space MHE of the paper (hidden layers).
        block_size: compute in row blocks of this size with memory ``O(block * N)``. ``None``: dense up
            to 4096 neurons, blocked beyond that. Both give the same value and gradient.
        check_finite: raise on NaN/inf weights (the default). The check costs a host-device sync per
            call; a training loop that guards its loss for non-finite values can turn it off (the
            energy of a non-finite weight is then non-finite too, and the guard sees it).

    Returns:
        A 0-dim tensor with gradient with respect to ``weight``.
    """
    power = normalize_power(power)
    _check_weight(weight, check_finite=check_finite)
    w = weight.reshape(weight.shape[0], -1)
    if half_space:
        w = torch.cat([w, -w], dim=0)
    w_hat = normalize_rows(w)
    n = w_hat.shape[0]
    if block_size is None:
        if n <= DENSE_MAX_NEURONS:
            return _dense_pair_energy(w_hat, power)
        block_size = _default_block(n)
    block_size = int(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    return _BlockedPairEnergy.apply(w_hat, power, min(block_size, n))


def _check_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    labels = check_labels(labels, None, num_classes)
    if labels.numel() == 0:
        raise ValueError("labels is empty: classifier_mhe needs at least one sample")
    return labels


# ---------------------------------------------------------------- Caffe InterClass, type AMONG
# wy1iu/sphereface-plus, tools/caffe-sfplus/src/caffe/layers/inter_class_layer.cpp (CPU semantics; the
# .cu kernel differs, see the README's "Reproducing the released models"). With the classifier rows W
# (N of them, shared with the margin layer, which has made them unit just before) and the batch labels
# y (M samples, repeats counted):
#   Forward_cpu:  D = (1/N) sum_i sum_b |W_i - W_{y_b}|^2          (the layer's output, also logged)
#                 w_n = w_mean / sqrt(|w_mean|^2 + 1e-5),  w_mean = (1/N) sum_i W_i   (normalize: true)
#   Backward_cpu: diff[y_b] += -4 alpha / (M D^2 + 1e-5) * (W_{y_b} - w_n)   for every sample b;
#                 top_diff is not read, so alpha (alpha_start_value) is a layer parameter there.
# The functions below are pure in (rows, labels) and split into sums over rows and over samples, so a
# row-sharded classifier can all-reduce the two partial sums and the row sum and call them per block
# (labels NO_TARGET = -1 for samples whose class is in another block).
CAFFE_MEAN_EPS = 1e-5  # w_n = w_mean / sqrt(|w_mean|^2 + 1e-5)   (Forward_cpu, "normalize weight")
CAFFE_COEF_EPS = 1e-5  # -4 alpha / (M D^2 + 1e-5)                   (Backward_cpu)


def caffe_among_partial_sums(
    weight: torch.Tensor, labels: torch.Tensor, row_mean: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i |W_i - w_mean|^2, sum_b |W_{y_b} - w_mean|^2)`` over the given rows and the samples whose
    label is one of them (labels ``-1`` are skipped); ``row_mean`` is the mean of ALL the classifier's rows.

    These two sums give D without the ``N x M`` loop of the C++ (see :func:`caffe_among_distance_from_sums`):
    ``sum_i |W_i - W_y|^2 = sum_i |W_i - w_mean|^2 + N |W_y - w_mean|^2`` because the centred rows sum to 0.
    """
    centred = weight - row_mean
    spread = (centred * centred).sum()
    own = labels[labels >= 0]
    target = centred[own]
    return spread, (target * target).sum()


def caffe_among_distance_from_sums(
    spread_sum: torch.Tensor, target_sum: torch.Tensor, num_classes: int, num_samples: int
) -> torch.Tensor:
    """``D = (1/N) sum_i sum_b |W_i - W_{y_b}|^2 = M * spread_sum / N + target_sum`` (N classes, M samples)."""
    return spread_sum * (float(num_samples) / float(num_classes)) + target_sum


def caffe_among_distance(weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The Caffe AMONG layer's output ``D = (1/N) sum_i sum_b |W_i - W_{y_b}|^2`` (Forward_cpu), ``O((N + M) d)``.

    ``weight``: the ``N x d`` rows as given (no normalisation here; the Caffe margin layer has made them
    unit); ``labels``: ``M`` class indices, repeats counted. Plain autograd would give D's own gradient,
    which is NOT what the layer propagates: use :func:`classifier_mhe` with ``mode='caffe_among'``.
    """
    row_mean = weight.mean(dim=0)
    spread, target = caffe_among_partial_sums(weight, labels, row_mean)
    return caffe_among_distance_from_sums(spread, target, weight.shape[0], labels.numel())


def caffe_among_direction(row_mean: torch.Tensor) -> torch.Tensor:
    """``w_n = w_mean / sqrt(|w_mean|^2 + 1e-5)``: the normalised mean row the backward pushes away from."""
    return row_mean * torch.rsqrt((row_mean * row_mean).sum() + CAFFE_MEAN_EPS)


def caffe_among_diff(
    weight: torch.Tensor,
    labels: torch.Tensor,
    direction: torch.Tensor,
    distance: torch.Tensor,
    num_samples: Optional[int] = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """The Caffe AMONG weight diff (Backward_cpu) for the given rows: for every sample b whose label is one
    of them (``-1``: skipped), row ``y_b`` gets ``-4 alpha / (M D^2 + 1e-5) * (W_{y_b} - w_n)``.

    Rows of classes absent from the batch get exactly 0; a class seen k times gets k contributions.
    ``direction`` is :func:`caffe_among_direction` of the mean of ALL rows, ``distance`` the layer's D and
    ``num_samples`` M (default: ``labels.numel()``, the whole batch).
    """
    m = labels.numel() if num_samples is None else int(num_samples)
    coef = (-4.0 * alpha) / (m * distance * distance + CAFFE_COEF_EPS)
    own = labels[labels >= 0]
    diff = torch.zeros_like(weight)
    diff.index_add_(0, own, (weight[own] - direction) * coef)
    return diff


class _CaffeAmong(torch.autograd.Function):
    """D forward, the Caffe AMONG diff backward, scaled by the incoming gradient (see classifier_mhe)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, labels: torch.Tensor, replicas: int) -> torch.Tensor:
        groups = labels.reshape(replicas, -1)
        row_mean = weight.mean(dim=0)
        centred = weight - row_mean
        spread = (centred * centred).sum()
        distances = []
        for g in groups:
            target = centred[g]
            distances.append(caffe_among_distance_from_sums(spread, (target * target).sum(), weight.shape[0],
                                                            g.numel()))
        distances = torch.stack(distances)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(weight, groups, caffe_among_direction(row_mean), distances)
        return distances.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        weight, groups, direction, distances = ctx.saved_tensors
        replicas = groups.shape[0]
        diff = torch.zeros_like(weight)
        for g, dist in zip(groups, distances):
            # Caffe's NCCL all-reduce sums the GPUs' diffs and divides by the solver count
            diff += caffe_among_diff(weight, g, direction, dist, alpha=1.0 / replicas)
        # the incoming gradient plays Caffe's alpha (see classifier_mhe)
        return diff * grad_out, None, None


def classifier_mhe(
    weight: torch.Tensor,
    labels: Optional[torch.Tensor],
    power: Union[str, int] = "2",
    mode: str = "batch_vs_all",
    block_size: Optional[int] = None,
    check_finite: bool = True,
    replicas: int = 1,
    variant: str = "mhe",
) -> torch.Tensor:
    """The SphereFace+ MHE term on classifier weights ``C x d`` (SPEC section 5).

    Modes:
        ``batch_vs_all``: ``1/(B(C-1)) Σ_b Σ_{j≠y_b} e(ŵ_{y_b}, ŵ_j)``, cost ``O(B C d)`` (a class that
        appears several times in the batch counts several times, as in the formula).
        ``batch_unique``: mean pair energy among the distinct classes of the batch; a batch of a
        single class has no pair and gives 0.
        ``full``: exactly :func:`mhe_energy` of ``weight`` (full space), computed in row blocks of
        ``block_size`` (default about 4M entries per block) so memory is ``O(block C)``; ``labels`` is
        not used (pass ``None`` or the batch labels, which are then only validated).
        ``caffe_among``: the Caffe ``InterClass`` layer (type ``AMONG``) that trained the released
        SphereFace+ models (``inter_class_layer.cpp``, CPU forward and backward). The value is the layer's
        output ``D = (1/N) Σ_i Σ_b |W_i - W_{y_b}|²`` on the rows as given (no normalisation: the head
        keeps them unit, as Caffe's margin layer does before this layer; ``power`` is not used). Its
        backward is not D's gradient: it is the layer's diff, ``-4/(M D² + 1e-5) (W_{y_b} - w_n)`` added
        to row ``y_b`` for every sample b (``w_n`` the normalised mean row; classes absent from the batch
        get nothing, a class seen k times gets k terms), multiplied by the incoming gradient. The Caffe
        layer ignores its top_diff and takes alpha as a parameter; here alpha arrives as that incoming
        gradient, so ``(alpha * classifier_mhe(W, y, mode='caffe_among')).backward()`` gives exactly the
        Caffe diff for that alpha (the trainer's ``mhe.lambda_m`` is alpha; a loss scaler or gradient
        accumulation then scales it as it scales every other gradient). ``replicas`` > 1 splits the
        labels into that many equal consecutive groups, each one Caffe GPU's layer with its own D, and
        averages them (Caffe's multi-GPU all-reduce divides the summed diffs by the number of GPUs): the
        released recipe ran 2 GPUs x 256, and D, hence the diff, depends on the per-GPU batch.

    ``check_finite``: as in :func:`mhe_energy`. ``replicas``: only for ``caffe_among``. ``variant``:
    ``'mhe'`` (default, the MHE reference code's kernels) or ``'opensphere_v0'`` (OpenSphere_v0's
    SphereFace+: unit rows, cosine clamped at 1e-5, kernels on θ itself; batch modes only; see
    :data:`MHE_VARIANTS`, docs/theory.md#sphereface-plus-v0).

    Returns:
        A 0-dim tensor with gradient with respect to ``weight``.
    """
    power = normalize_power(power)
    if mode not in CLASSIFIER_MODES:
        raise ValueError(f"unknown classifier_mhe mode {mode!r}: choose one of {', '.join(CLASSIFIER_MODES)}")
    check_variant(variant, mode)
    _check_weight(weight, "classifier weight", check_finite)
    if weight.dim() != 2:
        raise ValueError(f"classifier weight must be C x d, got shape {tuple(weight.shape)}")
    num_classes = weight.shape[0]
    if mode == "full":
        if labels is not None:
            _check_labels(labels, num_classes)
        return mhe_energy(weight, power, half_space=False, block_size=block_size or _default_block(num_classes),
                          check_finite=check_finite)
    if labels is None:
        raise ValueError(f"classifier_mhe mode {mode!r} needs the batch labels")
    labels = _check_labels(labels, num_classes).to(weight.device)
    if replicas != 1 and mode != "caffe_among":
        raise ValueError(f"replicas={replicas!r} is only for mode 'caffe_among' (got mode {mode!r})")
    if mode == "caffe_among":
        if isinstance(replicas, bool) or int(replicas) != replicas or replicas < 1 or labels.numel() % int(replicas):
            raise ValueError(
                f"replicas must be a positive integer dividing the {labels.numel()} labels (one equal group per "
                f"Caffe GPU), got {replicas!r}"
            )
        return _CaffeAmong.apply(weight, labels, int(replicas))
    w_hat = variant_rows(weight, variant)
    if mode == "batch_unique":
        classes = torch.unique(labels)
        if classes.numel() < 2:
            return (w_hat[classes] * 0.0).sum()  # no pair: zero energy, still part of the graph
        return _dense_pair_energy(w_hat[classes], power, variant)
    # batch_vs_all
    bsz = labels.numel()
    cos = w_hat[labels] @ w_hat.t()  # B x C
    own = torch.zeros_like(cos, dtype=torch.bool)
    own[torch.arange(bsz, device=cos.device), labels] = True
    e = mhe_kernel(cos.masked_fill(own, 0.0), power, variant).masked_fill(own, 0.0)
    return e.sum() / (bsz * (num_classes - 1))


LayerPatterns = Optional[Union[str, Sequence[str]]]


def _as_patterns(p: LayerPatterns) -> Optional[List[str]]:
    if p is None:
        return None
    if isinstance(p, str):
        return [p]
    return list(p)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


class MHERegularizer:
    """MHE on the convolution and linear layers of a model (SPEC section 5, CIFAR experiments section 7).

    ``loss = hidden_coef * Σ_hidden E_layer + output_coef * E_output``. Hidden layers use half-space MHE
    when ``half_space=True``; the output layer is always full-space.

    Args:
        model: any ``nn.Module``; its ``Linear`` and ``Conv1d/2d/3d`` layers are the candidates, named
            as in ``model.named_modules()`` (e.g. ``features.conv1_1``, ``fc6``, ``score``).
        power: kernel (see :func:`mhe_energy`).
        half_space: half-space MHE on the hidden layers.
        hidden_coef, output_coef: weights of the two terms; ``None`` takes the SPEC table for ``power``
            (1 and 10 for 0/1/2/a0; 0.1 and 1 for a1/a2).
        include: shell-style patterns (``fnmatch``) of layer names to regularise; default all candidates.
        exclude: patterns of layer names to leave out (applied after ``include``).
        output_layers: patterns naming the output layer(s); default: the model's last conv/linear
            layer in module order (``score`` for ``cifar_cnn9``), if it is among the selected layers.
            Pass ``()`` for no output layer. (On a face backbone alone the last layer is the embedding
            ``fc5``, not a classifier: pass ``output_layers=()`` there and use :func:`classifier_mhe`
            on the head's weight.)
        check_finite: refuse NaN/inf weights (see :func:`mhe_energy`; off saves a sync per layer).

    Calling the regulariser returns ``(loss, values)``: the weighted sum (with gradient) and a dict
    ``layer name -> detached energy`` for logging. Layers with fewer than two neurons are skipped (with a
    warning): they have no pair.
    """

    def __init__(
        self,
        model: nn.Module,
        power: Union[str, int] = "0",
        half_space: bool = False,
        hidden_coef: Optional[float] = None,
        output_coef: Optional[float] = None,
        include: LayerPatterns = None,
        exclude: LayerPatterns = None,
        output_layers: LayerPatterns = None,
        check_finite: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"MHERegularizer needs an nn.Module, got {type(model).__name__}")
        self.power = normalize_power(power)
        self.half_space = bool(half_space)
        self.check_finite = bool(check_finite)
        default_hidden, default_output = DEFAULT_COEFFICIENTS[self.power]
        self.hidden_coef = float(default_hidden if hidden_coef is None else hidden_coef)
        self.output_coef = float(default_output if output_coef is None else output_coef)
        include_p, exclude_p = _as_patterns(include), _as_patterns(exclude) or []
        candidates = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and getattr(m, "weight", None) is not None
        ]
        selected = [
            (name, m)
            for name, m in candidates
            if (include_p is None or _matches(name, include_p)) and not _matches(name, exclude_p)
        ]
        if not selected:
            raise ValueError(
                f"MHERegularizer selected no layer (include={include_p}, exclude={exclude_p}); the model's "
                f"conv/linear layers are: {', '.join(n for n, _ in candidates) or '(none)'}"
            )
        usable = []
        for name, m in selected:
            if m.weight.shape[0] < 2:
                logger.warning("MHE skips layer %s: it has %d neuron(s), MHE needs at least 2", name, m.weight.shape[0])
            else:
                usable.append((name, m))
        if not usable:
            raise ValueError("MHERegularizer: every selected layer has fewer than 2 neurons")
        out_p = _as_patterns(output_layers)
        if out_p is None:
            # the model's output layer: its last conv/linear layer in module order, when it is selected
            out_names = {candidates[-1][0]} & {name for name, _ in usable}
        else:
            out_names = {name for name, _ in usable if _matches(name, out_p)}
            if out_p and not out_names:
                raise ValueError(
                    f"output_layers={out_p} matches none of the selected layers: {', '.join(n for n, _ in usable)}"
                )
        self.layers: List[Tuple[str, nn.Module, bool]] = [(name, m, name in out_names) for name, m in usable]
        logger.debug(
            "MHE power %s on %d hidden and %d output layers",
            self.power,
            sum(not o for *_, o in self.layers),
            sum(o for *_, o in self.layers),
        )

    @property
    def hidden_layers(self) -> List[str]:
        return [name for name, _, is_out in self.layers if not is_out]

    @property
    def output_layers(self) -> List[str]:
        return [name for name, _, is_out in self.layers if is_out]

    def __call__(self) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        values: Dict[str, torch.Tensor] = {}
        hidden_sum: Optional[torch.Tensor] = None
        output_sum: Optional[torch.Tensor] = None
        for name, module, is_out in self.layers:
            e = mhe_energy(module.weight, self.power, half_space=self.half_space and not is_out,
                           check_finite=self.check_finite)
            values[name] = e.detach()
            if is_out:
                output_sum = e if output_sum is None else output_sum + e
            else:
                hidden_sum = e if hidden_sum is None else hidden_sum + e
        loss = None
        if hidden_sum is not None:
            loss = self.hidden_coef * hidden_sum
        if output_sum is not None:
            loss = self.output_coef * output_sum if loss is None else loss + self.output_coef * output_sum
        return loss, values

    def __repr__(self) -> str:
        return (
            f"MHERegularizer(power={self.power!r}, half_space={self.half_space}, hidden_coef={self.hidden_coef}, "
            f"output_coef={self.output_coef}, hidden={self.hidden_layers}, output={self.output_layers})"
        )
