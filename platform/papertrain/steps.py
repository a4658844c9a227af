"""One training step, and the context a recipe's own step works with.

Most papers minimise one loss with one optimizer, and their task says only `loss(model, batch)`: the
engine's `default_step` does the rest. A paper that needs more owns its step,

    def train_step(self, ctx: StepContext, batch) -> dict[str, Tensor]:     # in the recipe's task.py
        with ctx.autocast():
            d_loss = ...                                   # e.g. a GAN's discriminator update
        ctx.backward(d_loss)
        ctx.optimizer_step("discriminator")               # clip, step, zero the gradients, schedule
        ...
        return {"loss": g_loss, "d_loss": d_loss}          # logged as train/loss, train/d_loss

and the context gives it what the engine would otherwise do for it: the step number, the named
optimizers and schedulers, a backward pass through the strategy (autocast, fp16 loss scaling), gradient
clipping and the data-parallel reduction in `optimizer_step`, random numbers that are the same on every
rank (`ctx.random(name)`), and metric logging (`ctx.log`). Under every strategy that allows custom steps
(see `Strategy.capabilities`), the same step code runs unchanged on one process or N ranks.

The default step (`default_step`): each micro-batch's loss, a mean over the units the task counts, is
weighted by its share of the whole step's units, so the gradient is that of the global mean on any
number of ranks and micro-batches (data parallelism averages over W ranks, hence the factor W).
"""

from __future__ import annotations

import contextlib
import inspect
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from papertrain.errors import PapertrainError


