"""
# Adam with warmup: the Noam schedule (Vaswani et al., 2017, §5.3) and why warmup helps (Liu et al., 2020)

"Attention Is All You Need" trains the Transformer with Adam (β₁ = 0.9, β₂ = 0.98, ε = 10⁻⁹) and a
learning rate that is not a constant but a function of the step number n (eq. 3):

    lrate = d_model^-0.5 · min(n^-0.5, n · warmup_steps^-1.5)

For n < warmup_steps the second term is the smaller: the rate rises *linearly* from ~0; at
n = warmup_steps the two terms meet, so the peak is d_model^-0.5 · warmup_steps^-0.5; after it the rate
decays with the inverse square root of the step. The paper uses warmup_steps = 4000 (of 100k steps for
the base model). The factor d_model^-0.5 makes wider models take smaller steps. (The schedule is named
after Noam Shazeer, who proposed it; later code multiplies it by a tunable "factor", which is what the
optimizer's base `lr` does here: `lr: 1.0` is eq. 3 exactly.)

**Why warm up?** The paper gives no reason. Liu et al. ("On the Variance of the Adaptive Learning Rate
and Beyond", 2020, §3) give one for Adam: in the first steps v_t is estimated from a handful of
gradients, so the adaptive rate α/√v̂_t has a huge (for t <= 4, divergent) variance and the first
updates can be large and badly directed, pushing the model into a poor region it does not leave.
A small α during those steps keeps the damage small until v_t has seen enough gradients; their
experiments show Adam without warmup stuck at a worse loss, and RAdam (the radam recipe) fixes the
variance itself instead. Post-LN Transformers, the paper's, are the most sensitive: Xiong et al. (2020)
show their gradients near the output are large at initialisation, so the first steps at full rate hurt
most.

What is here: `Noam` (the engine's `papertrain.schedules.Noam`, exported under this recipe so the idea
has one place to read), `noam_rate` (eq. 3 as a plain function of n), and `LinearWarmup` (a linear rise
then a constant: the warmup alone, for comparing with and without it at the same peak rate).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch.optim.lr_scheduler import LRScheduler

from papertrain.config.constraints import NonNegativeInt, Range
from papertrain.schedules import Noam

__all__ = ["LinearWarmup", "Noam", "noam_rate"]


def noam_rate(n: int, d_model: int, warmup_steps: int) -> float:
    """Eq. 3 at step n >= 1 (the n-th update): d_model^-0.5 · min(n^-0.5, n · warmup_steps^-1.5)."""
    return d_model**-0.5 * min(n**-0.5, n * warmup_steps**-1.5)


class LinearWarmup(LRScheduler):
    """The rate rises linearly to the optimizer's base rate over `warmup_steps` updates, then stays:

        lr(t) = base · min(1, (t + 1) / W)          (t = 0, 1, ... the update; W = 0: no warmup at all)

    Its only state is the step count, so a resumed run continues it exactly.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: NonNegativeInt,
                 last_epoch: Annotated[int, Range(ge=-1)] = -1):
        if warmup_steps < 0:
            raise ValueError(f"need warmup_steps >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, last_epoch)

    def multiplier(self, t: int) -> float:
        return 1.0 if t >= self.warmup_steps else (t + 1) / self.warmup_steps

    def get_lr(self) -> list[float]:
        return [base * self.multiplier(self.last_epoch) for base in self.base_lrs]
