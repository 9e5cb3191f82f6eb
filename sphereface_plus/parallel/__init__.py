"""Model parallelism for the classifier: a row-sharded head over ``torch.distributed`` (docs/distributed.md).

- :func:`shard_range` -- rows ``[start, end)`` of rank r of W (a pure function of C, W, r);
- :class:`ShardedClassifier` -- a registered head holding one block of rows; exact cross-entropy and
  accuracy over all classes (:meth:`~ShardedClassifier.cross_entropy`,
  :meth:`~ShardedClassifier.num_correct`); optional Partial FC sampling (an approximation);
- :func:`sharded_classifier_mhe` -- the SphereFace+ MHE term of the whole classifier from the shards;
- :func:`gather_head_state` / :func:`load_head_state`, :func:`gather_optimizer_state` /
  :func:`shard_optimizer_state` -- checkpoints holding the whole C x d classifier, for any world size;
- the autograd-aware collectives underneath (:mod:`.collectives`).

Library code: it imports neither ``data_prep`` nor ``eval``.
"""
from __future__ import annotations

from sphereface_plus.parallel.checkpoint import (
    gather_head_state,
    gather_optimizer_state,
    gather_rows_to_rank0,
    load_head_state,
    shard_optimizer_state,
)
from sphereface_plus.parallel.classifier import (
    ShardedClassifier,
    ShardedLogits,
    block_labels,
    init_rows,
    sharded_cross_entropy,
    sharded_num_correct,
)
from sphereface_plus.parallel.collectives import (
    all_gather_labels,
    all_gather_rows,
    shard_range,
    shard_sizes,
    replicated_parameter,
    scale_grad,
    sum_partials,
    sum_replicated,
)
from sphereface_plus.parallel.mhe import SHARDED_MHE_MODES, sharded_classifier_mhe

PARALLEL_MODES = ("replicated", "sharded")  # head.parallel: the choices and their owner

__all__ = [
    "PARALLEL_MODES",
    "shard_range",
    "shard_sizes",
    "all_gather_rows",
    "all_gather_labels",
    "sum_replicated",
    "sum_partials",
    "replicated_parameter",
    "scale_grad",
    "ShardedClassifier",
    "ShardedLogits",
    "block_labels",
    "init_rows",
    "sharded_cross_entropy",
    "sharded_num_correct",
    "SHARDED_MHE_MODES",
    "sharded_classifier_mhe",
    "gather_rows_to_rank0",
    "gather_head_state",
    "load_head_state",
    "gather_optimizer_state",
    "shard_optimizer_state",
]