class StepContext:
    """What a training step (and a callback, and `evaluate_all`) sees of the run."""

    def __init__(self, *, strategy: Any, model: nn.Module, raw_model: nn.Module, task: Any, data: Any,
                 optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any], trainer: Any, seed: int,
                 run_dir: Path, config: dict[str, Any] | None = None):
        self.strategy, self.model, self.raw_model = strategy, model, raw_model
        self.task, self.data = task, data
        self.optimizers, self.schedulers = optimizers, schedulers
        self.trainer, self.seed, self.run_dir = trainer, seed, run_dir
        self.config = config or {}  # the run's resolved config tree (what an artifact may derive its own from)
        self.device: torch.device = strategy.device
        self.step = 0  # optimizer steps completed: 0 while the first step runs
        self.micro_batches: list[Any] = []  # this rank's share of the step's batch, one per micro-batch
        self.unit_weights: list[float] = []
        self.units = 0  # units (tokens, samples, env steps) of the whole step, over all ranks
        self.grad_norm: Any = None
        self.memory_probe: Any = None
        self.memory: dict[str, float] | None = None
        self.logged: dict[str, torch.Tensor] = {}
        self.stop_reason: str | None = None  # set by request_stop
        self.loss_takes_context = takes_context(getattr(task, "loss", None))

    # -- the optimizers ---------------------------------------------------------------------------------
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The run's one optimizer (a config with several names them: use `optimizer_named`)."""
        if len(self.optimizers) == 1:
            return next(iter(self.optimizers.values()))
        if not self.optimizers:
            raise PapertrainError("the step asks for an optimizer, but this config has none (optimizer: null)",
                                  "add an `optimizer:` section")
        raise PapertrainError(f"the step asks for the optimizer, but this config has {len(self.optimizers)}: "
                              f"{', '.join(self.optimizers)}", "name one: ctx.optimizer_named(NAME)")

    def optimizer_named(self, name: str) -> torch.optim.Optimizer:
        if name not in self.optimizers:
            have = ", ".join(self.optimizers) or "none"
            raise PapertrainError(f"the step asks for optimizer '{name}', but the config has {have}",
                                  f"add optimizers.{name}: {{_component_: torch.optim.Adam, parameters: <submodule>}} "
                                  f"to the config, or use one of: {have}")
        return self.optimizers[name]

    def optimizer_step(self, name: str | None = None, clip: float | None | str = "config",
                       advance_schedule: bool = True) -> Any:
        """Step optimizer `name` (default: the only one): finish its gradients across ranks, unscale, clip
        (trainer.grad_clip unless `clip` says otherwise), step, clear every gradient, advance its schedule
        (`advance_schedule=False` for a step that takes many optimizer steps but counts as one, like PPO's
        epochs over a rollout: call `ctx.advance_schedule(name)` once instead).
        Returns the gradient norm before clipping (None without clipping)."""
        optimizer = self.optimizer if name is None else self.optimizer_named(name)
        max_norm = self.trainer.grad_clip if clip == "config" else clip
        parameters = None if len(self.optimizers) == 1 else [p for g in optimizer.param_groups for p in g["params"]]
        norm = self.strategy.clip_and_step(self.model, optimizer, max_norm, parameters)
        if self.memory_probe is not None and self.memory is None:  # once: gradients and state now exist
            self.memory = self.memory_probe.measure(self.model)
        # no gradient survives an optimizer step, this one's or another's (a GAN's discriminator loss leaves
        # gradients in the generator too): each backward-and-step starts from zero, and a step is the same
        # after a resume, which never saves gradients
        for other in self.optimizers.values():
            self.strategy.zero_grad(other)
        if advance_schedule:
            self.advance_schedule(name)
        self.grad_norm = norm
        return norm

    def advance_schedule(self, name: str | None = None) -> None:
        """One step of the learning-rate schedule of optimizer `name` (default: the only one)."""
        scheduler = self.schedulers.get(name or next(iter(self.optimizers), ""))
        if scheduler is not None:
            scheduler.step()

    def request_stop(self, reason: str) -> None:
        """End the run after this step, as a completed run (a goal reached, an episode budget spent)."""
        self.stop_reason = reason

    # -- computing --------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's mixed precision (bf16/fp16 autocast, or nothing under fp32 and FSDP2's own policy)."""
        return self.strategy.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward() through the strategy (fp16 loss scaling)."""
        self.strategy.backward(loss)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The task's loss of one micro-batch (given this context when its signature asks for `ctx`)."""
        if self.loss_takes_context:
            return self.task.loss(model, batch, ctx=self)
        return self.task.loss(model, batch)

    def forward_backward(self, loss: Any, micro_batches: list[Any], weights: list[float]
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The strategy's forward and backward passes of `loss(model, batch)` over micro-batches (as the
        default step runs them: a pipeline schedules them over its stages)."""
        return self.strategy.forward_backward(self.model, loss, micro_batches, weights)

    # -- randomness and metrics -------------------------------------------------------------------------
    def random(self, name: str, device: torch.device | str | None = None) -> torch.Generator:
        """A generator seeded by (run seed, step, name): the same numbers on every rank, and again after a
        resume. Draw a whole global batch's worth and keep `ctx.local(...)` of it, and the result does not
        depend on how the batch is split over ranks."""
        seed = (self.seed * 1_000_003 + self.step) * 1_000_003 + zlib.crc32(name.encode())
        return torch.Generator(device=device or self.device).manual_seed(seed % 2**63)

    def local(self, global_batch: torch.Tensor) -> torch.Tensor:
        """This rank's share (its contiguous rows) of a tensor whose first dimension is the global batch."""
        world, rank = self.strategy.data_world_size, self.strategy.data_rank
        if global_batch.shape[0] % world:
            raise PapertrainError(f"a global batch of {global_batch.shape[0]} does not split into {world} ranks",
                                  f"use a multiple of {world}")
        return global_batch.view(world, -1, *global_batch.shape[1:])[rank]

    def log(self, **values: Any) -> None:
        """Extra training metrics of this step (train/<name>), averaged over ranks at each logged line."""
        for key, value in values.items():
            self.logged[key] = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))


def takes_context(loss: Any) -> bool:
    if not callable(loss):
        return False
    try:
        return "ctx" in inspect.signature(loss).parameters
    except (TypeError, ValueError):
        return False


def step_units(ctx: StepContext, count: Any) -> None:
    """The units of this rank's micro-batches, summed over ranks, and each micro-batch's weight (its share
    of the step's units, times W): one small all-reduce per step."""
    local = [count(batch) for batch in ctx.micro_batches]
    total = max(1.0, ctx.strategy.sum_across_ranks({"units": float(sum(local))})["units"])
    ctx.units = int(total)
    ctx.unit_weights = [units * ctx.strategy.data_world_size / total for units in local]


def default_step(ctx: StepContext) -> dict[str, torch.Tensor]:
    """One optimizer step of the task's loss over the step's micro-batches (see the module docstring)."""
    total, parts = ctx.forward_backward(ctx.loss, ctx.micro_batches, ctx.unit_weights)
    ctx.optimizer_step()
    return {"loss": total, **parts}
