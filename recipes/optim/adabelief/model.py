"""
# AdaBelief (Zhuang, Tang, Ding, Tatikonda, Dvornek, Papademetris & Duncan, 2020)

"AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients" changes one line of Adam.
Adam divides the momentum m_t by √v_t, the root mean square of the gradients: a large gradient gets a
small step. AdaBelief reads m_t as a *prediction* of the next gradient and divides by how far the
observed gradients stray from it:

    m_t = β₁ m_{t-1} + (1 - β₁) g_t                         the prediction (Adam's m_t)
    s_t = β₂ s_{t-1} + (1 - β₂) (g_t - m_t)² + ε            the "belief": EMA of the prediction's error²

If g_t is close to m_t (high belief), s_t is small and the step is large; if g_t deviates (low
belief), the step is small. The paper argues that this is what an ideal optimizer does with curvature:
where the gradient is large but barely changes (a flat slope, region 3 of its Fig. 1) Adam's √v_t is
large and it crawls, while AdaBelief's √s_t is small and it strides; where the gradient flips sign from step to step
(a steep valley), both divide by a large number. With a constant gradient s_t decays to its floor
ε/(1 - β₂) and the step becomes α|g|/√(ε/(1 - β₂)), not Adam's α (see the tests). With noisy
gradients of mean μ and spread σ, s_t ≈ σ², so the step is about α μ/σ: a signal-to-noise step.

Bias correction and the update are Adam's, with s in place of v (Algorithm 2; Algorithm 1 is Adam):

    m̂_t = m_t / (1 - β₁ᵗ),     ŝ_t = s_t / (1 - β₂ᵗ),     θ_t = θ_{t-1} - α m̂_t / (√ŝ_t + ε)

**ε inside s_t.** The ε added to s_t at every step (as in the paper and the authors' code) keeps s_t away
from 0 when g_t ≈ m_t: it accumulates to ε/(1 - β₂). Because it sits under the square root, the
authors' default ε = 10⁻¹⁶ plays the part of Adam's 10⁻⁸.

**Options the paper discusses, off by default.**
- `amsgrad=True` keeps the running maximum of s_t (as AMSGrad does with v_t, Reddi et al. 2018), the
  variant the paper mentions for its convergence analysis: the effective step size never grows.
- `rectify=True` applies RAdam's variance rectification (Liu et al. 2020; see the radam recipe) to the
  adaptive rate 1/√ŝ_t: momentum-SGD steps while ρ_t <= 5, then steps scaled by r_t. The authors'
  code offers it as well.
- `weight_decay` adds λθ to the gradient (L2); `decoupled_weight_decay=True` shrinks θ by αλ instead,
  as AdamW does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Iterable

import torch

from papertrain.config.constraints import NonNegativeFloat, Range
from papertrain.errors import PapertrainError
from papertrain.optim import ElementwiseOptimizer, check_hyperparameters
from papertrain.recipes.optim.radam.model import RHO_THRESHOLD, rectification, rho


class AdaBelief(ElementwiseOptimizer):
    """AdaBelief (Algorithm 2), optionally with AMSGrad's max, RAdam's rectification and AdamW's decay. The
    loop over parameters, the step count t and the weight decay are `papertrain.optim.ElementwiseOptimizer`'s."""

    def __init__(self, params: Iterable, lr: NonNegativeFloat = 1e-3,
                 betas: tuple[Annotated[float, Range(ge=0, lt=1)], Annotated[float, Range(ge=0, lt=1)]] = (0.9, 0.999),
                 eps: NonNegativeFloat = 1e-16, weight_decay: NonNegativeFloat = 0.0,
                 decoupled_weight_decay: bool = False, amsgrad: bool = False, rectify: bool = False):
        check_hyperparameters("AdaBelief", lr, eps, weight_decay, betas, "lr=1e-3, eps=1e-16, betas=(0.9, 0.999)")
        if rectify and rho(1, betas[1])[0] <= RHO_THRESHOLD:
            raise PapertrainError(f"AdaBelief: rectify=True with betas[1]={betas[1]} would never take an adaptive "
                                  "step (ρ_∞ <= 5)", "use β₂ > 2/3, or rectify=False")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad, rectify=rectify)
        super().__init__(params, defaults)

    @classmethod
    def check_arguments(cls, arguments: dict) -> Iterator[tuple[str, str]]:
        """With RAdam's rectification, ρ_∞ = 2/(1 - β₂) - 1 must exceed 5 (β₂ > 2/3)."""
        beta2 = arguments["betas"][1]
        if arguments["rectify"] and rho(1, beta2)[0] <= RHO_THRESHOLD:
            yield "betas", (f"rectify=true with betas[1]={beta2} gives ρ_∞ = {rho(1, beta2)[0]:.2f} <= 5, so "
                            "AdaBelief would never take an adaptive step; use β₂ > 2/3, or rectify=false")

    def new_state(self, theta: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        state = {"exp_avg": torch.zeros_like(theta), "exp_avg_var": torch.zeros_like(theta)}  # m, s
        if group["amsgrad"]:
            state["max_exp_avg_var"] = torch.zeros_like(theta)  # s^max
        return state

    def update(self, theta: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
               t: int) -> None:
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        m, s = state["exp_avg"], state["exp_avg_var"]
        m.lerp_(g, 1 - beta1)  # m_t = β₁ m + (1 - β₁) g
        error = g - m  # g_t - m_t: how far the gradient is from its prediction
        s.mul_(beta2).addcmul_(error, error, value=1 - beta2).add_(eps)  # s_t = β₂ s + (1-β₂)(g-m)² + ε
        if group["amsgrad"]:
            torch.maximum(state["max_exp_avg_var"], s, out=state["max_exp_avg_var"])
            s = state["max_exp_avg_var"]  # the largest belief error so far
        m_hat = m / (1 - beta1**t)  # m̂_t
        denominator = (s / (1 - beta2**t)).sqrt_().add_(eps)  # √ŝ_t + ε
        if not group["rectify"]:
            theta.addcdiv_(m_hat, denominator, value=-lr)  # θ -= α m̂/(√ŝ + ε)
            return
        r_t = rectification(t, beta2)  # RAdam's r_t, None while ρ_t <= 5
        if r_t is None:
            theta.add_(m_hat, alpha=-lr)  # momentum SGD: θ -= α m̂
        else:
            theta.addcdiv_(m_hat, denominator, value=-lr * r_t)  # θ -= α r_t m̂/(√ŝ + ε)
