"""Which examples each optimizer step sees, as a pure function of (seed, step).

Training walks through epochs; each epoch is a fresh permutation seeded by (seed, epoch), and step s
takes the global indices [s·B, (s+1)·B) of that endless stream. Because nothing but the step number
decides a batch, resuming needs no data-loader state, and every world size sees the same global batch:
rank r of W takes its contiguous share (see `shard`).
"""

from __future__ import annotations

import torch


class EpochSampler:
    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True):
        if num_examples <= 0:
            raise ValueError("cannot sample from an empty data set")
        self.n = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._permutations: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            if len(self._permutations) > 2:  # keep memory flat on long runs
                self._permutations.pop(min(self._permutations))
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._permutations[epoch] = torch.randperm(self.n, generator=generator)
            else:
                self._permutations[epoch] = torch.arange(self.n)
        return self._permutations[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """The global batch of step `step`: [batch_size] example indices."""
        start = step * self.batch_size
        pieces, needed = [], self.batch_size
        epoch, offset = divmod(start, self.n)
        while needed > 0:
            take = min(needed, self.n - offset)
            pieces.append(self._order(epoch)[offset:offset + take])
            needed -= take
            epoch, offset = epoch + 1, 0
        return torch.cat(pieces)

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.n


def evaluation_indices(num_examples: int, count: int) -> torch.Tensor:
    """A fixed, evenly spread subset of a validation set: the same examples at every evaluation."""
    count = min(count, num_examples)
    return torch.linspace(0, num_examples - 1, count).round().long()


def shard(indices: torch.Tensor, rank: int, world_size: int, accumulation: int, micro_step: int) -> torch.Tensor:
    """This rank's share of a global batch, micro-batch `micro_step` of `accumulation`."""
    per_rank = indices.view(world_size, -1)[rank]
    return per_rank.view(accumulation, -1)[micro_step]
