"""The hyperspherical energy of one layer: the mean pair kernel over its neurons, dense or in row blocks.

:func:`mhe_energy` projects the neurons (the rows of ``weight.reshape(N, -1)``) towards the unit sphere
and averages the kernel ``e(ŵ_i, ŵ_j)`` of :mod:`sphereface_plus.mhe.kernels` over the unordered pairs
``i < j``: the hyperspherical energy of Liu et al., "Learning towards Minimum Hyperspherical Energy"
(NeurIPS 2018) divided by the number of pairs, optionally on the half-space neurons ``[W; -W]``
(``docs/theory.md#mhe-kernels``).
Up to ``DENSE_MAX_NEURONS`` neurons it builds the ``N x N`` cosine matrix and lets autograd
differentiate; beyond that (or when a ``block_size`` is given) ``_BlockedPairEnergy`` walks the
upper triangle in row blocks with memory ``O(block * N)``, never ``O(N^2)``, and the same value and
gradient.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from sphereface_plus.mhe.kernels import _kernel_and_slope, mhe_kernel, normalize_power, normalize_rows

__all__ = ["mhe_energy"]

# mhe_energy switches from the dense N x N form to the blocked one above this many neurons.
DENSE_MAX_NEURONS = 4096
# default block: about 4M kernel entries (16 MB in float32) per temporary.
BLOCK_ENTRIES = 1 << 22


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
    """Hyperspherical energy of one layer: mean of ``e(ŵ_i, ŵ_j)`` over pairs ``i < j``.

    The kernels and the half-space form: ``docs/theory.md#mhe-kernels``.

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

