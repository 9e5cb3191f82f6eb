"""How the classifier is laid out over the processes: the one place that knows ``head.parallel``.

A layout owns what differs between a head held whole on every rank and one split by rows
(docs/distributed.md), so the trainer has no branch on it:

- :meth:`build_head`: the head, its rows drawn by the world-size-independent ``init_rows_(seed)`` (a
  replicated run and a sharded run of any world size start from the same classifier);
- :meth:`classifier_mhe` / :meth:`num_correct`: the SphereFace+ term and the accuracy count of a batch;
- :meth:`wrap`: what DistributedDataParallel wraps (the whole model, or the backbone alone);
- :meth:`head_state` / :meth:`load_head_state`, :meth:`optimizer_state` / :meth:`load_optimizer_state`:
  checkpoints always hold the whole ``C x d`` head, so a run resumes on any number of processes;
- :meth:`clip_grad_norm_`: the global gradient norm.

:class:`Replicated` is the usual data-parallel run; :class:`Sharded` keeps rows ``[start, end)`` of the
classifier on each rank (:class:`~sphereface_plus.parallel.ShardedClassifier`) and is, on one process,
the replicated computation itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from sphereface_plus.face.model import FaceModel, head_dtype
from sphereface_plus.heads import HEADS
from sphereface_plus.mhe import ClassifierMHE, classifier_mhe
from sphereface_plus.parallel import (ShardedClassifier, gather_head_state, gather_optimizer_state, load_head_state,
                                      shard_optimizer_state, sharded_classifier_mhe)

__all__ = ["HeadSpec", "Replicated", "Sharded", "create_layout", "LAYOUTS"]


@dataclass(frozen=True)
class HeadSpec:
    """The classifier head of a run, as resolved (:func:`sphereface_plus.face.resolve.resolve`): what a layout builds."""

    name: str
    parallel: str  # sphereface_plus.parallel.PARALLEL_MODES: which layout
    sample_rate: float  # Partial FC (sharded only); 1 is exact
    settings: Dict[str, Any]  # the head's constructor keyword arguments in force


class Replicated:
    """The whole head on every rank; DDP wraps backbone and head together. ``spec``: the head to build."""

    name = "replicated"
    collective_state = False  # the state of rank 0 is the whole state

    def __init__(self, spec: HeadSpec):
        self.spec = spec

    def build_model(self, backbone: nn.Module, embedding_dim: int, num_classes: int, seed: int, mhe,
                    world_size: int = 1) -> FaceModel:
        """The face model of ``backbone`` (``embedding_dim`` wide) and the head over ``num_classes`` (its rows
        drawn from ``seed``; on ``world_size`` processes), with the SphereFace+ term of the ``mhe`` settings
        (``lambda_m``, ``power``, ``mode``, ``variant``; another ``objective`` of the family and its settings,
        docs/theory.md#classifier-family)."""
        head = self.build_head(embedding_dim, num_classes, seed, world_size)
        term = None if mhe.objective == "mhe" else ClassifierMHE(
            mhe.objective, mhe.power, mhe.mode, settings=mhe.settings(seed), coefficient=mhe.lambda_m)
        return FaceModel(backbone, head, self, mhe.lambda_m, mhe.power, mhe.mode, mhe.variant, term)

    def build_head(self, in_features: int, num_classes: int, seed: int, world_size: int = 1) -> nn.Module:
        spec = self.spec
        with torch.random.fork_rng(devices=[]):  # the head's own default init must not move the default RNG
            head = HEADS.get(spec.name)(in_features, num_classes, **spec.settings)
        head.init_rows_(seed)
        head.check_label_range = False  # the trainer checks each batch's labels once, on the host
        return head

    def classifier_mhe(self, head: nn.Module, out, labels: torch.Tensor, power: str, mode: str,
                       variant: str) -> torch.Tensor:
        # no NaN check (a host sync every step): a non-finite weight gives a non-finite loss, which the
        # loop's guard skips and, if it persists, rolls back; the labels were checked once for the batch
        return classifier_mhe(head_dtype(head.weight), labels, power=power, mode=mode, check_finite=False,
                              variant=variant, check_labels=False)

    @torch.no_grad()
    def num_correct(self, head: nn.Module, out, labels: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """(correct, count) of this rank's batch."""
        return (out.logits.argmax(1) == labels).sum(), labels.numel()

    def wrap(self, model: nn.Module, device: torch.device, world_size: int = 1) -> nn.Module:
        if world_size <= 1:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def head_state(self, head: nn.Module, whole: bool = True) -> Dict[str, torch.Tensor]:
        return head.state_dict()

    def load_head_state(self, head: nn.Module, state: Dict[str, torch.Tensor], source: Any = "checkpoint") -> None:
        head.load_state_dict(state)

    def optimizer_state(self, optimizer: torch.optim.Optimizer, head: nn.Module, whole: bool = True) -> Dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, head: nn.Module, state: Dict[str, Any],
                             source: Any = "checkpoint") -> None:
        optimizer.load_state_dict(state)

    def rank_rows(self, head: nn.Module) -> Optional[list]:
        """The rows this rank holds when they are not all of them (a rank's own rollback state), else None."""
        return None

    def load_rank_state(self, head: nn.Module, optimizer, head_state, optimizer_state) -> None:
        head.load_state_dict(head_state)
        optimizer.load_state_dict(optimizer_state)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> None:
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)


