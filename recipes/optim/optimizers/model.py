"""
# Adaptive optimizers side by side: Adam, AMSGrad, Adam + Noam warmup, RAdam, AdaBelief, Sophia-G

Every optimizer here keeps a momentum of the gradient g_t and divides it, coordinate by coordinate, by
an estimate of something about that coordinate. They differ in *what* they divide by and in what they
do while that estimate is still poor. One recipe per paper has the details; this file lines up the
update rules (all operations elementwise; decoupled weight decay θ ← θ - αλθ is common to all of them
here and left out) and `papertrain compare optimizers` trains them on the same model and data.

    Adam        m_t = β₁m + (1-β₁)g,  v_t = β₂v + (1-β₂)g²               (adam recipe; Kingma & Ba 2015)
                θ -= α · m̂_t / (√v̂_t + ε)                                  divide by the gradient's RMS
    AMSGrad     v^max_t = max(v^max_{t-1}, v_t)                             (adam recipe; Reddi et al. 2018)
                θ -= α · m̂_t / (√(v^max_t / (1-β₂ᵗ)) + ε)                  the step size never grows again
    Adam+Noam   Adam with α_n = d^-0.5 · min(n^-0.5, n · W^-1.5)          (noam recipe; Vaswani et al. 2017)
                                                                            a linear warmup, then 1/√n
    RAdam       ρ_t = ρ_∞ - 2tβ₂ᵗ/(1-β₂ᵗ);  ρ_t > 5:  θ -= α r_t m̂_t √(1-β₂ᵗ)/(√v_t + ε)
                                             else:    θ -= α m̂_t            (radam recipe; Liu et al. 2020)
                                                                            r_t: a warmup derived from Var[1/√v̂]
    AdaBelief   s_t = β₂s + (1-β₂)(g - m_t)² + ε                            (adabelief recipe; Zhuang et al. 2020)
                θ -= α · m̂_t / (√ŝ_t + ε)                                  divide by the gradient's *deviation*
                                                                            from its prediction m_t
    Sophia-G    every k steps: ĝ = ∇ loss on labels ŷ ~ model,  h = β₂h + (1-β₂)·B·ĝ⊙ĝ
                θ -= η · clip(m_t / max(γh_t, ε), 1)                        (sophia recipe; Liu et al. 2023)
                                                                            divide by the curvature, then clip

What that buys and costs, per parameter:

    optimizer   state          a step's worth of extra compute    what its step is about
    Adam        m, v           -                                  ±α early, α·m̂/√v̂ later
    AMSGrad     m, v, v^max    -                                  shrinks only
    Adam+Noam   m, v           -                                  α_n rises from ~0 over W steps
    RAdam       m, v           -                                  α·m̂ (SGD) for ~5 steps, then r_t from ~0 to 1
    AdaBelief   m, s           -                                  large where g is predictable, α·μ/σ when noisy
    Sophia-G    m, h           one forward+backward every k       ≤ η always (the clip); η/γ · Newton's step
                                 steps (+1/k, ~10% at k = 10)     where the curvature is well estimated

`OPTIMIZERS` names each one as (class, settings) with the paper's defaults; the tiny configs of the
recipes set the rates and β₂ for the tiny GPT (see each recipe's tiny.yaml, and meta.yaml's `compare:`
section for what the comparison runs).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from papertrain.recipes.optim.adabelief.model import AdaBelief
from papertrain.recipes.optim.adam.model import Adam
from papertrain.recipes.optim.noam.model import Noam
from papertrain.recipes.optim.radam.model import RAdam
from papertrain.recipes.optim.sophia.model import SophiaG

# name -> (optimizer class, the paper's settings); the names are the comparison's variants (meta.yaml)
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "Adam": (Adam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}),
    "AMSGrad": (Adam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": True}),
    "Adam + Noam": (Adam, {"lr": 1.0, "betas": (0.9, 0.98), "eps": 1e-9}),  # lr: a factor on the Noam rate
    "RAdam": (RAdam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}),
    "AdaBelief": (AdaBelief, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-16}),
    "Sophia-G": (SophiaG, {"betas": (0.965, 0.99), "gamma": 0.01, "eps": 1e-12, "weight_decay": 0.2,
                           "curvature_every": 10}),
}

# the schedules that belong to an optimizer's idea (the others take any schedule)
SCHEDULES = {"Adam + Noam": Noam}


def build(name: str, params: Iterable, **settings: Any) -> torch.optim.Optimizer:
    """`OPTIMIZERS[name]` over `params`, with `settings` overriding the paper's."""
    optimizer_class, defaults = OPTIMIZERS[name]
    return optimizer_class(params, **{**defaults, **settings})
