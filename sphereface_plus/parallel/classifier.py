"""A row-sharded (model-parallel) classifier head with the exact softmax cross-entropy and accuracy.

Each of the ``world_size`` processes holds the rows ``[start, end)`` of the ``C x d`` classifier
(:func:`~sphereface_plus.parallel.collectives.shard_range`). A step: the embeddings and labels of the
whole global batch are all-gathered; every rank computes its ``B_global x (end - start)`` block of
logits with the registered head's own hooks (:class:`~sphereface_plus.heads.base.ClassifierHead`: the
head is built with ``num_classes = end - start`` and marked ``row_block``, so its margin, schedules,
weight renorm and every option come from the head); the loss is composed from the same hooks as the
head's own ``forward``:

- ``loss_kind='softmax'``: the cross-entropy over all ``C`` classes, exact via an all-reduce of the
  row max and one of the sum of exponentials (and of the target logit);
- ``loss_kind='binary'``: the all-reduced sum of the blocks' sums of ``binary_loss_terms``, over the
  global batch size;
- ``aux_loss`` (terms of the embeddings alone): once per global batch, on the gathered embeddings,
  its gradient divided by the world size (every rank computes it identically);
- the head's ``row_parameters`` are split by rows; its ``shared_parameters`` (SphereFace2's bias) are
  whole on every rank, and their gradient is all-reduced (:func:`replicated_parameter`), so the copies
  stay equal.

The accuracy is the global argmax over the shards. On one process (no sampling) the classifier runs
the head's own ``forward``: a sharded run on one process is then the replicated run, bit for bit.

The memory per rank is ``(C / world) x d`` for the weight (plus its gradient and momentum) and
``B_global x C / world`` for the logits, instead of ``C x d`` and ``B x C`` on every rank.

Partial FC (An et al., 2022; insightface ``partial_fc_v2.py``) is available as an *approximation*:
``sample_rate < 1`` keeps, on each rank and at each training step, the block's classes of the global
batch (the positives, always) plus random other rows up to ``int(sample_rate * rows)``; the softmax is
then over the sampled classes only. As in ``partial_fc_v2``, the sampled rows are taken from the
parameter by indexing, so the rows left out get a zero gradient but the optimiser still updates them
(SGD momentum and weight decay keep acting on every row); when the positives alone exceed the quota,
only they are used.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from sphereface_plus.errors import UsageError
from sphereface_plus.heads import create_head
from sphereface_plus.heads.base import INIT_CHUNK, init_rows
from sphereface_plus.heads.functional import NO_TARGET, check_labels
from sphereface_plus.parallel.collectives import (
    all_gather_labels,
    all_gather_rows,
    all_reduce_max,
    all_reduce_min,
    replicated_parameter,
    scale_grad,
    shard_range,
    sum_replicated,
    world_size_and_rank,
)

logger = logging.getLogger(__name__)

__all__ = ["ShardedLogits", "ShardedClassifier", "block_labels", "sharded_cross_entropy", "sharded_num_correct",
           "init_rows"]

@dataclass
class ShardedLogits:
    """One step's output of :class:`ShardedClassifier` on this rank.

    ``logits``: ``B_global x K`` block (K = the block's rows, or the sampled ones); ``labels``: the
    global batch's labels (``B_global``); ``block_labels``: each sample's column in ``logits`` or
    ``NO_TARGET``; ``columns``: the global class index of each column of ``logits``; ``loss``: the
    head's whole loss of the global batch (the same value on every rank, as ``HeadOutput.loss``);
    ``terms``: the head's detached terms (as ``HeadOutput.terms``).
    """

    logits: torch.Tensor
    labels: torch.Tensor
    block_labels: torch.Tensor
    columns: torch.Tensor
    loss: Optional[torch.Tensor] = None
    terms: Dict[str, torch.Tensor] = field(default_factory=dict)


def block_labels(labels: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Labels shifted into the block ``[start, end)``; :data:`NO_TARGET` for classes outside it."""
    inside = (labels >= start) & (labels < end)
    return torch.where(inside, labels - start, torch.full_like(labels, NO_TARGET))


def sharded_cross_entropy(logits: torch.Tensor, block_label: torch.Tensor, group=None) -> torch.Tensor:
    """The mean softmax cross-entropy over *all* classes from this rank's block of logits.

    ``log Σ_j exp(f_j) - f_y`` with ``Σ_j`` over every rank's columns: the row max (a constant shift,
    so it carries no gradient) and ``Σ exp(f - max)`` are all-reduced, and so is the target logit
    (held by one rank). Every rank returns the same value; its backward gives this rank's block the
    exact gradient (softmax minus one-hot, over the global batch size).
    """
    shift = all_reduce_max(logits.detach().max(dim=1).values, group)
    sum_exp = sum_replicated(torch.exp(logits - shift.unsqueeze(1)).sum(dim=1), group)
    has = block_label >= 0
    target = logits.gather(1, block_label.clamp_min(0).unsqueeze(1)).squeeze(1)
    target = sum_replicated(torch.where(has, target, torch.zeros_like(target)), group)
    return (torch.log(sum_exp) + shift - target).mean()


def sharded_num_correct(logits: torch.Tensor, columns: torch.Tensor, labels: torch.Tensor, group=None) -> torch.Tensor:
    """How many samples of the global batch have their label as the argmax over all ranks' logits.

    Ties resolve to the smallest class index, as ``torch.argmax`` does on the full logits.
    """
    with torch.no_grad():
        value, arg = logits.max(dim=1)
        best = all_reduce_max(value, group)
        num_classes_bound = torch.iinfo(torch.long).max
        candidate = torch.where(value == best, columns[arg], torch.full_like(arg, num_classes_bound))
        pred = all_reduce_min(candidate, group)
        return (pred == labels).sum()


class ShardedClassifier(nn.Module):
    """The rows ``[start, end)`` of a registered classifier head, for a row-sharded (model-parallel) run.

    Args:
        head: registered head name (``a_softmax``, ``cosface``, ``arcface``, ``softmax``).
        in_features: embedding size d.
        num_classes: C, the number of classes of the *whole* classifier.
        head_kwargs: the head's own constructor arguments, passed through untouched (margin, λ schedule,
            renorm, any option the head grows later).
        group: process group (default: the default group; no group at all: world size 1).
        sample_rate: Partial FC's negative-class sampling rate in (0, 1]; 1 (the default) is exact.
        seed: seed of the world-size-independent initialisation (:func:`init_rows`); the same on
            every rank.
        embedding_grad_scale: multiplies the gradient returned to this rank's embeddings. Pass the
            world size when the backbone is wrapped in DDP (DDP averages the backbone's gradients
            over ranks, while this loss is already the loss of the global batch).

    ``forward(embeddings, labels)`` takes this rank's ``b x d`` embeddings and ``b`` labels (the same
    ``b`` on every rank) and returns a :class:`ShardedLogits`; :meth:`cross_entropy` and
    :meth:`num_correct` turn it into the global loss and accuracy count. ``weight`` is this rank's
    ``(end - start) x d`` parameter; ``head`` the block's head module (its buffers, e.g. A-Softmax's
    ``iteration``, are the same on every rank).
    """

    def __init__(
        self,
        head: str,
        in_features: int,
        num_classes: int,
        head_kwargs: Optional[Dict[str, Any]] = None,
        *,
        group=None,
        sample_rate: float = 1.0,
        seed: int = 0,
        embedding_grad_scale: float = 1.0,
    ):
        super().__init__()
        self.group = group
        self.world_size, self.rank = world_size_and_rank(group)
        self.num_classes = int(num_classes)
        if self.num_classes < 2 * self.world_size:
            raise UsageError(
                f"head.parallel=sharded needs at least 2 classes per process: {self.num_classes} classes over "
                f"{self.world_size} processes; use head.parallel=replicated or fewer processes"
            )
        if not 0.0 < float(sample_rate) <= 1.0:
            raise UsageError(f"head.sample_rate must be in (0, 1], got {sample_rate}; 1 disables sampling")
        self.sample_rate = float(sample_rate)
        self.embedding_grad_scale = float(embedding_grad_scale)
        self.start, self.end = shard_range(self.num_classes, self.world_size, self.rank)
        self.head_name = head
        with torch.random.fork_rng(devices=[]):  # the head's own default init must not move the default RNG
            self.head = create_head(head, in_features=in_features, num_classes=self.end - self.start,
                                    **(head_kwargs or {}))
        self.head.row_block = True
        self.head.init_rows_(seed, self.start, self.num_classes)
        named = dict(self.head.named_parameters())
        undeclared = sorted(set(named) - set(self.head.row_parameters) - set(self.head.shared_parameters))
        if undeclared:
            raise ValueError(f"head {head!r} has parameters {undeclared} that are neither row_parameters nor "
                             f"shared_parameters: declare them so that a sharded run knows how to split them")

    @property
    def weight(self) -> nn.Parameter:
        return self.head.weight

    @property
    def rows(self) -> int:
        return self.end - self.start

    def row_parameters(self) -> List[nn.Parameter]:
        """The head's parameters split by rows (each rank's block differs)."""
        named = dict(self.head.named_parameters())
        return [named[n] for n in self.head.row_parameters if n in named]

    def shared_parameters(self) -> List[nn.Parameter]:
        """The head's parameters every rank holds whole (equal gradients on every rank)."""
        named = dict(self.head.named_parameters())
        return [named[n] for n in self.head.shared_parameters if n in named]

    def state_terms(self) -> Dict[str, torch.Tensor]:
        """The head's schedule values in force (``ClassifierHead.state_terms``)."""
        return self.head.state_terms()

    def _sample(self, local: torch.Tensor) -> torch.Tensor:
        """Partial FC's sampled rows of this block (sorted): every positive, then random others."""
        num_sample = int(self.sample_rate * self.rows)
        positive = torch.unique(local[local >= 0])
        if num_sample <= positive.numel():
            return positive
        score = torch.rand(self.rows, device=local.device)
        score[positive] = 2.0  # above every uniform draw: the positives are always among the top k
        return torch.topk(score, num_sample).indices.sort().values

    #: check each batch's label range (see ``ClassifierHead.check_label_range``)
    check_label_range = True

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> ShardedLogits:
        labels = check_labels(labels, embeddings.shape[0], self.num_classes,
                              check_range=self.check_label_range).to(embeddings.device)
        head = self.head
        sampling = self.sample_rate < 1.0 and self.training
        if self.world_size == 1 and not sampling and self.embedding_grad_scale == 1.0:
            # one process: the head's own forward, the replicated run's computation itself
            out = head(embeddings, labels)
            columns = torch.arange(self.start, self.end, device=embeddings.device)
            return ShardedLogits(out.logits, labels, labels, columns, out.loss, out.terms)
        x = all_gather_rows(embeddings, self.group, grad_scale=self.embedding_grad_scale)
        y = all_gather_labels(labels, self.group)
        local = block_labels(y, self.start, self.end)
        columns = torch.arange(self.start, self.end, device=x.device)
        head.begin_forward()  # once, on the whole stored block: schedules advance, rows renorm
        params: Dict[str, torch.Tensor] = {}
        if sampling:
            index = self._sample(local)
            has = local >= 0
            local = torch.where(has, torch.searchsorted(index, local.clamp_min(0)), local)
            columns = columns[index]
            # as partial_fc_v2: the sampled rows are taken from the parameter by indexing
            params.update({n: p.index_select(0, index) for n, p in head.named_parameters() if n in head.row_parameters})
        params.update({n: replicated_parameter(p, self.group) for n, p in head.named_parameters()
                       if n in head.shared_parameters})
        logits = _margin_logits(head, params, x, local)
        if head.loss_kind == "softmax":
            main = sharded_cross_entropy(logits, local, self.group)
        elif head.loss_kind == "binary":
            terms = _binary_terms(head, params, logits, local)
            main = sum_replicated(terms.sum(), self.group) / x.shape[0]
        else:
            raise ValueError(f"head {self.head_name!r} has loss_kind={head.loss_kind!r}, which the sharded "
                             "classifier does not know")
        # every rank computes the same aux term from the gathered rows: its gradient, summed over the
        # ranks by the gather's backward, is divided by the world size here
        aux, aux_terms = head.aux_loss(scale_grad(x, 1.0 / self.world_size))
        loss = head.loss_weight * main + aux
        terms = {head.main_term: main.detach(), **{k: v.detach() for k, v in aux_terms.items()}, **head.state_terms()}
        return ShardedLogits(logits, y, local, columns, loss, terms)

    def cross_entropy(self, out: ShardedLogits) -> torch.Tensor:
        """The global batch's mean cross-entropy over all classes of the logits (the same value on
        every rank; for a softmax head with loss weight 1 and no auxiliary term, its whole loss)."""
        return sharded_cross_entropy(out.logits, out.block_labels, self.group)

    def num_correct(self, out: ShardedLogits) -> torch.Tensor:
        """Samples of the global batch whose argmax over all classes is their label."""
        return sharded_num_correct(out.logits, out.columns, out.labels, self.group)

    def extra_repr(self) -> str:
        return (f"rows=[{self.start}, {self.end}) of {self.num_classes}, rank={self.rank}/{self.world_size}, "
                f"sample_rate={self.sample_rate}")


class _Call(nn.Module):
    """``head.<method>(*args)`` as a module forward, so that ``torch.func.functional_call`` can run
    the head's hooks with substituted parameters (sampled rows, replicated shared parameters)."""

    def __init__(self, head: nn.Module, method: str):
        super().__init__()
        self.head, self.method = head, method

    def forward(self, *args):
        return getattr(self.head, self.method)(*args)


def _with_params(head: nn.Module, method: str, params: Dict[str, torch.Tensor], *args):
    if not params:
        return getattr(head, method)(*args)
    return torch.func.functional_call(_Call(head, method), {f"head.{n}": v for n, v in params.items()}, args,
                                      strict=False)


def _margin_logits(head, params, x, local):
    return _with_params(head, "margin_logits", params, x, local)


def _binary_terms(head, params, logits, local):
    return _with_params(head, "binary_loss_terms", params, logits, local)
