"""What a recipe's task and data provide to the trainer.

A recipe's `task.py` defines a class with these methods (no base class needed); its `data` section
builds an object with `.train` and `.val` data sets. The trainer calls nothing else.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


class Examples(Protocol):
    """A data split: numbered examples, gathered into a batch by index."""

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor) -> Batch: ...


class Data(Protocol):
    train: Examples
    val: Examples


class Task(Protocol):
    unit: str  # what throughput counts: "tokens" or "samples"

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one micro-batch as a MEAN over the units `count(batch)` counts, and
        extra metrics to log (detached, also means over those units). The trainer weights micro-batches
        by their units, so the step's loss is the mean over all its units on any number of ranks."""
        ...

    def evaluate(self, model: nn.Module, batch: Batch) -> dict[str, float | torch.Tensor | tuple[float, float]]:
        """Validation metrics of one batch: means over `count(batch)` units, or `(total, count)` pairs for a
        metric with a unit of its own (e.g. exactly decoded sequences). Aggregated over the whole eval set."""
        ...

    def count(self, batch: Batch) -> int:
        """How many `unit`s the batch holds: what the loss is a mean over (tokens, non-padding tokens, samples)."""
        ...


class OptionalTaskHooks(Protocol):
    def prepare(self, model: nn.Module, data: Any) -> None:
        """Check that model and data fit together (e.g. vocabulary sizes); raise PapertrainError if not."""
        ...

    def sample(self, model: nn.Module, data: Any, generator: torch.Generator) -> dict[str, Any]:
        """Named samples to save: text (str), images (a [N, C, H, W] or [C, H, W] tensor in [0, 1]) or a
        matplotlib figure; numbers (int, float) are logged as metrics `sample/<name>`. (With a `ctx`
        parameter, it is given the loop's StepContext; so are `loss` and `evaluate`.)"""
        ...

    def train_step(self, ctx: Any, batch: Any) -> dict[str, torch.Tensor]:
        """The task's own training step instead of the default one (papertrain/steps.py): any backward passes
        and optimizer steps through the context; returns metrics ("loss" is train/loss). `batch` is this
        rank's share of the step's batch, or None without data."""
        ...

    def evaluate_all(self, ctx: Any) -> dict[str, float | tuple[float, float]]:
        """The whole evaluation at once (episodes, exploitability, generated samples), instead of `evaluate`
        over validation batches: means, or (total, count) pairs that are summed over ranks."""
        ...

    def artifacts(self, ctx: Any) -> dict[str, Any]:
        """What must be built once before training (papertrain/artifacts.py); `use_artifacts(built)` then
        receives them loaded."""
        ...

    def callbacks(self) -> dict[str, Any]:
        """Callbacks this task needs (papertrain/callbacks.py), by name. (Models, optimizers and data may have
        this method too: Sophia's optimizer ships its curvature pass this way.)"""
        ...

    # state_dict() / load_state_dict(state): the task's own state, checkpointed as named state "task"
    # solver = True: trains without an optimizer (a solver, e.g. CFR); only strategy=single runs it
