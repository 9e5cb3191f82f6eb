"""Compressive MHE (CoMHE): the hyperspherical energy of a layer's neurons after a linear projection to a
low dimension (Lin et al., "Regularizing Neural Networks via Minimizing Hyperspherical Energy", CVPR 2020).

Pure functions of one layer's neurons (the rows of ``weight.reshape(N, -1)``, ``D`` entries each) and
explicit projection matrices, so that anyone can feed the same draws as the authors' TensorFlow code
(rmlin/CoMHE, ``*/architecture.py``: ``_add_thomson_project``); ``docs/theory.md#comhe``:

- :func:`comhe_rp_energy`: random projections, ``pn`` Gaussian matrices ``P_k`` (``pd x D``):
  ``E = (1/pn) Σ_k E_mhe(W P_kᵀ)``, the energy of :func:`~sphereface_plus.mhe.energy.mhe_energy` (eps
  1e-4 applied to the projected rows, mean over the pairs, optional half-space ``[WPᵀ; -WPᵀ]``).
- :func:`angle_preserving_loss` and :func:`adversarial_energy`: the inner objectives of the learned
  projections: ``‖cos(WPᵀ) - cos(W)‖_F`` (whole ``N x N`` cosine matrices, diagonals included) which AP's
  ``P`` minimises, and the full-space energy ``E_mhe(WPᵀ)`` which AD's ``P`` maximises.
- :func:`lookahead_projection` and :func:`comhe_learned_energy`: the network's term of AP and AD. The
  authors' graph does not use ``P`` itself but one more gradient step of its inner objective taken inside
  the graph, ``P' = P - lr ∇_P L_AP`` (AP) or ``P' = P + lr ∇_P E_AD`` (AD), at the network's learning rate,
  and the network's gradient flows through that step too (a second-order term: ``∇_P`` depends on ``W``).

``P`` acts on PyTorch's flattening of a neuron (``in x kh x kw`` for a convolution); TensorFlow's
``kh x kw x in`` order is a permutation of the columns of ``P``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from sphereface_plus.mhe.energy import BLOCK_ENTRIES, _check_weight
from sphereface_plus.mhe.kernels import _kernel_and_slope, mhe_kernel, normalize_power, normalize_rows
from sphereface_plus.mhe.objectives import PROJECTION_WEIGHT_DECAY

__all__ = ["LEARNED_KINDS", "random_projections", "project_rows", "comhe_rp_energy", "angle_preserving_loss",
           "adversarial_energy", "inner_objective", "projection_step", "lookahead_projection", "comhe_learned_energy"]

#: the two learned projections: angle-preserving (rmlin/CoMHE angle_projection/) and adversarial
#: (adversarial_projection/)
LEARNED_KINDS = ("angle", "adversarial")


def random_projections(count: int, dim: int, in_dim: int, generator: Optional[torch.Generator] = None,
                       device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``count`` matrices ``dim x in_dim`` of independent N(0, 1) entries (``tf.random_normal``, stddev 1)."""
    return torch.randn((int(count), int(dim), int(in_dim)), generator=generator, device=device, dtype=dtype)


def _as_stack(projections: torch.Tensor, in_dim: int) -> torch.Tensor:
    if not isinstance(projections, torch.Tensor) or projections.dim() not in (2, 3):
        raise ValueError("projections must be a tensor pd x D (one projection) or pn x pd x D")
    p = projections.unsqueeze(0) if projections.dim() == 2 else projections
    if p.shape[-1] != in_dim or p.shape[0] < 1 or p.shape[1] < 1:
        raise ValueError(f"projections of shape {tuple(projections.shape)} do not fit neurons of {in_dim} entries "
                         f"(expected [pn x] pd x {in_dim})")
    return p


