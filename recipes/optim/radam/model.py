"""
# Rectified Adam (Liu, Jiang, He, Chen, Liu, Gao & Han, 2020)

"On the Variance of the Adaptive Learning Rate and Beyond" asks why Adam needs a learning-rate warmup
(the Transformer's, §5.3 of Vaswani et al.) and answers: in the first steps the adaptive learning rate
has a huge variance. Adam divides by √v̂_t, an estimate of the gradient's root mean square from the
few gradients seen so far; with one gradient, v̂_1 = g_1² and the step is ±α whatever g_1 was. Treat
the gradients as N(0, σ²) and the adaptive rate ψ_t = √((1 - β₂ᵗ) / v_t) as a scaled inverse χ
variable: its variance is divergent for the first few degrees of freedom and decreases after (§3,
Theorem 1). Warmup works because a small α during those steps keeps that variance harmless.

RAdam removes the variance explicitly instead. The exponential moving average v_t behaves like a
simple moving average of ρ_t gradients (§4), with

    ρ_∞ = 2 / (1 - β₂) - 1,         ρ_t = ρ_∞ - 2 t β₂ᵗ / (1 - β₂ᵗ)

the "length of the approximated SMA": ρ_1 = 1, and ρ_t grows towards ρ_∞ (≈ t at first). To first
order, Var[ψ_t] ≈ ρ_t / (2 (ρ_t - 2)(ρ_t - 4) σ²), finite only for ρ_t > 4. Scaling the step by

    r_t = √( (ρ_t - 4)(ρ_t - 2) ρ_∞ / ((ρ_∞ - 4)(ρ_∞ - 2) ρ_t) )           (the variance rectification term)

makes the variance of r_t ψ_t equal to the variance of ψ_∞, the adaptive rate's variance once it has
converged. r_t is small at first and increases to 1: an automatic warmup, with no schedule to tune.

Algorithm 2, with m_t, v_t and the bias corrections exactly as in Adam:

    m_t = β₁ m_{t-1} + (1 - β₁) g_t,     m̂_t = m_t / (1 - β₁ᵗ)
    v_t = β₂ v_{t-1} + (1 - β₂) g_t²
    if ρ_t > 4:   l_t = √((1 - β₂ᵗ) / v_t),     θ_t = θ_{t-1} - α r_t l_t m̂_t      (rectified adaptive step)
    else:                                        θ_t = θ_{t-1} - α m̂_t              (SGD with momentum)

**Threshold: 5, not 4.** Algorithm 2 switches at ρ_t > 4, where the variance first becomes finite;
the authors' code and torch.optim.RAdam switch at 5 (torch: ρ_t > 5). Just above 4 the first-order
variance formula is far from the exact variance (a third off near ρ_t = 5, see the tests) and r_t is
near 0 anyway; we use 5 so that this class takes exactly torch.optim.RAdam's steps (our reference
test). With β₂ = 0.999 this means the first 5 steps, rather than 4, are momentum-SGD steps.

**ε.** As in torch (and Adam), l_t is computed as √(1 - β₂ᵗ) / (√v_t + ε), which the paper writes
without ε; it only matters where v_t ≈ 0.

**Weight decay.** `weight_decay` adds λθ to the gradient (L2); `decoupled_weight_decay=True` instead
shrinks θ by αλ before the step, as AdamW does (Loshchilov & Hutter 2019) and torch's RAdam allows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated, Any, Iterable

import torch

from papertrain.config.constraints import NonNegativeFloat, Range
from papertrain.errors import PapertrainError
from papertrain.optim import ElementwiseOptimizer, check_hyperparameters

# ρ_t must exceed this before the adaptive step is used (Algorithm 2 says 4; torch and the authors' code 5)
RHO_THRESHOLD = 5.0


def rho(t: int, beta2: float) -> tuple[float, float]:
    """(ρ_∞, ρ_t): the lengths of the simple moving averages that v_∞ and v_t approximate (§4)."""
    rho_inf = 2 / (1 - beta2) - 1
    return rho_inf, rho_inf - 2 * t * beta2**t / (1 - beta2**t)


def rectification(t: int, beta2: float) -> float | None:
    """r_t = √(Var[ψ_∞] / Var[ψ_t]) to first order (§4); None while ρ_t <= 5 (no adaptive step yet)."""
    rho_inf, rho_t = rho(t, beta2)
    if rho_t <= RHO_THRESHOLD:
        return None
    return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))


class RAdam(ElementwiseOptimizer):
    """Rectified Adam (Algorithm 2), optionally with decoupled (AdamW) weight decay. The loop over
    parameters, the step count t and the weight decay are `papertrain.optim.ElementwiseOptimizer`'s."""

    def __init__(self, params: Iterable, lr: NonNegativeFloat = 1e-3,
                 betas: tuple[Annotated[float, Range(ge=0, lt=1)], Annotated[float, Range(ge=0, lt=1)]] = (0.9, 0.999),
                 eps: NonNegativeFloat = 1e-8, weight_decay: NonNegativeFloat = 0.0,
                 decoupled_weight_decay: bool = False):
        check_hyperparameters("RAdam", lr, eps, weight_decay, betas, "lr=1e-3, eps=1e-8, betas=(0.9, 0.999)")
        if rho(1, betas[1])[0] <= RHO_THRESHOLD:
            # ρ_∞ <= 5 (β₂ <= 2/3): ρ_t never passes the threshold, so this would be momentum SGD forever
            raise PapertrainError(f"RAdam: betas[1]={betas[1]} gives ρ_∞ = {rho(1, betas[1])[0]:.2f} <= 5, so it "
                                  "would never take an adaptive step", "use β₂ > 2/3, e.g. the paper's 0.999")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    @classmethod
    def check_arguments(cls, arguments: dict) -> Iterator[tuple[str, str]]:
        """ρ_∞ = 2/(1 - β₂) - 1 must exceed 5 (β₂ > 2/3), or ρ_t never passes the threshold (§4)."""
        beta2 = arguments["betas"][1]
        rho_inf = rho(1, beta2)[0]
        if rho_inf <= RHO_THRESHOLD:
            yield "betas", (f"betas[1]={beta2} gives ρ_∞ = {rho_inf:.2f} <= 5, so RAdam would never take an "
                            "adaptive step; use β₂ > 2/3, e.g. the paper's 0.999")

    def new_state(self, theta: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"exp_avg": torch.zeros_like(theta), "exp_avg_sq": torch.zeros_like(theta)}  # m, v

    def update(self, theta: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
               t: int) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - beta1)  # m_t = β₁ m + (1 - β₁) g
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v_t = β₂ v + (1 - β₂) g²
        m_hat = m / (1 - beta1**t)  # m̂_t
        r_t = rectification(t, beta2)
        if r_t is None:
            # ρ_t <= 5: the adaptive rate's variance is intractable, so no adaptive rate at all
            theta.add_(m_hat, alpha=-lr)  # θ_t = θ_{t-1} - α m̂_t
        else:
            l_t = (1 - beta2**t) ** 0.5 / (v.sqrt() + group["eps"])  # l_t = √((1 - β₂ᵗ) / v_t)
            theta.add_(m_hat * l_t, alpha=-lr * r_t)  # θ_t = θ_{t-1} - α r_t l_t m̂_t
