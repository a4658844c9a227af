"""
# Adam (Kingma & Ba, 2015) and AMSGrad (Reddi, Kale & Kumar, 2018)

"Adam: A Method for Stochastic Optimization" keeps two exponential moving averages per parameter, of
the gradient g_t and of its elementwise square (Algorithm 1):

    m_t = β₁ m_{t-1} + (1 - β₁) g_t                 first moment: a momentum
    v_t = β₂ v_{t-1} + (1 - β₂) g_t²                second raw moment: the gradient's scale, per coordinate

Both start at 0, so early on they are biased towards 0 by factors (1 - β₁ᵗ) and (1 - β₂ᵗ); dividing
them out gives the bias-corrected estimates, and the step is the ratio

    m̂_t = m_t / (1 - β₁ᵗ),    v̂_t = v_t / (1 - β₂ᵗ),    θ_t = θ_{t-1} - α m̂_t / (√v̂_t + ε)

Each coordinate moves by about α whatever the gradient's scale: the "signal-to-noise" ratio m̂/√v̂ is
invariant to rescaling g (§2.1). Defaults from the paper: α = 0.001, β₁ = 0.9, β₂ = 0.999, ε = 10⁻⁸.

**AMSGrad.** "On the Convergence of Adam and Beyond" shows (Theorem 1) a simple convex problem on which
Adam converges to the *worst* point: a rare large gradient is forgotten by v_t within ~1/(1 - β₂) steps,
so the effective step size α/√v̂_t grows again and the frequent small gradients win. The fix keeps the
largest v seen so far, so the effective step size never increases:

    v̂_t^max = max(v̂_{t-1}^max, v_t),    θ_t = θ_{t-1} - α m̂_t / (√(v̂_t^max / (1 - β₂ᵗ)) + ε)

(the paper's Algorithm 2 omits bias correction; we keep Adam's, as torch.optim and most code do, so that
AMSGrad differs from Adam only by the max).

**Weight decay.** `weight_decay` adds λθ to the gradient (L2 regularisation, as in the paper's setting);
`decoupled=True` instead shrinks θ by αλ before the step (AdamW, Loshchilov & Hutter 2019), which does
not let the adaptive denominator rescale the decay.
"""

from __future__ import annotations

from typing import Annotated, Any, Iterable

import torch

from papertrain.config.constraints import NonNegativeFloat, Range
from papertrain.optim import ElementwiseOptimizer, check_hyperparameters


class Adam(ElementwiseOptimizer):
    """Adam (Algorithm 1), optionally AMSGrad (`amsgrad=True`) and AdamW's decoupled decay. The loop over
    parameters, the step count t and the weight decay are `papertrain.optim.ElementwiseOptimizer`'s."""

    decoupled_key = "decoupled"

    def __init__(self, params: Iterable, lr: NonNegativeFloat = 1e-3,
                 betas: tuple[Annotated[float, Range(ge=0, lt=1)], Annotated[float, Range(ge=0, lt=1)]] = (0.9, 0.999),
                 eps: NonNegativeFloat = 1e-8, weight_decay: NonNegativeFloat = 0.0, amsgrad: bool = False,
                 decoupled: bool = False):
        check_hyperparameters("Adam", lr, eps, weight_decay, betas, "lr=1e-3, eps=1e-8, betas=(0.9, 0.999)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        decoupled=decoupled)
        super().__init__(params, defaults)

    def new_state(self, theta: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        state = {"exp_avg": torch.zeros_like(theta), "exp_avg_sq": torch.zeros_like(theta)}  # m, v
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(theta)  # v^max
        return state

    def update(self, theta: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
               t: int) -> None:
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - beta1)  # m_t = β₁ m + (1 - β₁) g
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v_t = β₂ v + (1 - β₂) g²
        if group["amsgrad"]:
            torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
            v = state["max_exp_avg_sq"]  # AMSGrad: the largest second moment so far
        bias1, bias2 = 1 - beta1**t, 1 - beta2**t
        denominator = (v.sqrt() / bias2**0.5).add_(group["eps"])  # √v̂_t + ε
        theta.addcdiv_(m, denominator, value=-group["lr"] / bias1)  # θ -= α m̂_t / (√v̂_t + ε)
