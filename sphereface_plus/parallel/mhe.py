"""SphereFace+ MHE on a row-sharded classifier: the value and gradient of
:func:`sphereface_plus.mhe.classifier_mhe` on the whole ``C x d`` weight, from each rank's rows.

Every rank returns the same total energy; ``backward()`` on it (the same loss on every rank, see
:mod:`sphereface_plus.parallel.collectives`) gives each rank the exact gradient of its own rows.

- ``batch_vs_all``: the batch's class rows ``ŵ_{y_b}`` (``B x d``) are assembled by an all-reduce of
  the owners' rows; each rank adds the kernel of those rows against its own block (``B x C/world``);
  the gathered rows' gradient is all-reduced back and lands on the owners.
- ``batch_unique``: the same with the distinct classes of the batch; each rank sums its own distinct
  classes against all of them (ordered pairs), which over the ranks is every ordered pair once.
- ``caffe_among``: the Caffe InterClass AMONG term, the single-process implementation
  (:mod:`sphereface_plus.mhe.caffe_among`) on this rank's rows: the row sum (``d`` numbers) and the two
  partial sums of D (over this rank's rows and the samples of its classes, ``1 + 1`` numbers) are
  all-reduced; each row's owner applies the layer's (non-gradient) update to its rows: no gradient travels.
- ``full``: the blocks of rows are passed around a ring (``world - 1`` exchanges of one block); each
  rank sums the kernel of its rows against every row (in chunks of ``block_size`` rows, memory
  ``O(block_size x C/world)``) and, since the kernel is symmetric, its rows' gradient is twice its own
  row sums of slopes: no gradient travels. Each pair is evaluated twice (once by each owner), about
  2 C^2 d multiply-adds over all ranks against 1.5 C^2 d for the single-process blocked form.

The kernels are the single-process ones (:func:`~sphereface_plus.mhe.mhe_kernel`,
:func:`~sphereface_plus.mhe.normalize_rows` and the blocked path's fused kernel-and-slope of
:mod:`sphereface_plus.mhe.kernels`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from sphereface_plus.heads.functional import check_labels
from sphereface_plus.mhe.caffe_among import caffe_among_layer
from sphereface_plus.mhe.classifier import CLASSIFIER_MODES
from sphereface_plus.mhe.energy import BLOCK_ENTRIES
from sphereface_plus.mhe.kernels import _kernel_and_slope, check_variant, mhe_kernel, normalize_power, variant_rows
from sphereface_plus.parallel.collectives import (
    ring_exchange,
    shard_range,
    shard_sizes,
    sum_partials,
    sum_replicated,
    world_size_and_rank,
)

__all__ = ["SHARDED_MHE_MODES", "sharded_classifier_mhe"]

# the single-process modes, the Caffe SphereFace+ InterClass "AMONG" term included
SHARDED_MHE_MODES = CLASSIFIER_MODES


def _gather_class_rows(w_hat: torch.Tensor, classes: torch.Tensor, start: int, group) -> torch.Tensor:
    """``ŵ[classes]`` (``len(classes) x d``) of the whole classifier: each owner places its rows, the
    others zeros, and an all-reduce (whose backward all-reduces the gradient) joins them."""
    end = start + w_hat.shape[0]
    mine = (classes >= start) & (classes < end)
    rows = w_hat.index_select(0, (classes - start).clamp(0, w_hat.shape[0] - 1))
    return sum_partials(torch.where(mine.unsqueeze(1), rows, torch.zeros_like(rows)), group)


def _masked_kernel_sum(cos: torch.Tensor, own: torch.Tensor, power: str, variant: str = "mhe") -> torch.Tensor:
    # as in classifier_mhe: the (near-1) self-cosines are replaced before the kernel, zeroed after
    return mhe_kernel(cos.masked_fill(own, 0.0), power, variant).masked_fill(own, 0.0).sum()


def _batch_vs_all(w_hat, labels, start, num_classes, power, group, variant="mhe"):
    q = _gather_class_rows(w_hat, labels, start, group)  # B x d
    cols = torch.arange(start, start + w_hat.shape[0], device=w_hat.device)
    own = labels.unsqueeze(1) == cols.unsqueeze(0)
    partial = _masked_kernel_sum(q @ w_hat.t(), own, power, variant)
    return sum_replicated(partial, group) / (labels.numel() * (num_classes - 1))


def _batch_unique(w_hat, labels, start, power, group, variant="mhe"):
    classes = torch.unique(labels)
    n = classes.numel()
    if n < 2:
        return (w_hat * 0.0).sum()  # no pair: zero energy, still part of the graph
    q = _gather_class_rows(w_hat, classes, start, group)  # U x d
    mine = (classes >= start) & (classes < start + w_hat.shape[0])
    rows = w_hat.index_select(0, classes[mine] - start)  # this rank's distinct classes
    own = classes[mine].unsqueeze(1) == classes.unsqueeze(0)
    partial = _masked_kernel_sum(rows @ q.t(), own, power, variant)
    return sum_replicated(partial, group) / (n * (n - 1))


class _RingFullEnergy(torch.autograd.Function):
    """This rank's rows against every row (ring-passed blocks): returns the partial
    ``Σ_{i mine} Σ_{j≠i} e_ij / (C (C-1))``; its backward gives ``∂E/∂ŵ_mine`` of the *total* E
    (twice the rows' own slope sums, the kernel being symmetric), to be used with :func:`sum_replicated`."""

    @staticmethod
    def forward(ctx, w_hat, power, chunk, num_classes, group):
        world, rank = world_size_and_rank(group)
        need_grad = bool(ctx.needs_input_grad[0])
        euclidean = power in ("0", "1", "2")
        start, _ = shard_range(num_classes, world, rank)
        sizes = shard_sizes(num_classes, world)
        rows_n = w_hat.shape[0]
        grad = torch.zeros_like(w_hat) if need_grad else None
        two = torch.full((), 2.0, dtype=w_hat.dtype, device=w_hat.device)
        total = torch.zeros((), dtype=torch.float64, device=w_hat.device)
        visiting = w_hat.detach()
        for step in range(world):
            src = (rank - step) % world
            for s in range(0, rows_n, chunk):
                e = min(s + chunk, rows_n)
                mine = w_hat[s:e]
                x = torch.addmm(two, mine, visiting.t(), alpha=-2.0) if euclidean else mine @ visiting.t()
                if src == rank:  # the self-pairs: set to an orthogonal pair before the kernel, zeroed after
                    x[:, s:e].diagonal().fill_(2.0 if euclidean else 0.0)
                val, slope = _kernel_and_slope(x, power, need_grad)
                if src == rank:
                    val[:, s:e].diagonal().zero_()
                    if need_grad:
                        slope[:, s:e].diagonal().zero_()
                total += val.sum().double()
                if need_grad:
                    grad[s:e].addmm_(slope, visiting)
                del x, val, slope
            if step < world - 1:
                visiting = ring_exchange(visiting, sizes[(rank - step - 1) % world], group)
        pairs = num_classes * (num_classes - 1)
        if need_grad:
            ctx.save_for_backward(grad.mul_(2.0 / pairs))
        return (total / pairs).to(w_hat.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None, None, None


def _caffe_among(weight, labels, start, num_classes, group):
    """The Caffe InterClass AMONG term of the whole classifier from this rank's rows: the single-process
    :func:`~sphereface_plus.mhe.caffe_among.caffe_among_layer` on this rank's block, its labels made local
    (``-1`` for the samples whose class another rank owns), its row sum and partial sums all-reduced."""
    mine = (labels >= start) & (labels < start + weight.shape[0])
    local = torch.where(mine, labels - start, torch.full_like(labels, -1))
    return caffe_among_layer(weight, local, num_classes=num_classes, all_reduce=lambda t: sum_replicated(t, group))


def _checked(labels: torch.Tensor, num_classes: int, check_range: bool) -> torch.Tensor:
    return check_labels(labels, None, num_classes, check_range=check_range)


def sharded_classifier_mhe(
    weight: torch.Tensor,
    labels: Optional[torch.Tensor],
    num_classes: int,
    power: Union[str, int] = "2",
    mode: str = "batch_vs_all",
    block_size: Optional[int] = None,
    group=None,
    variant: str = "mhe",
    check_labels: bool = True,
) -> torch.Tensor:
    """:func:`sphereface_plus.mhe.classifier_mhe` of the whole classifier from this rank's rows.

    Args:
        weight: this rank's rows ``[start, end)`` (``shard_range(num_classes, world, rank)``).
        labels: the *global* batch's labels (all-gathered; :class:`ShardedLogits.labels`), the same
            on every rank; not used by ``full``.
        num_classes: C of the whole classifier.
        power, mode, variant, check_labels: as in ``classifier_mhe`` (``variant='opensphere_v0'``: batch
            modes only).
        block_size: rows of this rank per chunk for ``full`` (default: about 4M kernel entries per
            chunk, as the single-process blocked path).

    Returns the total energy (the same 0-dim tensor on every rank), differentiable in ``weight``.
    """
    power = normalize_power(power)
    if mode not in SHARDED_MHE_MODES:
        raise ValueError(f"unknown classifier_mhe mode {mode!r}: choose one of {', '.join(SHARDED_MHE_MODES)}")
    check_variant(variant, mode)
    world, rank = world_size_and_rank(group)
    start, end = shard_range(num_classes, world, rank)
    if weight.dim() != 2 or weight.shape[0] != end - start:
        raise ValueError(f"rank {rank} of {world} holds rows [{start}, {end}) of {num_classes}: expected a "
                         f"{end - start} x d weight, got {tuple(weight.shape)}")
    if mode == "caffe_among":
        if labels is None:
            raise ValueError("classifier_mhe mode 'caffe_among' needs the batch labels")
        labels = _checked(labels, num_classes, check_labels).to(weight.device)
        return _caffe_among(weight, labels, start, num_classes, group)
    w_hat = variant_rows(weight, variant)
    if mode == "full":
        widest = max(shard_sizes(num_classes, world))
        chunk = int(block_size) if block_size else max(32, BLOCK_ENTRIES // widest)
        if chunk < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size}")
        return sum_replicated(_RingFullEnergy.apply(w_hat, power, chunk, num_classes, group), group)
    if labels is None:
        raise ValueError(f"classifier_mhe mode {mode!r} needs the batch labels")
    labels = _checked(labels, num_classes, check_labels).to(weight.device)
    if labels.numel() == 0:
        raise ValueError("labels is empty: classifier_mhe needs at least one sample")
    if mode == "batch_unique":
        return _batch_unique(w_hat, labels, start, power, group, variant)
    return _batch_vs_all(w_hat, labels, start, num_classes, power, group, variant)
