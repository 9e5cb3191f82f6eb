"""Checkpoints of a row-sharded classifier that do not depend on the world size.

On save the whole ``C x d`` weight (and every other per-class tensor, the head's ``row_parameters``:
the softmax head's bias, the SGD momentum of those parameters) is gathered to rank 0, one block at a
time (no rank ever holds more than its block plus, on rank 0, the CPU copy being written). Shared
parameters (``shared_parameters``) and buffers are the same on every rank: rank 0's are saved. The ``head`` entry is then exactly
a replicated head's state dict (``weight`` C x d, A-Softmax's ``iteration``), so evaluation and the
replicated trainer read it unchanged; the optimiser entry is the optimiser's state dict with the head
parameters' state made whole, so it loads into a replicated run too (same parameter order). On load
every rank slices its rows ``[start, end)`` for the *current* world size, so a run saved on 2
processes resumes on 1, 3 or 8 and continues as it would have (up to the order of the reductions).

Collective: :func:`gather_head_state` and :func:`gather_optimizer_state` must be called on every rank
(they return the full state on rank 0 and ``None`` elsewhere); loading needs no communication.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Set

import torch
import torch.distributed as dist

from sphereface_plus.errors import CheckpointError
from sphereface_plus.parallel.classifier import ShardedClassifier
from sphereface_plus.parallel.collectives import shard_range, world_size_and_rank

__all__ = ["gather_rows_to_rank0", "gather_head_state", "load_head_state", "gather_optimizer_state",
           "shard_optimizer_state"]


def gather_rows_to_rank0(block: torch.Tensor, num_classes: int, group=None) -> Optional[torch.Tensor]:
    """The ``num_classes x ...`` tensor whose rows ``[start, end)`` each rank holds as ``block``, as a
    CPU tensor on rank 0 (``None`` on the other ranks). Point-to-point, one block at a time."""
    world, rank = world_size_and_rank(group)
    block = block.detach()
    if world == 1:
        return block.cpu().clone()
    if rank != 0:
        dist.send(block.contiguous(), dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        return None
    full = torch.empty((num_classes,) + tuple(block.shape[1:]), dtype=block.dtype)
    for src in range(world):
        s, e = shard_range(num_classes, world, src)
        if src == 0:
            full[s:e] = block.cpu()
            continue
        buf = torch.empty((e - s,) + tuple(block.shape[1:]), dtype=block.dtype, device=block.device)
        dist.recv(buf, dist.get_global_rank(group, src) if group is not None else src, group=group)
        full[s:e] = buf.cpu()
    return full


def _row_keys(clf: ShardedClassifier) -> Set[str]:
    """State-dict keys of the head's per-class tensors (``ClassifierHead.row_parameters``: ``weight``,
    the softmax head's ``bias``); everything else (shared parameters, buffers) is whole on every rank."""
    return set(clf.head.row_parameters)


def gather_head_state(clf: ShardedClassifier) -> Optional[Dict[str, torch.Tensor]]:
    """The whole head's state dict (``weight`` C x d, buffers) on rank 0; ``None`` elsewhere. Collective."""
    rows = _row_keys(clf)
    out: Dict[str, torch.Tensor] = {}
    for key, value in clf.head.state_dict().items():
        out[key] = gather_rows_to_rank0(value, clf.num_classes, clf.group) if key in rows else value.detach().cpu().clone()
    return out if clf.rank == 0 else None


def load_head_state(clf: ShardedClassifier, state: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load a whole head's state dict (from a sharded or a replicated run) into this rank's rows."""
    rows = _row_keys(clf)
    local: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in rows:
            if value.dim() < 1 or value.shape[0] != clf.num_classes:
                raise CheckpointError(
                    f"{source}: head.{key} has shape {tuple(value.shape)} but the classifier has {clf.num_classes} "
                    f"classes; resume with the dataset the checkpoint was trained on"
                )
            value = value[clf.start:clf.end]
        local[key] = value
    clf.head.load_state_dict(local)


def _head_indices(optimizer: torch.optim.Optimizer, clf: ShardedClassifier) -> Dict[int, torch.nn.Parameter]:
    """Index (as in ``optimizer.state_dict()['state']``) -> head parameter, for the head's row
    parameters (a shared parameter's state is the same on every rank: rank 0's is saved as it is)."""
    head = {id(p) for p in clf.row_parameters()}
    order: List[torch.nn.Parameter] = [p for g in optimizer.param_groups for p in g["params"]]
    return {i: p for i, p in enumerate(order) if id(p) in head}


def gather_optimizer_state(optimizer: torch.optim.Optimizer, clf: ShardedClassifier) -> Optional[Dict[str, Any]]:
    """``optimizer.state_dict()`` with the head parameters' per-row state (SGD's ``momentum_buffer``)
    gathered whole, on rank 0; ``None`` elsewhere. Collective. The other parameters' state (the
    DDP-replicated backbone) is rank 0's."""
    sd = optimizer.state_dict()
    for idx, param in sorted(_head_indices(optimizer, clf).items()):
        state = sd["state"].get(idx)
        if state is None:
            continue
        state = dict(state)
        for key in sorted(state):
            value = state[key]
            if torch.is_tensor(value) and value.shape == param.shape:
                state[key] = gather_rows_to_rank0(value, clf.num_classes, clf.group)
        sd["state"][idx] = state
    return sd if clf.rank == 0 else None


def shard_optimizer_state(state_dict: Dict[str, Any], optimizer: torch.optim.Optimizer, clf: ShardedClassifier,
                          source: str = "checkpoint") -> Dict[str, Any]:
    """A copy of a whole optimiser state dict with the head parameters' per-row state cut to this
    rank's rows, ready for ``optimizer.load_state_dict``."""
    sd = {"state": dict(state_dict["state"]), "param_groups": copy.deepcopy(state_dict["param_groups"])}
    for idx, param in _head_indices(optimizer, clf).items():
        state = sd["state"].get(idx)
        if state is None:
            continue
        state = dict(state)
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() == param.dim() >= 1 and value.shape[1:] == param.shape[1:]:
                if value.shape[0] != clf.num_classes:
                    raise CheckpointError(
                        f"{source}: optimizer state {key!r} of a head parameter has {value.shape[0]} rows, the "
                        f"classifier {clf.num_classes}; resume with the dataset the checkpoint was trained on"
                    )
                # a copy, not a view: a view would keep the whole C x d tensor alive on every rank
                state[key] = value[clf.start:clf.end].clone()
        sd["state"][idx] = state
    return sd
