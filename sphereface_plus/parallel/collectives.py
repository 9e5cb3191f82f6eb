"""The row split of a sharded classifier and the autograd-aware collectives it needs.

Convention (what makes the gradients exact): every rank computes the *same* global loss (the
cross-entropy of the whole global batch, the whole MHE term) and calls ``backward()`` on it. A value
that every rank then uses identically (the softmax denominator, the target logits, the total MHE) is
summed with :func:`sum_replicated`, whose backward is the identity: each rank already holds the whole
upstream gradient. A tensor that each rank then uses for its *own* partial term (the gathered
embeddings against its own block of rows, the gathered class rows against its own rows) goes through
:func:`all_gather_rows` / :func:`sum_partials`, whose backward sums the partial gradients of all ranks
(an all-reduce) and hands each rank its slice: a reduce-scatter, written as all-reduce + slice because
gloo has no reduce-scatter.

Without a process group (world size 1) every collective is the identity, so the same code runs in a
single process.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist

__all__ = [
    "shard_range",
    "shard_sizes",
    "world_size_and_rank",
    "all_gather_rows",
    "all_gather_labels",
    "sum_replicated",
    "sum_partials",
    "all_reduce_max",
    "all_reduce_min",
    "replicated_parameter",
    "scale_grad",
]


def shard_range(num_classes: int, world_size: int, rank: int) -> Tuple[int, int]:
    """Rows ``[start, end)`` of a ``num_classes``-row classifier held by ``rank`` of ``world_size``.

    Contiguous blocks; the first ``num_classes % world_size`` ranks hold one row more (the split of
    insightface's Partial FC). A pure function: the same on every rank, on every run.
    """
    num_classes, world_size, rank = int(num_classes), int(world_size), int(rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank={rank}, world_size={world_size}")
    if num_classes < world_size:
        raise ValueError(f"cannot split {num_classes} classes over {world_size} processes (each needs at least one row)")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_sizes(num_classes: int, world_size: int) -> List[int]:
    """The number of rows of every rank, in rank order."""
    return [e - s for s, e in (shard_range(num_classes, world_size, r) for r in range(world_size))]


def _active(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size_and_rank(group=None) -> Tuple[int, int]:
    """``(world_size, rank)`` of ``group`` (the default group), ``(1, 0)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def _gather_list(x: torch.Tensor, group) -> List[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x.contiguous(), group=group)
    return out


class _AllGatherRows(torch.autograd.Function):
    """Concatenate every rank's ``B x ...`` tensor along dim 0; backward: sum the partial gradients
    of the whole gathered tensor over the ranks and return this rank's rows, times ``grad_scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, grad_scale: float):
        ctx.group, ctx.grad_scale = group, grad_scale
        ctx.rank, ctx.rows = dist.get_rank(group), x.shape[0]
        return torch.cat(_gather_list(x, group), dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        mine = grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]
        if ctx.grad_scale != 1.0:
            mine = mine * ctx.grad_scale
        return mine, None, None


def _check_equal_batches(x: torch.Tensor, group) -> None:
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = _gather_list(n, group)
    if any(int(s) != x.shape[0] for s in sizes):
        raise ValueError(
            f"every process must hold the same number of samples; got {[int(s) for s in sizes]} "
            f"(drop the last incomplete batch, as the training sampler does)"
        )


def all_gather_rows(x: torch.Tensor, group=None, grad_scale: float = 1.0, check_sizes: bool = False) -> torch.Tensor:
    """All-gather along dim 0 (rank order) with the exact backward: rank r receives
    ``sum_over_ranks(d loss_rank / d gathered)[rows of r]``, the reduce-scatter of the gradient slices.

    Every rank must pass the same number of rows (``check_sizes=True`` verifies it with one more
    collective). ``grad_scale`` multiplies the returned gradient: pass the world size when the layers
    that produced ``x`` are wrapped in DDP, which *averages* their gradients over ranks while the loss
    here is already the global one (insightface's Partial FC does the same).
    """
    if not _active(group):
        return x * grad_scale - x.detach() * (grad_scale - 1.0) if grad_scale != 1.0 else x
    if check_sizes:
        _check_equal_batches(x, group)
    return _AllGatherRows.apply(x, group, float(grad_scale))


def all_gather_labels(labels: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather of integer labels along dim 0 (no gradient)."""
    labels = labels.reshape(-1)
    if not _active(group):
        return labels
    return torch.cat(_gather_list(labels, group), dim=0)


class _SumReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _SumPartials(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def sum_replicated(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-reduce sum of a partial value that every rank then uses *identically* (the softmax
    denominator, a total energy); backward: the identity (each rank already has the whole gradient)."""
    return _SumReplicated.apply(x, group) if _active(group) else x


def sum_partials(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-reduce sum of contributions (e.g. each owner's rows placed in a zero tensor) that each rank
    then uses for its *own* partial term; backward: all-reduce sum of the ranks' gradients."""
    return _SumPartials.apply(x, group) if _active(group) else x


def all_reduce_max(x: torch.Tensor, group=None) -> torch.Tensor:
    """Elementwise max over ranks (no gradient: used for the softmax shift and the argmax)."""
    x = x.detach().clone()
    if _active(group):
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def all_reduce_min(x: torch.Tensor, group=None) -> torch.Tensor:
    """Elementwise min over ranks (no gradient)."""
    x = x.detach().clone()
    if _active(group):
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=group)
    return x


def ring_exchange(x: torch.Tensor, recv_rows: int, group=None) -> torch.Tensor:
    """Send ``x`` to rank ``r + 1`` and receive a ``recv_rows x ...`` tensor from rank ``r - 1`` (mod
    the world size); no gradient. Used to pass the row blocks around for the full-space MHE."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    out = torch.empty((recv_rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    to, frm = (rank + 1) % world, (rank - 1) % world
    if group is not None:
        to, frm = dist.get_global_rank(group, to), dist.get_global_rank(group, frm)
    ops = [dist.P2POp(dist.isend, x.contiguous(), to, group), dist.P2POp(dist.irecv, out, frm, group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _ReplicatedParameter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def replicated_parameter(x: torch.Tensor, group=None) -> torch.Tensor:
    """A parameter every rank holds whole and uses for its *own* partial term (a head's shared scalar
    bias against its block of rows): the identity forward; backward: the all-reduced sum of the
    ranks' partial gradients, so every copy receives the gradient of the global loss."""
    return _ReplicatedParameter.apply(x, group) if _active(group) else x


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """The identity, with the gradient multiplied by ``factor`` (a term that every rank computes
    identically from gathered rows: ``1 / world`` undoes the sum over ranks of the gather's backward)."""
    return x if factor == 1.0 else _ScaleGrad.apply(x, float(factor))