def project_rows(weight: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """The projected neurons ``W P_kᵀ``, shape ``pn x N x pd`` (``projections``: ``[pn x] pd x D``)."""
    w = weight.reshape(weight.shape[0], -1)
    p = _as_stack(projections, w.shape[1]).to(w.dtype)
    return torch.matmul(w.unsqueeze(0), p.transpose(1, 2))


def _dense_pair_energy(x: torch.Tensor, power: str) -> torch.Tensor:
    """Mean kernel over the pairs ``i < j`` of the rows of ``x[k]`` (``k x M x d``, not yet normalised) with
    the whole ``M x M`` matrices and plain autograd, so that it can be differentiated twice: the adversarial
    projection's inner objective, whose gradient enters the network's term (:func:`lookahead_projection`)."""
    m = x.shape[1]
    w_hat = normalize_rows(x.reshape(-1, x.shape[-1])).reshape(x.shape)
    eye = torch.eye(m, dtype=torch.bool, device=x.device)
    cos = torch.matmul(w_hat, w_hat.transpose(1, 2)).masked_fill(eye, 0.0)
    e = mhe_kernel(cos, power).masked_fill(eye, 0.0)
    return (e.sum(dim=(1, 2)) / (m * (m - 1))).mean()


class _ProjectedPairEnergy(torch.autograd.Function):
    """Mean over ``k`` of the pair energy of the rows of ``w_hat[k]`` (``k x N x d``, already normalised), full
    or half space, in row blocks: value and ``dE/dŵ`` in one pass, memory ``O(k · block · N)``.

    Half space is computed from the ``N x N`` products alone: ``[ŵ; -ŵ]`` has the cosines ``G`` (pairs
    ``(w_i, w_j)`` and ``(-w_i, -w_j)``, ``i < j``, each twice) and ``-G`` (pairs ``(w_i, -w_j)``, every ordered
    ``(i, j)`` including ``i = j``): the same sum as the ``2N x 2N`` matrix, for a quarter of its products
    and half of its kernel evaluations. Row block ``[s, e)`` against all columns; the kernel and its slope
    are :func:`~sphereface_plus.mhe.kernels._kernel_and_slope`'s (in place), as in ``mhe_energy``'s blocked form.
    """

    @staticmethod
    def forward(ctx, w_hat: torch.Tensor, power: str, half_space: bool) -> torch.Tensor:
        k, n, _ = w_hat.shape
        need_grad = bool(ctx.needs_input_grad[0])
        euclidean = power in ("0", "1", "2")
        block = int(min(n, max(32, BLOCK_ENTRIES // max(k * n, 1))))  # as mhe_energy's row blocks
        grad = torch.zeros_like(w_hat) if need_grad else None
        total = torch.zeros((), dtype=torch.float64, device=w_hat.device)
        cols = torch.arange(n, device=w_hat.device)
        mult = 2.0 if half_space else 1.0
        for s in range(0, n, block):
            e = min(s + block, n)
            g = torch.matmul(w_hat[:, s:e], w_hat.transpose(1, 2))  # k x b x N
            upper = cols.unsqueeze(0) > torch.arange(s, e, device=w_hat.device).unsqueeze(1)  # pairs i < j
            # entries j <= i are not pairs: given a harmless value (an orthogonal pair) and zeroed after
            x = (2.0 - 2.0 * g) if euclidean else g.clone()
            x.masked_fill_(~upper, 2.0 if euclidean else 0.0)
            val, slope = _kernel_and_slope(x, power, need_grad)
            total += mult * val.masked_fill_(~upper, 0.0).sum().double()
            a = slope.masked_fill_(~upper, 0.0).mul_(mult) if need_grad else None  # dE/dG of the pairs i < j
            if half_space:
                x = (2.0 + 2.0 * g) if euclidean else -g  # cosine -G_ij of (w_i, -w_j)
                val, slope = _kernel_and_slope(x, power, need_grad)
                total += val.sum().double()
                if need_grad:
                    a.sub_(slope)  # d/dG of e(-G) is -e'(-G)
            if need_grad:
                grad[:, s:e] += torch.matmul(a, w_hat)
                grad += torch.matmul(a.transpose(1, 2), w_hat[:, s:e])
            del g, x, val, slope, a
        m = 2 * n if half_space else n
        scale = 1.0 / (k * m * (m - 1) / 2.0)
        if need_grad:
            ctx.save_for_backward(grad.mul_(scale))
        return (total * scale).to(w_hat.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None


def _projected_energy(x: torch.Tensor, power: str, half_space: bool) -> torch.Tensor:
    """Mean over ``k`` of the MHE energy of the rows of ``x[k]`` (``k x N x pd``), eps 1e-4 after projecting.

    The projections go through :class:`_ProjectedPairEnergy` together while their ``N x N`` products fit
    in about 4M entries, in groups beyond (one at a time for ``N`` above 2048).
    """
    k, n = x.shape[0], x.shape[1]
    w_hat = normalize_rows(x.reshape(-1, x.shape[-1])).reshape(x.shape)
    group = int(max(1, min(k, BLOCK_ENTRIES // (n * n))))
    parts = [_ProjectedPairEnergy.apply(w_hat[i:i + group], power, bool(half_space)) * min(group, k - i)
             for i in range(0, k, group)]
    return parts[0] / k if len(parts) == 1 else torch.stack(parts).sum() / k


def comhe_rp_energy(weight: torch.Tensor, projections: torch.Tensor, power: Union[str, int] = "2",
                    half_space: bool = False, check_finite: bool = True) -> torch.Tensor:
    """CoMHE with given projections: ``(1/pn) Σ_k E_mhe(W P_kᵀ)`` (``docs/theory.md#comhe``).

    rmlin/CoMHE ``random_projection/architecture.py``, ``_add_thomson_project``: each projection's
    energy is the MHE energy of the projected neurons (normalised with the 1e-4 after projecting, mean
    over the pairs, half-space on ``[WPᵀ; -WPᵀ]``), and the layer's term is their mean. The authors use
    power 2 (``(2 - 2c)^-1``); every kernel of :data:`~sphereface_plus.mhe.kernels.POWERS` is accepted.

    Args:
        weight: one layer's weight, neurons along dim 0 (``Linear``: ``out x in``, ``Conv``: ``out x in x
            kh x kw``).
        projections: ``pd x D`` or ``pn x pd x D`` (``D = weight[0].numel()`` in PyTorch's flattening).
        power: the kernel; half_space: ``[W; -W]`` (hidden layers in the authors' recipe).
        check_finite: as in :func:`~sphereface_plus.mhe.energy.mhe_energy`.
    """
    power = normalize_power(power)
    _check_weight(weight, check_finite=check_finite)
    return _projected_energy(project_rows(weight, projections), power, half_space)


def _cosines(x: torch.Tensor) -> torch.Tensor:
    """The whole ``N x N`` matrix ``x_i·x_j / (sqrt(|x_i|²+1e-4) sqrt(|x_j|²+1e-4))`` (the authors' ``cal``)."""
    u = normalize_rows(x)
    return u @ u.t()


def angle_preserving_loss(weight: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """AP's inner objective ``‖cos(WPᵀ) - cos(W)‖_F`` over the whole ``N x N`` matrices (diagonals included).

    rmlin/CoMHE ``angle_projection/architecture.py``: ``p_loss = tf.norm(new_cos - ori_cos)``, minimised
    over ``P`` (``projection``, ``pd x D``).
    """
    w = weight.reshape(weight.shape[0], -1)
    p = _as_stack(projection, w.shape[1])
    if p.shape[0] != 1:
        raise ValueError(f"the angle-preserving loss takes one projection pd x D, got {tuple(projection.shape)}")
    return torch.linalg.vector_norm(_cosines(w @ p[0].to(w.dtype).t()) - _cosines(w))


def adversarial_energy(weight: torch.Tensor, projection: torch.Tensor, power: Union[str, int] = "2") -> torch.Tensor:
    """AD's inner objective: the full-space energy ``E_mhe(WPᵀ)``, maximised over ``P``.

    rmlin/CoMHE ``adversarial_projection/architecture.py``, ``_stat``: power 2, mean over the pairs, no
    half-space (the network's term then uses half-space).
    """
    w = weight.reshape(weight.shape[0], -1)
    p = _as_stack(projection, w.shape[1])
    if p.shape[0] != 1:
        raise ValueError(f"the adversarial energy takes one projection pd x D, got {tuple(projection.shape)}")
    return _dense_pair_energy(project_rows(w, p), normalize_power(power))


def _check_kind(kind: str) -> str:
    if kind not in LEARNED_KINDS:
        raise ValueError(f"unknown learned projection {kind!r}: choose one of {', '.join(LEARNED_KINDS)}")
    return kind


def inner_objective(weight: torch.Tensor, projection: torch.Tensor, kind: str, power: Union[str, int] = "2") -> torch.Tensor:
    """What the inner optimiser of ``kind`` minimises, before weight decay: the AP loss, or minus the AD energy."""
    if _check_kind(kind) == "angle":
        return angle_preserving_loss(weight, projection)
    return -adversarial_energy(weight, projection, power)


def projection_step(weight: torch.Tensor, projection: torch.Tensor, lr: float, kind: str, power: Union[str, int] = "2",
                    weight_decay: float = PROJECTION_WEIGHT_DECAY) -> torch.Tensor:
    """One step of the projection's own optimiser on fixed ``weight``: ``P - lr (∇_P L + weight_decay P)``.

    rmlin/CoMHE ``*/train.py``: ``GradientDescentOptimizer(lr_)`` on ``p_loss + 1e-3 * l2_regularizer(5e-4)``
    (AP), resp. ``-filt_mhe + ...`` (AD), i.e. ``L`` = :func:`inner_objective` and a decay gradient of
    ``1e-3 * 5e-4 * P``; ``lr`` is the network's learning rate. Returns the new projection (no gradient).
    """
    w = weight.detach()
    p = projection.detach().to(w.dtype)
    with torch.enable_grad():
        leaf = p.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(inner_objective(w, leaf, kind, power), leaf)
    return p - float(lr) * (g + weight_decay * p)


def lookahead_projection(weight: torch.Tensor, projection: torch.Tensor, lr: float, kind: str,
                         power: Union[str, int] = "2") -> torch.Tensor:
    """``P' = P - lr ∇_P L_AP(P, W)`` (``kind='angle'``) or ``P + lr ∇_P E_AD(P, W)`` (``'adversarial'``).

    The step the authors' graph takes inside the network's loss (``p = p - lr * tf.gradients(p_loss, p)``,
    resp. ``+``), without weight decay. ``P'`` is differentiable with respect to ``weight`` (the gradient
    of the inner objective is built with ``create_graph``), not with respect to ``projection``.
    """
    _check_kind(kind)
    outer_grad = torch.is_grad_enabled() and weight.requires_grad
    with torch.enable_grad():
        p = projection.detach().to(weight.dtype).requires_grad_(True)
        (g,) = torch.autograd.grad(inner_objective(weight, p, kind, power), p, create_graph=outer_grad)
    # inner_objective is -E_AD for 'adversarial', so one descent step on it is the authors' ascent step
    return projection.detach().to(weight.dtype) - float(lr) * g


def comhe_learned_energy(weight: torch.Tensor, projection: torch.Tensor, lr: float, kind: str,
                         power: Union[str, int] = "2", half_space: bool = False,
                         check_finite: bool = True) -> torch.Tensor:
    """The network's CoMHE-AP / CoMHE-AD term: ``E_mhe(W P'ᵀ)`` with ``P'`` of :func:`lookahead_projection`.

    rmlin/CoMHE ``angle_projection/`` and ``adversarial_projection/architecture.py``,
    ``_add_thomson_project``; ``lr`` is the network's learning rate of the update (the authors' ``lr_``).
    """
    power = normalize_power(power)
    _check_weight(weight, check_finite=check_finite)
    p_next = lookahead_projection(weight, projection, lr, kind, power)
    return _projected_energy(project_rows(weight, p_next), power, half_space)
