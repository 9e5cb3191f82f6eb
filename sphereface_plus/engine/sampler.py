"""A deterministic, resumable, distributed-aware sampler for iteration-based training.

The training stream is an endless sequence of sample positions ``p = 0, 1, 2, ...``; position ``p``
falls in epoch ``p // N`` at offset ``p % N`` and maps to ``perm_epoch[offset]``, where
``perm_epoch`` is a permutation drawn from a generator seeded with ``(seed, epoch)`` only. Global
batch ``i`` is positions ``[i*B, (i+1)*B)``; rank ``r`` of ``K`` takes the contiguous slice
``[i*B + r*B/K, i*B + (r+1)*B/K)``. Hence:

- the data order depends on the seed alone, not on the number of workers or processes, so a 2-process
  run sees exactly the global batches of a 1-process run;
- resuming at iteration ``i`` is just starting at position ``i*B`` (no state besides the iteration);
- the random horizontal flip of each position is drawn from the same per-epoch generator, so the
  augmentation is reproduced exactly on resume too (worker RNG plays no part).

It yields ``(dataset_index, flip)`` pairs that the training datasets understand.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler):
    """Yields this rank's ``(index, flip)`` for iterations ``start_iter .. total_iters - 1``.

    Args:
        num_samples: dataset length N.
        global_batch: B, the batch of one optimisation step summed over all ranks.
        total_iters: the last iteration (exclusive) to produce.
        rank, world_size: this process and the number of processes; B must divide by world_size.
        seed: data-order seed; ``shuffle_round`` is mixed in after a NaN rollback to change the order.
        flip: draw random horizontal flips (else always False).
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        total_iters: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        flip: bool = True,
        start_iter: int = 0,
        shuffle_round: int = 0,
    ):
        if num_samples <= 0:
            raise ValueError("the training set is empty")
        if global_batch % world_size:
            raise ValueError(
                f"train.batch_size={global_batch} must be divisible by the number of processes ({world_size})"
            )
        self.num_samples = int(num_samples)
        self.global_batch = int(global_batch)
        self.local_batch = self.global_batch // world_size
        self.total_iters = int(total_iters)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.flip = bool(flip)
        self.start_iter = int(start_iter)
        self.shuffle_round = int(shuffle_round)
        self._cache: Tuple[int, List[int], List[bool]] | None = None

    def _epoch(self, epoch: int) -> Tuple[List[int], List[bool]]:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator()
            # distinct, reproducible stream per (seed, round, epoch)
            g.manual_seed((self.seed * 1_000_003 + self.shuffle_round * 7_919 + epoch) % (2**63 - 1))
            perm = torch.randperm(self.num_samples, generator=g)
            flips = torch.randint(0, 2, (self.num_samples,), generator=g, dtype=torch.uint8)
            if not self.flip:
                flips.zero_()
            self._cache = (epoch, perm.tolist(), [bool(f) for f in flips.tolist()])  # lists: fast per-item access
        return self._cache[1], self._cache[2]

    def positions(self, iteration: int) -> range:
        start = iteration * self.global_batch + self.rank * self.local_batch
        return range(start, start + self.local_batch)

    def __iter__(self) -> Iterator[Tuple[int, bool]]:
        for it in range(self.start_iter, self.total_iters):
            for p in self.positions(it):
                perm, flips = self._epoch(p // self.num_samples)
                off = p % self.num_samples
                yield perm[off], flips[off]

    def __len__(self) -> int:
        return max(0, self.total_iters - self.start_iter) * self.local_batch

    def state_dict(self) -> Dict[str, int]:
        return {"seed": self.seed, "shuffle_round": self.shuffle_round, "num_samples": self.num_samples,
                "global_batch": self.global_batch}
