"""
# Sophia-G (Liu, Li, Hall, Liang & Ma, 2023)

"Sophia: A Scalable Stochastic Second-order Optimizer for Language Model Pre-training" steps each
coordinate by its gradient divided by its *curvature*, the diagonal of the Hessian, as Newton's method
would, and guards against the two ways that goes wrong: the estimate is noisy, and the loss of a
language model is not convex (negative or tiny curvature would send Newton's step the wrong way or to
infinity). Its answer: a moving average of a cheap, positive diagonal curvature estimate h_t, refreshed
only every k steps, and a per-coordinate *clip* of the pre-conditioned step.

## The update (Algorithm 3)

    m_t = β₁ m_{t-1} + (1 - β₁) g_t                       momentum of the mini-batch gradient g_t
    h_t = β₂ h_{t-k} + (1 - β₂) ĥ_t    every k steps      EMA of the diagonal curvature estimate ĥ_t
    h_t = h_{t-1}                       otherwise
    θ_t ← θ_t - η λ θ_t                                     decoupled weight decay (as AdamW)
    θ_{t+1} = θ_t - η · clip(m_t / max{γ h_t, ε}, 1)      clip(z, 1) = max{min{z, 1}, -1}, per coordinate

Where the curvature is large and well estimated, the step is η m_t/(γ h_t), a Newton step scaled by
η/γ: flat directions (small h) get long steps and sharp ones (large h) short steps, which Adam's
division by the gradient's scale cannot tell apart. Where h is tiny or zero (or the estimate is
stale), m/(γh) is huge and the clip makes the step η·sign(m_t): signSGD with momentum. So no
coordinate ever moves by more than η per step: the paper's safeguard against a wrong curvature
estimate, and what keeps the method stable on non-convex losses.
Defaults from the paper: β₁ = 0.965, β₂ = 0.99, γ = 0.01, ε = 10⁻¹², k = 10, λ = 0.2.

## The Gauss-Newton-Bartlett estimator (Algorithm 2), the "G" of Sophia-G

For a loss ℓ(f(θ, x), y) that is the negative log-likelihood of a softmax, the Gauss-Newton matrix
Jᵀ S J (J = ∂f/∂θ, S = ∂²ℓ/∂f² = diag(p) - ppᵀ with p = softmax(f)) is a positive semi-definite
approximation of the Hessian. Bartlett's second identity says S is the covariance of the score of
labels drawn from the model itself: for ŷ ~ softmax(f), E[∇_f ℓ(f, ŷ)] = 0 and
E[∇_f ℓ(f, ŷ) ∇_f ℓ(f, ŷ)ᵀ] = diag(p) - ppᵀ. So, for a mini-batch of B inputs:

    draw ŷ_b ~ softmax(f(θ, x_b)) for every b,     ĝ = ∇_θ (1/B) Σ_b ℓ(f(θ, x_b), ŷ_b),     ĥ = B · ĝ ⊙ ĝ

and E[ĥ] = (1/B) Σ_b diag(J_bᵀ (diag(p_b) - p_b p_bᵀ) J_b), the diagonal of the Gauss-Newton matrix of
the mean loss (the cross terms between different b vanish in expectation). The cost is one extra
forward and backward pass every k steps. For a language model every token is one of the B inputs, so
B is the number of tokens in the (global) batch.

## How this plugs into the training loop

The estimator needs the model and the batch, which an optimizer does not have. So the optimizer ships a
callback of the loop (`callbacks()` below, the pass itself in curvature.py): at the start of every k-th
step it runs the step's micro-batches through `task.sampled_loss` (labels drawn from the model's own
predictions) with the same forward/backward path as training, so ĝ is reduced across ranks exactly as
g is, and calls `update_curvature(B)`, which reads ĝ from each parameter's `.grad`. The curvature h
lives in the optimizer's state, so it is checkpointed and a resumed run continues exactly.

**When ĥ is computed.** Algorithm 3 refreshes h when t mod k = 1 (t = 1, k+1, 2k+1, ...: the very first
step included), before the step. The authors' code refreshes it after every k-th step, from h = 0, so
the first k steps are clipped, signSGD-with-momentum steps of size η. We follow the code: the pass runs
before steps k, 2k, 3k, ... (0-based), at the parameters that step's gradient is taken at.
"""

from __future__ import annotations

from typing import Annotated, Any, Iterable

import torch

