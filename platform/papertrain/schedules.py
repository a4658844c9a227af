"""Learning-rate schedules, as closed-form multipliers of the optimizer's base learning rate.

Both are `torch.optim.lr_scheduler.LRScheduler`s whose only state is the step count, so a resumed run
continues the curve exactly. Step t (0-based) is the t-th optimizer update.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch.optim.lr_scheduler import LRScheduler

from papertrain.config.constraints import NonNegativeInt, PositiveInt, Probability, Range


class WarmupCosine(LRScheduler):
    """Linear warmup to the base rate, then a half cosine down to `min_lr_ratio` of it.

        lr(t) = base · (t+1)/W                                              for t < W
        lr(t) = base · (r + (1-r) · ½(1 + cos(π · (t-W)/(S-W))))            for W ≤ t < S
        lr(t) = base · r                                                    for t ≥ S

    with W = warmup_steps, S = total_steps, r = min_lr_ratio.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: NonNegativeInt, total_steps: PositiveInt,
                 min_lr_ratio: Probability = 0.1, last_epoch: Annotated[int, Range(ge=-1)] = -1):
        if total_steps <= 0 or warmup_steps < 0:
            raise ValueError(f"need total_steps > 0 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def multiplier(self, t: int) -> float:
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        if t >= self.total_steps:
            return self.min_lr_ratio
        progress = (t - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [base * self.multiplier(self.last_epoch) for base in self.base_lrs]


class Noam(LRScheduler):
    """The schedule of "Attention Is All You Need" (Vaswani et al. 2017, §5.3, eq. 3):

        lrate = d_model^-0.5 · min(n^-0.5, n · warmup^-1.5),     n = t + 1

    a linear rise for `warmup_steps` steps, then decay with the inverse square root of the step. This
    multiplies the optimizer's base rate, so `optimizer.lr: 1.0` is the paper's schedule exactly and
    other values scale it (the "factor" of later implementations).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, d_model: PositiveInt, warmup_steps: PositiveInt = 4000,
                 last_epoch: Annotated[int, Range(ge=-1)] = -1):
        if d_model <= 0 or warmup_steps <= 0:
            raise ValueError(f"need d_model > 0 and warmup_steps > 0, got {d_model}, {warmup_steps}")
        self.d_model = d_model
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, last_epoch)

    def multiplier(self, t: int) -> float:
        n = t + 1
        return self.d_model ** -0.5 * min(n ** -0.5, n * self.warmup_steps ** -1.5)

    def get_lr(self) -> list[float]:
        return [base * self.multiplier(self.last_epoch) for base in self.base_lrs]


def load_schedule_progress(scheduler: LRScheduler, saved: dict) -> list[str]:
    """Restore where a schedule is (its step, base rates, last rates) from a checkpoint, keeping the
    *settings* it was built with from this run's config; return the settings that differ from the saved ones.

    torch's `LRScheduler.state_dict` holds every attribute, settings included, so a plain load would put
    back the old `total_steps` of a run that is being extended. Settings are the constructor's arguments.
    When one differs, the rates are recomputed for the current step from the new settings (closed form),
    so the next step already follows the new schedule; an unchanged schedule resumes bit for bit."""
    import inspect

    names = [name for name in inspect.signature(type(scheduler).__init__).parameters
             if name not in ("self", "optimizer", "last_epoch", "verbose") and hasattr(scheduler, name)]
    settings = {name: getattr(scheduler, name) for name in names}
    scheduler.load_state_dict(saved)
    changed = [name for name, value in settings.items() if getattr(scheduler, name) != value]
    for name, value in settings.items():
        setattr(scheduler, name, value)
    if changed:
        closed_form = getattr(scheduler, "_get_closed_form_lr", None)
        rates = closed_form() if callable(closed_form) else scheduler.get_lr()
        for group, rate in zip(scheduler.optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = list(rates)
    return changed
