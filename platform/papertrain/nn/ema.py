"""An exponential moving average of the weights (Polyak & Juditsky 1992), as a callback of the loop.

    θ̄ ← β θ̄ + (1 - β) θ        after every `every`-th optimizer step, from step `start` on

Diffusion models (DDPM samples with β = 0.9999), GAN generators and many others evaluate and sample with
θ̄ rather than θ: the average smooths the last steps' noise. Configured as

    callbacks:
      ema: {_component_: papertrain.nn.ema.EMA, decay: 0.999}

it keeps θ̄ beside the model, checkpoints it as named state `callback.ema` (replicated: under FSDP2 each
rank keeps and saves the shard of θ̄ that matches its shard of θ, and the checkpoint reshards), and,
with `evaluate: true`, swaps θ̄ into the model for evaluation and samples, and θ back for training.
"""

from __future__ import annotations

from typing import Any

import torch

from papertrain.callbacks import Callback
from papertrain.config.constraints import NonNegativeInt, PositiveInt, Probability


class EMA(Callback):
    state_scope = "replicated"

    def __init__(self, decay: Probability = 0.999, every: PositiveInt = 1, start: NonNegativeInt = 0,
                 evaluate: bool = True):
        self.decay, self.every, self.start, self.evaluate = decay, every, start, evaluate
        self.shadow: dict[str, torch.Tensor] = {}
        self.updates = 0
        self._swapped: dict[str, torch.Tensor] | None = None

    def prepare(self, ctx: Any) -> None:
        self.model = ctx.raw_model
        self.shadow = {name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def after_step(self, ctx: Any, metrics: dict[str, Any]) -> None:
        if ctx.step <= self.start or ctx.step % self.every:
            return
        for name, p in self.model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1 - self.decay)  # θ̄ ← β θ̄ + (1 - β) θ
        self.updates += 1

    # -- evaluation and samples with θ̄ ------------------------------------------------------------------
    @torch.no_grad()
    def _swap_in(self) -> None:
        if not self.evaluate or self._swapped is not None:
            return
        parameters = dict(self.model.named_parameters())
        self._swapped = {name: parameters[name].detach().clone() for name in self.shadow}
        for name, average in self.shadow.items():
            parameters[name].copy_(average)

    @torch.no_grad()
    def _swap_out(self) -> None:
        if self._swapped is None:
            return
        parameters = dict(self.model.named_parameters())
        for name, trained in self._swapped.items():
            parameters[name].copy_(trained)
        self._swapped = None

    def before_evaluation(self, ctx: Any) -> None:
        self._swap_in()

    def after_evaluation(self, ctx: Any, metrics: dict[str, float]) -> None:
        self._swap_out()

    def before_sample(self, ctx: Any) -> None:
        self._swap_in()

    def after_sample(self, ctx: Any) -> None:
        self._swap_out()

    # -- named state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, tensor in state["shadow"].items():
                self.shadow[name].copy_(tensor)
        self.updates = state["updates"]
