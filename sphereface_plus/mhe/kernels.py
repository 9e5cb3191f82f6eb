"""The MHE pair kernels: the energy ``e`` of two neurons as a function of their cosine.

Liu et al., "Learning towards Minimum Hyperspherical Energy", NeurIPS 2018, Eq. (1) and its angular
variants; the formulas are collected in ``docs/theory.md#mhe-kernels``. Neurons are first projected
towards the unit sphere, ``ŵ = w / sqrt(|w|^2 + 1e-4)`` (:func:`normalize_rows`), and the kernels
(``power``) act on ``c_ij = ŵ_i · ŵ_j``:

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

Two forms of the same kernels: :func:`mhe_kernel` (elementwise, for autograd) and
:func:`_kernel_and_slope` (value and ``de/dc`` in place on a scratch block, for the blocked energies of
:mod:`sphereface_plus.mhe.energy` and :mod:`sphereface_plus.parallel.mhe`); both give the same value and
slope.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

__all__ = ["POWERS", "normalize_power", "normalize_rows", "mhe_kernel"]

POWERS = ("0", "1", "2", "a0", "a1", "a2")

NORM_EPS = 1e-4  # ŵ = w / sqrt(|w|^2 + 1e-4)
ANGLE_EPS = 1e-4  # θ/π + 1e-4
# Deliberate deviation: the squared distance 2 - 2c is floored at 1e-6 for the Euclidean kernels. The
# reference code has no floor. Thanks to the 1e-4 in the normalisation, two rows pointing the same way
# are still 2e-4 / (|w|^2 + 1e-4) apart, so the floor only acts on identical rows of norm above ~14
# (and on float32 round-off), where the exact energy would be infinite/NaN and wreck training.
DIST_FLOOR = 1e-6


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



def normalize_rows(weight: torch.Tensor) -> torch.Tensor:
    """``ŵ_i = w_i / sqrt(|w_i|^2 + 1e-4)`` for the rows of ``weight.reshape(N, -1)``.

    The 1e-4 (the reference code's) keeps the map smooth at ``w = 0``; ŵ is therefore slightly shorter
    than unit length (``docs/theory.md#mhe-kernels``).
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


# How the kernels read the rows (``variant``; docs/theory.md#sphereface-plus-v0):
#   "mhe" (default): the MHE paper's reference code, as above.
#   "opensphere_v0": OpenSphere_v0's SphereFacePlus head (model/head/spherefaceplus.py): unit rows w / |w|
#     (the head keeps them unit in place, so the gradient is the plain one: w / stop_gradient(|w|)), the
#     cosine clamped to [-1 + 1e-5, 1 - 1e-5], and the angular kernels on theta itself (a2: theta^-2, a1:
#     theta^-1, a0: -log theta); the Euclidean kernels on 2 - 2c of the clamped c. Modes batch_unique and
#     batch_vs_all.
MHE_VARIANTS = ("mhe", "opensphere_v0")
OPENSPHERE_V0_CLAMP = 1e-5


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
    ``'opensphere_v0'``: see :data:`MHE_VARIANTS` (clamped cosine, kernels on theta itself).
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

