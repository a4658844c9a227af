"""Where a step's batch comes from: the protocol every data component follows.

- **Indexed data** (`data.train` / `data.val`, each with `__len__` and `batch(indices)`): the step's global
  batch is `EpochSampler.indices(step)`, a pure function of (seed, step), and each rank takes its share of
  each micro-batch. Resuming needs no state, and any world size sees the same global batch.
- **A stateful source** (`next_batch(ctx)`, plus `state_dict()` / `load_state_dict()`): environments an
  agent acts in, ordered segment streams whose carried memory continues from step to step. It produces
  this rank's batch itself (it may use `ctx.raw_model`, e.g. to act), and its state is saved as named
  state `data` in every checkpoint, so a resumed run continues exactly where it stopped.
- **No data** (`data: null`): a solver (CFR) computes everything in its own step.
"""

from __future__ import annotations

from typing import Any

import torch

from papertrain.data.sampler import EpochSampler, shard
from papertrain.errors import PapertrainError


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def is_stateful_source(data: Any) -> bool:
    return callable(getattr(data, "next_batch", None))


class IndexedBatches:
    """The micro-batches of step s for this rank: its share of `EpochSampler.indices(s)`."""

    def __init__(self, data: Any, batch_size: int, accumulation: int, seed: int, strategy: Any):
        if len(data.train) == 0:
            raise PapertrainError("the training split is empty", "check the data section (its size settings)")
        self.data, self.accumulation, self.strategy = data, accumulation, strategy
        self.sampler = EpochSampler(len(data.train), batch_size, seed=seed)

    def micro_batches(self, step: int) -> list[Any]:
        indices = self.sampler.indices(step)
        strategy = self.strategy
        return [to_device(self.data.train.batch(shard(indices, strategy.data_rank, strategy.data_world_size,
                                                      self.accumulation, micro)), strategy.device)
                for micro in range(self.accumulation)]

    def position(self, step: int) -> dict[str, Any]:
        return {"step": step, "epoch": self.sampler.epoch_of(step)}


class SourceBatches:
    """A stateful source's batch for this rank (one micro-batch: the source decides its size)."""

    def __init__(self, data: Any, strategy: Any):
        self.data, self.strategy = data, strategy

    def micro_batches(self, ctx: Any) -> list[Any]:
        return [to_device(self.data.next_batch(ctx), self.strategy.device)]

    def position(self, step: int) -> dict[str, Any]:
        return {"step": step}
