"""The Gauss-Newton-Bartlett pass of Sophia-G (Algorithm 2), as a callback of the training loop.

An optimizer sees gradients, never the model or the batch, but the estimator needs both: ĝ is the
gradient of the loss on labels ŷ drawn from the model's own predictions. `SophiaG.callbacks()` hands the
loop this callback, so choosing `optimizer: SophiaG` in a config is all it takes.

Before every k-th step (k = `curvature_every`; steps k, 2k, ... counting from 0, as the authors' code does),
`before_step` runs the step's own micro-batches once more, through the task's `sampled_loss` and the
same forward/backward path as training, so ĝ is reduced across ranks (all-reduced, reduce-scattered,
gathered by ZeRO's hooks) exactly as g is. The strategy then finishes those gradients as on any step
(unscaling, gathering shards), without clipping, and the optimizer's `update_curvature(B)` replaces its
`step()`: h ← β₂ h + (1 - β₂) B ĝ⊙ĝ, B being the step's units (every sampled label). The gradients are
then cleared, and the step itself runs as if nothing happened.

One generator per example, seeded from (seed, step, its place in the global batch): the labels do not
depend on how the batch is split over ranks and micro-batches, and a resumed run draws them again
exactly. The curvature h is optimizer state, so it is checkpointed with the optimizer.
"""

from __future__ import annotations

from typing import Any

import torch

from papertrain.data.sampler import shard
from papertrain.errors import PapertrainError
from papertrain.strategies.base import REPEATED_BACKWARD


class _CurvatureStep:
    """Stands in for the optimizer in `strategy.clip_and_step`: its `step()` updates the curvature estimate
    from the gradients instead of the parameters; everything else (param_groups, state) is the optimizer's."""

    def __init__(self, optimizer: Any, num_samples: int):
        self.optimizer, self.num_samples = optimizer, num_samples

    def step(self, closure: Any = None) -> None:
        self.optimizer.update_curvature(self.num_samples)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


class GaussNewtonBartlett:
    """Refreshes a SophiaG optimizer's curvature every `optimizer.curvature_every` steps."""

    needs = frozenset({REPEATED_BACKWARD})

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer

    def prepare(self, ctx: Any) -> None:
        """Before any work: the task can sample labels, and the strategy can run a second backward pass."""
        if not callable(getattr(ctx.task, "sampled_loss", None)):
            raise PapertrainError(f"SophiaG estimates curvature from labels sampled from the model, but the task "
                                  f"{type(ctx.task).__name__} has no sampled_loss(model, batch, generators)",
                                  "use another optimizer, or give the task a sampled_loss (see LanguageModelTask)")
        every = self.optimizer.curvature_every
        if ctx.trainer.max_steps > every and REPEATED_BACKWARD not in ctx.strategy.capabilities:
            raise PapertrainError(f"SophiaG refreshes its curvature every {every} steps with an extra backward pass, "
                                  f"which strategy={ctx.strategy.name} cannot run (its engine steps the optimizer "
                                  "inside backward, or schedules the passes itself)",
                                  "use strategy=fsdp2 (sharded like ZeRO-3) or strategy=ddp")

    def before_step(self, ctx: Any) -> None:
        every = self.optimizer.curvature_every
        if ctx.step == 0 or ctx.step % every:
            return
        sampled_loss = ctx.task.sampled_loss
        strategy, trainer = ctx.strategy, ctx.trainer
        positions = torch.arange(trainer.batch_size)
        generators = iter([[torch.Generator(device=ctx.device).manual_seed(
                                ((ctx.seed * 1_000_003 + ctx.step) * 1_000_003 + int(p)) % 2**63)
                            for p in shard(positions, strategy.data_rank, strategy.data_world_size,
                                           trainer.grad_accum_steps, micro)]
                           for micro in range(trainer.grad_accum_steps)])

        def on_sampled_labels(model: Any, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            # a strategy computes a step's micro-batches once each, in order: each takes the next generators
            return sampled_loss(model, batch, next(generators)), {}

        ctx.forward_backward(on_sampled_labels, ctx.micro_batches, ctx.unit_weights)
        strategy.clip_and_step(ctx.model, _CurvatureStep(self.optimizer, ctx.units), None)
        strategy.zero_grad(self.optimizer)
