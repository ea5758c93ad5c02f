"""Which examples each rank trains on, micro-batch by micro-batch: a pure function of (seed, epoch).

An epoch's order is a seeded permutation of the examples (or, for a mixture, of the examples drawn
from each source by weight). Because nothing depends on what ran before, ``batches(epoch, start=k)``
resumes exactly at micro-batch ``k``. Everything is held in numpy arrays of one int64 per example.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

GROUP_WINDOW_BATCHES = 64
"""Length grouping sorts windows of this many batches: similar lengths, yet still a shuffled epoch."""


def _permutation(size: int, generator: torch.Generator) -> np.ndarray:
    return torch.randperm(size, generator=generator).numpy()


@dataclass(frozen=True)
class Mixture:
    """Sources concatenated in one index space, each drawn from by weight every epoch.

    An epoch has ``round(N * weight / sum(weights))`` examples of each source, where ``N`` is the
    number of examples of all sources. A source gives them without replacement from its own
    permutation for (seed, epoch, source), and from fresh permutations after that when it is
    upsampled, so no example repeats before the whole source has been seen.
    """

    sizes: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def counts(self) -> list[int]:
        total, weight_sum = sum(self.sizes), sum(self.weights)
        return [round(total * weight / weight_sum) for weight in self.weights]

    def draw(self, seed: int, epoch: int) -> np.ndarray:
        """Indices of the epoch's examples, source after source (shuffled by the sampler)."""
        drawn, start = [], 0
        for source, (size, count) in enumerate(zip(self.sizes, self.counts)):
            # One independent stream per (seed, epoch, source): the spawn key tells the sources apart.
            generator = np.random.default_rng(np.random.SeedSequence([seed, epoch], spawn_key=(source + 1,)))
            cycles = max(1, -(-count // size))
            drawn.append(np.concatenate([generator.permutation(size) for _ in range(cycles)])[:count] + start)
            start += size
        return np.concatenate(drawn)


@dataclass
class BatchSampler:
    """Micro-batches of example indices: shuffled per epoch from ``seed``, sharded by rank.

    With ``lengths``, each window of 64 batches is sorted by length before it is cut into batches,
    so a batch holds examples of similar length and little padding; the batches are then shuffled
    again. Each rank takes every ``world_size``-th batch of the epoch's global order (which does not
    depend on the rank or the world size); trailing batches that would leave ranks unequal are not
    used in that epoch (they come back in a later shuffle).
    """

    num_examples: int
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    lengths: Sequence[int] | None = None
    mixture: Mixture | None = None
    """Draw each epoch from several sources by weight instead of taking every example once."""
    _cache: tuple[int, np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.lengths is not None:
            self.lengths = np.asarray(self.lengths)

    @property
    def epoch_size(self) -> int:
        return sum(self.mixture.counts) if self.mixture else self.num_examples

    def __len__(self) -> int:
        """Micro-batches per epoch for this rank (the last partial batch is kept)."""
        return -(-self.epoch_size // self.batch_size) // self.world_size

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's example order, and the order in which its ``batch_size`` slices are taken."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        # The same generator and draws as the list-based sampler before it: a run resumes in its order.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if self.mixture is None:
            order = _permutation(self.num_examples, generator)
        else:
            drawn = self.mixture.draw(self.seed, epoch)
            order = drawn[_permutation(len(drawn), generator)]
        batches = -(-len(order) // self.batch_size)
        if self.lengths is None:
            batch_order = np.arange(batches)
        else:
            window = np.arange(len(order)) // (self.batch_size * GROUP_WINDOW_BATCHES)
            order = order[np.lexsort((self.lengths[order], window))]  # stable: ties keep the shuffled order
            # The last batch may be partial; it stays last so every other batch is full.
            batch_order = np.append(_permutation(batches - 1, generator), batches - 1)
        self._cache = (epoch, order, batch_order)
        return order, batch_order

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """This rank's micro-batches of ``epoch`` from its ``start``-th on."""
        order, batch_order = self._epoch(epoch)
        for local in range(start, len(self)):
            first = int(batch_order[local * self.world_size + self.rank]) * self.batch_size
            yield order[first : first + self.batch_size].tolist()
