"""Deterministic sample order: an endless stream of per-epoch permutations.

Batch ``k`` holds stream positions ``[k·B, (k+1)·B)``; position ``p`` is sample
``perm(seed, p // N)[p % N]``. The order is a pure function of ``(seed, position)``, so resuming
after ``k`` batches is indexing, and per-sample randomness (augmentation, masks) can be seeded
from the stream position, independent of the number of loader workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from torch.utils.data import Sampler

from data2vec.masking import make_rng


class StreamBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields batches of ``(sample_index, stream_position)`` pairs, forever (or ``num_batches``).

    Args:
        num_samples: dataset size ``N``.
        batch_size: ``B``.
        seed: permutation seed.
        start_batch: first batch to yield (the number already consumed when resuming).
        num_batches: stop after this many batches in total (None = endless).
        shuffle: permute each epoch (False = dataset order, for evaluation).
        rank, world_size: take every ``world_size``-th batch slot for distributed training.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        start_batch: int = 0,
        num_batches: int | None = None,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self.num_batches = num_batches
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self._epoch = -1
        self._perm = np.arange(num_samples)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = (
                make_rng(self.seed, 0x5EED, epoch).permutation(self.n)
                if self.shuffle
                else np.arange(self.n)
            )
        return self._perm

    def batch(self, k: int) -> list[tuple[int, int]]:
        """Batch ``k`` of this rank: ``B`` pairs ``(sample_index, stream_position)``."""
        start = (k * self.world_size + self.rank) * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            out.append((int(self._order(pos // self.n)[pos % self.n]), pos))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        k = self.start_batch
        while self.num_batches is None or k < self.num_batches:
            yield self.batch(k)
            k += 1

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless stream has no length")
        return max(0, self.num_batches - self.start_batch)


class BucketedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Length-bucketed batches of ``(sample_index, stream_position)``, forever.

    Each epoch draws :func:`~data2vec.data.audio.length_buckets` from ``make_rng(seed, epoch)``
    (similar lengths together, batch order shuffled), so batch ``k`` is still a pure function of
    ``(seed, k)``: resuming is indexing. Positions are ``k·B + j`` and seed per-sample randomness.

    Args:
        lengths: ``(N,)`` sample lengths.
        indices: the usable samples (others are never drawn).
        batch_size: ``B`` (the last batch of a sorting chunk may be smaller).
        seed, start_batch, rank, world_size: as in :class:`StreamBatchSampler`.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        indices: np.ndarray,
        batch_size: int,
        seed: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(indices) == 0:
            raise ValueError("cannot sample from an empty dataset")
        self.lengths = np.asarray(lengths)
        self.indices = np.asarray(indices)
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self.rank = rank
        self.world_size = world_size
        self._epoch = -1
        self._batches: list[list[int]] = []

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            from data2vec.data.audio import length_buckets

            rng = make_rng(self.seed, 0xB0C5, epoch)
            local = length_buckets(self.lengths[self.indices], self.batch_size, rng)
            self._batches = [[int(self.indices[i]) for i in b] for b in local]
            self._epoch = epoch
        return self._batches

    def batch(self, k: int) -> list[tuple[int, int]]:
        g = k * self.world_size + self.rank
        per_epoch = len(self._epoch_batches(0)) if self._epoch < 0 else len(self._batches)
        batch = self._epoch_batches(g // per_epoch)[g % per_epoch]
        return [(index, g * self.batch_size + j) for j, index in enumerate(batch)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        k = self.start_batch
        while True:
            yield self.batch(k)
            k += 1


class Coverage:
    """Which samples of a dataset training has used: a bitmap over ``N`` sample indices.

    The loader yields only stream positions; the batch sampler maps batch ``k`` back to
    ``(sample_index, position)`` pairs, so a sample counts once one of its positions reaches
    the model (a bad input never does). Samplers without random access (streams) are not
    covered: :attr:`enabled` is False.
    """

    def __init__(self, sampler: object, num_samples: int) -> None:
        self.sampler = sampler
        self.enabled = hasattr(sampler, "batch") and num_samples > 0
        self.used = np.zeros(num_samples if self.enabled else 0, dtype=bool)

    def add(self, k: int, positions: Iterable[int]) -> None:
        """Mark the samples of batch ``k`` (this rank's) that arrived at ``positions``."""
        if not self.enabled:
            return
        index = {pos: i for i, pos in self.sampler.batch(k)}  # type: ignore[attr-defined]
        for pos in positions:
            self.used[index[int(pos)]] = True
