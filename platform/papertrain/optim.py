"""The loop that the Adam-family optimizers of the recipes share, so that each recipe's file holds only
what its paper changes.

`ElementwiseOptimizer.step()` visits every parameter θ that has a gradient, creates its state on first
use (`new_state`), counts its steps t (from 1), applies weight decay, and hands the rest to `update`:

    L2 decay (the default):          g ← g + λθ               (the decay goes through the adaptive step)
    decoupled decay (AdamW's form):  θ ← θ - αλθ              (it does not)

Subclasses (the adam, radam, adabelief and sophia recipes) define `new_state(θ, group)` and
`update(θ, g, state, group, t)`, and say which group key switches the decoupled form on (or override
`decoupled`). `state_of` creates a parameter's state wherever it is first needed (Sophia-G's curvature
pass may come before its first step).
"""

from __future__ import annotations

from typing import Any

import torch

from papertrain.errors import PapertrainError


def check_hyperparameters(name: str, lr: float, eps: float, weight_decay: float, betas: tuple[float, float],
                          paper: str) -> None:
    """Clear errors for a negative rate, ε or decay and for betas outside [0, 1); `paper` names the defaults."""
    if lr < 0 or eps < 0 or weight_decay < 0:
        raise PapertrainError(f"{name}: lr={lr}, eps={eps} and weight_decay={weight_decay} must be >= 0",
                              f"use the paper's {paper}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise PapertrainError(f"{name}: betas={tuple(betas)} must lie in [0, 1)", f"use the paper's {paper}")


class ElementwiseOptimizer(torch.optim.Optimizer):
    """An optimizer whose update is elementwise per parameter, with a step count and optional weight decay."""

    decoupled_key = "decoupled_weight_decay"  # the group setting that selects AdamW's form of the decay

    def new_state(self, theta: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def update(self, theta: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
               t: int) -> None:
        """Move θ in place, given its (decayed) gradient g, its state and the step number t >= 1."""
        raise NotImplementedError

    def decoupled(self, group: dict[str, Any]) -> bool:
        """Whether this group's weight decay takes AdamW's form."""
        return bool(group[self.decoupled_key])

    def state_of(self, theta: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """θ's state, created on first use: its step count and `new_state`'s tensors."""
        state = self.state[theta]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state.update(self.new_state(theta, group))
        return state

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            for theta in group["params"]:
                if theta.grad is None:
                    continue
                state = self.state_of(theta, group)
                state["step"] += 1
                g = theta.grad
                if decay:
                    if self.decoupled(group):
                        theta.mul_(1 - lr * decay)  # θ ← θ - αλθ, outside the adaptive step
                    else:
                        g = g.add(theta, alpha=decay)  # L2: g ← g + λθ
                self.update(theta, g, state, group, int(state["step"].item()))
        return loss