from papertrain.config.constraints import NonNegativeFloat, PositiveFloat, PositiveInt, Range
from papertrain.errors import PapertrainError
from papertrain.optim import ElementwiseOptimizer


class SophiaG(ElementwiseOptimizer):
    """Sophia with the Gauss-Newton-Bartlett curvature estimator (Algorithm 3). The loop over parameters and
    the decoupled decay (applied before the step, as θ ← θ - ηλθ) are `papertrain.optim.ElementwiseOptimizer`'s."""

    def __init__(self, params: Iterable, lr: NonNegativeFloat = 1e-4,
                 betas: tuple[Annotated[float, Range(ge=0, lt=1)], Annotated[float, Range(ge=0, lt=1)]] = (0.965, 0.99),
                 gamma: PositiveFloat = 0.01, eps: PositiveFloat = 1e-12, weight_decay: NonNegativeFloat = 0.2,
                 curvature_every: PositiveInt = 10):
        if lr < 0 or weight_decay < 0:
            raise PapertrainError(f"SophiaG: lr={lr} and weight_decay={weight_decay} must be >= 0",
                                  "use e.g. lr=1e-4 and the paper's weight_decay=0.2")
        if gamma <= 0 or eps <= 0:
            raise PapertrainError(f"SophiaG: gamma={gamma} and eps={eps} must be > 0 (the step divides by "
                                  "max(γ·h, ε))", "use the paper's gamma=0.01 and eps=1e-12")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise PapertrainError(f"SophiaG: betas={tuple(betas)} must lie in [0, 1)",
                                  "use the paper's (0.965, 0.99)")
        if not isinstance(curvature_every, int) or isinstance(curvature_every, bool) or curvature_every < 1:
            raise PapertrainError(f"SophiaG: curvature_every={curvature_every!r} must be a whole number of steps >= 1",
                                  "use the paper's k = 10")
        # read by the curvature pass (curvature.py): refresh ĥ and h before every k-th step
        self.curvature_every = curvature_every
        super().__init__(params, dict(lr=lr, betas=tuple(betas), gamma=gamma, eps=eps, weight_decay=weight_decay))

    @classmethod
    def required_capabilities(cls, arguments: dict[str, Any], tree: dict[str, Any]) -> set[str]:
        """A run longer than k steps takes the curvature pass, a second backward pass (papertrain validate
        refuses a strategy that cannot run one, such as DeepSpeed's engine)."""
        from papertrain.strategies.base import REPEATED_BACKWARD

        long_enough = tree.get("trainer", {}).get("max_steps", 0) > arguments.get("curvature_every", 10)
        return {REPEATED_BACKWARD} if long_enough else set()

    def callbacks(self) -> dict[str, Any]:
        """The training loop's hook that refreshes ĥ every `curvature_every` steps (curvature.py)."""
        from papertrain.recipes.optim.sophia.curvature import GaussNewtonBartlett

        return {"sophia_curvature": GaussNewtonBartlett(self)}

    def decoupled(self, group: dict[str, Any]) -> bool:
        return True  # the paper's decay is AdamW's form: θ ← θ - ηλθ

    def new_state(self, theta: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        # m, and h: starts at 0, so the first steps are clipped
        return {"exp_avg": torch.zeros_like(theta), "hessian": torch.zeros_like(theta)}

    @torch.no_grad()
    def update_curvature(self, num_samples: int) -> None:
        """h ← β₂ h + (1 - β₂) ĥ with ĥ = B · ĝ ⊙ ĝ (Algorithm 2), where each parameter's `.grad` holds ĝ,
        the gradient of the mean loss on B = `num_samples` labels sampled from the model itself."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for theta in group["params"]:
                if theta.grad is None:
                    continue
                g_hat = theta.grad
                h = self.state_of(theta, group)["hessian"]
                h.mul_(beta2).addcmul_(g_hat, g_hat, value=(1 - beta2) * num_samples)

    def update(self, theta: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
               t: int) -> None:
        m, h = state["exp_avg"], state["hessian"]
        m.lerp_(g, 1 - group["betas"][0])  # m_t = β₁ m + (1 - β₁) g_t
        ratio = m / (h * group["gamma"]).clamp_(min=group["eps"])  # m_t / max{γ h_t, ε}
        theta.add_(ratio.clamp_(-1.0, 1.0), alpha=-group["lr"])  # θ ← θ - η clip(·, 1)