class Sharded(Replicated):
    """Rows ``[start, end)`` of the classifier on each rank; DDP wraps the backbone alone (docs/distributed.md).

    Every value of a batch (loss, MHE term, accuracy) is the *global* batch's, the same on every rank. On
    one process the head is the single-process head and the MHE term ``classifier_mhe`` itself, so a sharded
    run on one process is the replicated run.
    """

    name = "sharded"
    collective_state = True  # the whole head is gathered from every rank

    def build_head(self, in_features: int, num_classes: int, seed: int, world_size: int = 1) -> nn.Module:
        spec = self.spec
        clf = ShardedClassifier(spec.name, in_features, num_classes, dict(spec.settings), sample_rate=spec.sample_rate,
                                seed=seed, embedding_grad_scale=world_size)
        clf.check_label_range = clf.head.check_label_range = False  # checked once per batch by the trainer
        return clf

    def classifier_mhe(self, head: ShardedClassifier, out, labels: torch.Tensor, power: str, mode: str,
                       variant: str) -> torch.Tensor:
        weight = head_dtype(head.weight)
        if head.world_size == 1:
            return classifier_mhe(weight, out.labels, power=power, mode=mode, check_finite=False, variant=variant,
                                  check_labels=False)
        return sharded_classifier_mhe(weight, out.labels, head.num_classes, power, mode, group=head.group,
                                      variant=variant, check_labels=False)

    @torch.no_grad()
    def num_correct(self, head: ShardedClassifier, out, labels: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """(correct, count) of the global batch (every rank reports the same pair, so the mean over ranks
        that the log takes is this pair's ratio: nothing is counted twice)."""
        return head.num_correct(out), out.labels.numel()

    def wrap(self, model: nn.Module, device: torch.device, world_size: int = 1) -> nn.Module:
        if world_size <= 1:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return _WithWrappedBackbone(model, nn.parallel.DistributedDataParallel(model.backbone, device_ids=ids))

    def head_state(self, head: ShardedClassifier, whole: bool = True) -> Optional[Dict[str, torch.Tensor]]:
        """``whole``: the C x d head gathered on rank 0 (collective; None elsewhere); else this rank's rows."""
        return gather_head_state(head) if whole else head.head.state_dict()

    def load_head_state(self, head: ShardedClassifier, state: Dict[str, torch.Tensor], source: Any = "checkpoint") -> None:
        """A whole head (a run on any number of processes, sharded or replicated) into this rank's rows."""
        load_head_state(head, state, source=str(source))

    def load_rank_state(self, head: ShardedClassifier, optimizer, head_state, optimizer_state) -> None:
        """This rank's own rows and optimiser state (its rollback start state)."""
        head.head.load_state_dict(head_state)
        optimizer.load_state_dict(optimizer_state)

    def optimizer_state(self, optimizer, head: ShardedClassifier, whole: bool = True):
        return gather_optimizer_state(optimizer, head) if whole else optimizer.state_dict()

    def load_optimizer_state(self, optimizer, head: ShardedClassifier, state, source: Any = "checkpoint") -> None:
        optimizer.load_state_dict(shard_optimizer_state(state, optimizer, head, source=str(source)))

    def rank_rows(self, head: ShardedClassifier) -> Optional[list]:
        return [head.start, head.end]

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> None:
        """``clip_grad_norm_`` over the whole model: the backbone's gradients are the same on every rank
        (DDP), and so are the head's shared parameters'; the head's row blocks are disjoint, so the global
        squared norm is the replicated part's plus the all-reduced sum of the blocks'."""
        head = model.head
        if head.world_size == 1:  # the replicated computation itself
            nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            return
        replicated = [p.grad for p in list(model.backbone.parameters()) + head.shared_parameters()
                      if p.grad is not None]
        rows = [p.grad for p in head.row_parameters() if p.grad is not None]
        ref = (replicated + rows)[0]
        sq_rep = sum((g.detach().double().pow(2).sum() for g in replicated), ref.new_zeros((), dtype=torch.float64))
        sq_rows = sum((g.detach().double().pow(2).sum() for g in rows), ref.new_zeros((), dtype=torch.float64))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sq_rows, group=head.group)
        total = (sq_rep + sq_rows).sqrt()
        scale = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for g in replicated + rows:
            g.mul_(scale.to(g.dtype))


class _WithWrappedBackbone(nn.Module):
    """What the trainer calls when only the backbone is data-parallel: the model with its DDP backbone."""

    def __init__(self, model: nn.Module, backbone: nn.Module):
        super().__init__()
        self.model, self.backbone = model, backbone

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        return self.model(images, labels, backbone=self.backbone)


#: head.parallel -> layout (the choices are sphereface_plus.parallel.PARALLEL_MODES)
LAYOUTS = {"replicated": Replicated, "sharded": Sharded}


def create_layout(spec: HeadSpec) -> Replicated:
    """The layout of ``spec.parallel`` that builds the head ``spec``."""
    return LAYOUTS[spec.parallel](spec)
