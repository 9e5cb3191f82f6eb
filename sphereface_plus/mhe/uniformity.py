"""Hyperspherical uniformity objectives of one layer's neurons (Liu et al., "Learning with Hyperspherical
Uniformity", AISTATS 2021), as pure functions; ``docs/theory.md#uniformity``.

Each follows the authors' TensorFlow graph (wy1iu/Sphere-Uniformity, ``<name>/architecture.py``,
``_add_thomson_first`` for hidden layers, ``_add_thomson_final`` for the output layer) and returns the
layer's term *before* its coefficient, with the authors' sign:

- :func:`mhs_energy` (``mhs/``): ``-Σ_{(i,j) ∈ T} d²_ij``, ``T`` the pairs at the minimum squared distance
  (all of them: ties count, as the code's ``tf.equal`` mask does).
- :func:`mhp_energy` (``mhp/``): ``(1/M) Σ_i (2 - 2 cos(v, w_i))^-1`` for a pole ``v``; the poles minimise
  it and the network maximises it.
- :func:`r_mhp_energy` (``r_mhp/``): ``‖Σ_i w_i‖`` on the raw weights.
- :func:`mhc_energy` (``mhc/``): ``-(1/γ) log((1/M) Σ_i exp(-γ (2 - 2 cos(v, w_i))))``, a soft minimum of
  the squared distances from a pole ``v``; the poles maximise it and the network minimises it.
- :func:`mgd_energy` (``mgd/``): ``-log det(exp(-(2 - 2C)) + 1e-6 I)``, ``C`` the neurons' cosines.

Normalisation, as the code does it: the neurons are normalised twice, ``u = n(n(w))`` with
``n(x) = x / sqrt(|x|² + 1e-4)`` (``self.norm`` and then ``self.cal``), and a pole once,
``v̂ = v / sqrt(|v|² + 1e-4)``; cosines are ``u_i·u_j`` and ``v̂·u_i``. Half-space: ``[W; -W]`` (``M = 2N``)
before normalising; R-MHP has no half-space form (the sum of ``[W; -W]`` is 0).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from sphereface_plus.mhe.energy import _check_weight, _default_block
from sphereface_plus.mhe.kernels import NORM_EPS, normalize_rows
from sphereface_plus.mhe.objectives import POLE_MOMENTUM, POLE_WEIGHT_DECAY

__all__ = ["MGD_JITTER", "MGD_DENSE_MAX", "uniform_rows", "unit_pole", "mhs_energy", "mhp_energy", "r_mhp_energy",
           "mhc_energy", "mgd_energy", "pole_step"]

MGD_JITTER = 1e-6  # tf.diag([1e-6] * n) added to the kernel matrix before its log-determinant
# mgd_energy builds the M x M kernel matrix and factors it (O(M^2) memory, O(M^3) time); above this many
# neurons it refuses rather than allocate gigabytes (the classifier term offers the batch form instead)
MGD_DENSE_MAX = 8192


def uniform_rows(weight: torch.Tensor, half_space: bool = False) -> torch.Tensor:
    """``u = n(n(w))`` for the rows of ``weight.reshape(N, -1)`` (``[W; -W]`` first with ``half_space``)."""
    w = weight.reshape(weight.shape[0], -1)
    if half_space:
        w = torch.cat([w, -w], dim=0)
    return normalize_rows(normalize_rows(w))


def unit_pole(pole: torch.Tensor, dim: int) -> torch.Tensor:
    """``v / sqrt(|v|² + 1e-4)`` as a vector of ``dim`` entries (``pole``: ``dim`` or ``1 x dim``)."""
    if not isinstance(pole, torch.Tensor) or pole.numel() != dim or (pole.dim() == 2 and pole.shape[0] != 1) \
            or pole.dim() > 2:
        shape = tuple(pole.shape) if isinstance(pole, torch.Tensor) else type(pole).__name__
        raise ValueError(f"a pole must be a vector of {dim} entries (or 1 x {dim}), the size of a neuron; got {shape}")
    v = pole.reshape(-1)
    return v * torch.rsqrt((v * v).sum() + NORM_EPS)


# ----------------------------------------------------------------------------------------------------- MHS


def _mhs_ties(u: torch.Tensor, half_space: bool, block: int) -> Tuple[List[Tuple[int, int, int]], float]:
    """The pairs at the minimum squared distance, as ``(i, j, sign)`` with multiplicity folded in.

    Works on the upper triangle of ``G = u uᵀ`` (each entry computed once, so mathematically equal
    entries are equal in floating point, as in the authors' symmetric ``filtᵀ filt``): ``d = 2 - 2 G_ij``
    (``i < j``; in half-space also the pair ``(-w_i, -w_j)``: multiplicity 2) and, in half-space,
    ``d = 2 + 2 G_ij`` for ``(w_i, -w_j)`` (``i <= j``; multiplicity 2 for ``i < j``: ``(w_j, -w_i)`` too).
    Exact zeros are skipped, as the code's ``tf.not_equal(x, 0)`` does. Returns the ties as a list of
    ``(i, j, s)`` with ``s = +1`` for ``2 - 2G`` and ``-1`` for ``2 + 2G``, each repeated by its multiplicity,
    and the minimum.
    """
    n = u.shape[0]
    best = math.inf
    ties: List[Tuple[int, int, int]] = []
    with torch.no_grad():
        for s in range(0, n, block):
            e = min(s + block, n)
            g = u[s:e] @ u[s:].t()  # rows s..e against columns s..n: the upper part
            rows = torch.arange(s, e, device=u.device).unsqueeze(1)
            cols = torch.arange(s, n, device=u.device).unsqueeze(0)
            for sign in ((1, -1) if half_space else (1,)):
                d = 2.0 - 2.0 * g if sign == 1 else 2.0 - 2.0 * (-g)
                keep = (cols > rows) if sign == 1 else (cols >= rows)
                d = d.masked_fill(~keep | (d == 0), math.inf)
                m = float(d.min()) if d.numel() else math.inf
                if m > best or m == math.inf:
                    continue
                idx = (d == m).nonzero().tolist()
                found = [(s + a, s + b, sign) for a, b in idx]
                if m < best:
                    best, ties = m, []
                for i, j, sg in found:
                    mult = 2 if half_space and (sg == 1 or i != j) else 1
                    ties.extend([(i, j, sg)] * mult)
    return ties, best


def mhs_energy(weight: torch.Tensor, half_space: bool = False, block_size: Optional[int] = None,
               check_finite: bool = True) -> torch.Tensor:
    """MHS: ``-Σ_{(i,j) ∈ T} ‖u_i - u_j‖²`` over the pairs ``T`` at the minimum distance (``docs/theory.md#mhs``).

    wy1iu/Sphere-Uniformity ``mhs/architecture.py``: ``final = 2 - 2 cal(norm(filt))`` on the strict upper
    triangle, ``target`` its smallest non-zero entry, ``loss = -Σ final[final == target]``; the gradient
    reaches only the neurons of the tied pairs. The minimum is found in row blocks of ``block_size``
    (default about 4M entries), memory ``O(block N)``; only the tied pairs are recomputed with gradient.
    """
    _check_weight(weight, check_finite=check_finite)
    u = uniform_rows(weight, False)
    n = u.shape[0]
    block = _default_block(n) if block_size is None else int(block_size)
    if block < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    ties, _ = _mhs_ties(u, bool(half_space), block)
    if not ties:  # every pair at distance exactly 0: the code's argmin has nothing to pick
        return (u * 0.0).sum()
    idx = torch.tensor(ties, device=u.device)
    dots = (u[idx[:, 0]] * u[idx[:, 1]]).sum(dim=1)
    d = 2.0 - 2.0 * (idx[:, 2].to(u.dtype) * dots)
    return -d.sum()


# ------------------------------------------------------------------------------------------ poles: MHP, MHC


def _pole_cosines(weight: torch.Tensor, pole: torch.Tensor, half_space: bool) -> torch.Tensor:
    w = weight.reshape(weight.shape[0], -1)
    c = normalize_rows(normalize_rows(w)) @ unit_pole(pole, w.shape[1]).to(w.dtype)
    return torch.cat([c, -c]) if half_space else c


def mhp_energy(weight: torch.Tensor, pole: torch.Tensor, half_space: bool = False,
               check_finite: bool = True) -> torch.Tensor:
    """MHP's polarisation energy of a pole: ``(1/M) Σ_i (2 - 2 v̂·u_i)^-1`` (``docs/theory.md#mhp``).

    wy1iu/Sphere-Uniformity ``mhp/architecture.py``: ``sum(pow(2 - 2 cal(norm(filt), v), -1)) / n_filt``.
    In ``mhp/train.py`` the poles minimise it (with their own optimiser) and the network maximises it.
    """
    _check_weight(weight, check_finite=check_finite)
    return torch.reciprocal(2.0 - 2.0 * _pole_cosines(weight, pole, half_space)).mean()


def mhc_energy(weight: torch.Tensor, pole: torch.Tensor, half_space: bool = False, gamma: float = 10.0,
               check_finite: bool = True) -> torch.Tensor:
    """MHC: ``-(1/γ) log((1/M) Σ_i exp(-γ ‖v̂ - u_i‖²))`` (``docs/theory.md#mhc``).

    wy1iu/Sphere-Uniformity ``mhc/architecture.py`` (γ = 10): a soft minimum of the squared distances
    from the pole to the neurons. In ``mhc/train.py`` the poles maximise it and the network minimises it.
    Computed as ``-(logsumexp(-γ d²) - log M) / γ``, the same value without the underflow of ``exp``.
    """
    _check_weight(weight, check_finite=check_finite)
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    d = 2.0 - 2.0 * _pole_cosines(weight, pole, half_space)
    return -(torch.logsumexp(-gamma * d, dim=0) - math.log(d.numel())) / gamma


def pole_step(weight: torch.Tensor, pole: torch.Tensor, momentum: Optional[torch.Tensor], lr: float, objective: str,
              coefficient: float = 1.0, half_space: bool = False, gamma: float = 10.0,
              weight_decay: float = POLE_WEIGHT_DECAY, momentum_factor: float = POLE_MOMENTUM
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step of a pole's own optimiser on fixed ``weight``; returns ``(pole, momentum)``.

    wy1iu/Sphere-Uniformity ``mhp/train.py`` / ``mhc/train.py``: ``MomentumOptimizer(lr_, 0.9)`` on the poles'
    loss ``coefficient * E`` (MHP: the poles minimise the energy) or ``-coefficient * E`` (MHC: they maximise
    the covering term), plus ``l2_regularizer(5e-4)(v)``: ``a = 0.9 a + g; v = v - lr a`` (``momentum`` None
    at the first step: ``a`` starts at 0). ``lr`` is the network's learning rate.
    """
    if objective not in ("mhp", "mhc"):
        raise ValueError(f"pole_step is for the objectives mhp and mhc, not {objective!r}")
    w = weight.detach()
    v = pole.detach().to(w.dtype)
    sign = 1.0 if objective == "mhp" else -1.0
    with torch.enable_grad():
        leaf = v.clone().requires_grad_(True)
        e = mhp_energy(w, leaf, half_space, check_finite=False) if objective == "mhp" else \
            mhc_energy(w, leaf, half_space, gamma, check_finite=False)
        (g,) = torch.autograd.grad(sign * float(coefficient) * e, leaf)
    g = g + weight_decay * v
    buf = g if momentum is None else momentum.to(g) * momentum_factor + g
    return v - float(lr) * buf, buf


# ------------------------------------------------------------------------------------------- R-MHP and MGD


def r_mhp_energy(weight: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
    """Relaxed MHP: ``‖Σ_i w_i‖`` of the raw neurons (``docs/theory.md#r-mhp``).

    wy1iu/Sphere-Uniformity ``r_mhp/architecture.py``: ``tf.norm(tf.reduce_sum(filt, axis=1))``, no
    normalisation, no half-space.
    """
    _check_weight(weight, check_finite=check_finite)
    return torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1).sum(dim=0))


def mgd_energy(weight: torch.Tensor, half_space: bool = False, check_finite: bool = True) -> torch.Tensor:
    """MGD: ``-log det(exp(-(2 - 2C)) + 1e-6 I)``, ``C_ij = u_i·u_j`` (``docs/theory.md#mgd``).

    wy1iu/Sphere-Uniformity ``mgd/architecture.py`` (``tf.linalg.logdet``, a Cholesky factorisation).
    Deliberate deviation: the kernel matrix is factored in float64 whatever the weight's dtype. The
    matrix is positive definite in exact arithmetic, but with nearly parallel neurons its smallest
    eigenvalues approach the 1e-6 jitter, which float32 Cholesky cannot resolve; the value and gradient
    are the formula's, rounded once back to the weight's dtype.
    """
    _check_weight(weight, check_finite=check_finite)
    u = uniform_rows(weight, half_space)
    m = u.shape[0]
    if m > MGD_DENSE_MAX:
        raise ValueError(f"MGD factors an {m} x {m} kernel matrix; above {MGD_DENSE_MAX} neurons it is refused "
                         f"(memory O(M^2), time O(M^3)); on a classifier use mode batch_unique")
    u64 = u.double()
    k = torch.exp(-(2.0 - 2.0 * (u64 @ u64.t())))
    k = k + MGD_JITTER * torch.eye(m, dtype=k.dtype, device=k.device)
    chol = torch.linalg.cholesky(k)
    return (-2.0 * torch.log(torch.diagonal(chol)).sum()).to(weight.dtype)
