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

Two ways of cutting the stream into batches:

- the default stream (face training): batches run across epoch boundaries, every image is used
  equally often;
- ``drop_last=True`` (the MHE CIFAR recipe): each epoch is ``floor(N / B)`` whole batches of its
  permutation and the remainder is dropped, as the reference's 390 batches of 128 per epoch did.
  A trainer that keeps its data as tensors (CIFAR, the GAN) reads :meth:`ResumableSampler.batch_indices`
  directly instead of going through a ``DataLoader``.

:func:`derive_seed` and :func:`step_generator` give any other per-iteration randomness (augmentation
offsets, GAN noise) as a pure function of ``(seed, stream, iteration)``, so it is reproduced on resume.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler

from sphereface_plus.errors import UsageError

__all__ = ["ResumableSampler", "derive_seed", "step_generator"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed (numpy ``SeedSequence``): distinct parts, independent streams."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def step_generator(seed: int, stream: int, iteration: int) -> torch.Generator:
    """A CPU generator for the randomness of one iteration (``stream`` tells apart its uses)."""
    return torch.Generator().manual_seed(derive_seed(seed, stream, iteration))


def _linear_epoch_seed(seed: int, shuffle_round: int, epoch: int) -> int:
    # the face trainer's original per-epoch seed, kept so that earlier runs reproduce bit for bit
    return (seed * 1_000_003 + shuffle_round * 7_919 + epoch) % (2**63 - 1)


class ResumableSampler(Sampler):
    """Yields this rank's ``(index, flip)`` for iterations ``start_iter .. total_iters - 1``.

    Args:
        num_samples: dataset length N.
        global_batch: B, the batch of one optimisation step summed over all ranks.
        total_iters: the last iteration (exclusive) to produce.
        rank, world_size: this process and the number of processes; B must divide by world_size.
        seed: data-order seed; ``shuffle_round`` is mixed in after a NaN rollback to change the order.
        flip: draw random horizontal flips (else always False).
        drop_last: epochs of ``floor(N / B)`` whole batches (see the module docstring).
        epoch_seed: ``epoch -> seed`` of that epoch's permutation; default: the face trainer's rule
            from ``(seed, shuffle_round, epoch)``.
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
        drop_last: bool = False,
        epoch_seed: Optional[Callable[[int], int]] = None,
    ):
        if num_samples <= 0:
            raise UsageError("the training set is empty")
        if drop_last and global_batch > num_samples:
            raise UsageError(f"batch size {global_batch} is larger than the training set ({num_samples} images)")
        if global_batch % world_size:
            raise UsageError(
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
        self.drop_last = bool(drop_last)
        self.steps_per_epoch = self.num_samples // self.global_batch if drop_last else None
        self._epoch_seed = epoch_seed or (lambda e: _linear_epoch_seed(self.seed, self.shuffle_round, e))
        self._cache: Optional[Tuple[int, torch.Tensor, List[int], List[bool]]] = None

    def _draw(self, epoch: int) -> Tuple[torch.Tensor, List[int], List[bool]]:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator()
            g.manual_seed(self._epoch_seed(epoch))  # distinct, reproducible stream per epoch
            perm = torch.randperm(self.num_samples, generator=g)
            if self.flip:  # drawn after the permutation: flip=False leaves the same data order
                flips = [bool(f) for f in torch.randint(0, 2, (self.num_samples,), generator=g).tolist()]
            else:
                flips = [False] * self.num_samples
            self._cache = (epoch, perm, perm.tolist(), flips)  # lists: fast per-item access
        return self._cache[1], self._cache[2], self._cache[3]

    def _epoch(self, epoch: int) -> Tuple[List[int], List[bool]]:
        _, perm, flips = self._draw(epoch)
        return perm, flips

    def batch_indices(self, iteration: int) -> torch.Tensor:
        """This rank's dataset indices of ``iteration`` as a LongTensor (both batch layouts)."""
        if self.drop_last:
            epoch, pos = divmod(iteration, self.steps_per_epoch)
            perm = self._draw(epoch)[0]
            start = pos * self.global_batch + self.rank * self.local_batch
            return perm[start : start + self.local_batch]
        return torch.tensor([i for i, _ in self._items(iteration)], dtype=torch.long)

    def _items(self, iteration: int) -> Iterator[Tuple[int, bool]]:
        for p in self.positions(iteration):
            perm, flips = self._epoch(p // self.num_samples)
            off = p % self.num_samples
            yield perm[off], flips[off]

    def positions(self, iteration: int) -> range:
        start = iteration * self.global_batch + self.rank * self.local_batch
        return range(start, start + self.local_batch)

    def __iter__(self) -> Iterator[Tuple[int, bool]]:
        for it in range(self.start_iter, self.total_iters):
            if self.drop_last:
                epoch, pos = divmod(it, self.steps_per_epoch)
                _, perm, flips = self._draw(epoch)
                start = pos * self.global_batch + self.rank * self.local_batch
                for off in range(start, start + self.local_batch):
                    yield perm[off], flips[off]
            else:
                yield from self._items(it)

    def __len__(self) -> int:
        return max(0, self.total_iters - self.start_iter) * self.local_batch
