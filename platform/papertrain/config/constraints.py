"""Numeric constraints that live in the type hints, so `papertrain validate` catches a bad value before
any work is done.

    def __init__(self, n_layers: PositiveInt = 12, dropout: Probability = 0.1, lr: PositiveFloat = 3e-4): ...

`Range` is the one constraint; the aliases below name the common ones. A component whose arguments
constrain each other (d_model must split into n_heads) defines a classmethod

    @classmethod
    def check_arguments(cls, arguments: dict) -> Iterator[tuple[str, str]]: yield key, problem

which the validator calls with the section's values (defaults filled in) once each value passed its own
checks. Every float in a config must be finite (nan and inf are never a setting).

Third-party classes cannot carry our hints, so `KNOWN` gives torch's optimizers theirs (the same bounds
torch itself raises on at construction, checked before anything is built).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterable


@dataclass(frozen=True)
class Range:
    """ge <= value <= le, gt < value < lt (each bound optional)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # the type check reports it
        if self.ge is not None and not value >= self.ge:
            return f"must be >= {self.ge:g}, got {value!r}"
        if self.gt is not None and not value > self.gt:
            return f"must be > {self.gt:g}, got {value!r}"
        if self.le is not None and not value <= self.le:
            return f"must be <= {self.le:g}, got {value!r}"
        if self.lt is not None and not value < self.lt:
            return f"must be < {self.lt:g}, got {value!r}"
        return None

    def describe(self) -> str:
        bounds = [f">= {self.ge:g}" if self.ge is not None else "", f"> {self.gt:g}" if self.gt is not None else "",
                  f"<= {self.le:g}" if self.le is not None else "", f"< {self.lt:g}" if self.lt is not None else ""]
        return " and ".join(b for b in bounds if b)


@dataclass(frozen=True)
class OneOf:
    """The value must be one of the names `choices()` returns: a registry read when the config is checked
    (strategies, quantizers and finetuning methods that recipes provide, see papertrain/registry.py)."""

    choices: Callable[[], Iterable[str]]

    def problem(self, value: Any) -> str | None:
        names = list(self.choices())
        if value in names:
            return None
        from papertrain.errors import did_you_mean

        close = did_you_mean(str(value), names)
        return f"must be one of {', '.join(map(repr, names))}, got {value!r}" + (f" (did you mean '{close}'?)"
                                                                               if close else "")


PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
Probability = Annotated[float, Range(ge=0, le=1)]  # also dropout rates, mixing weights
OpenUnit = Annotated[float, Range(gt=0, lt=1)]  # strictly between 0 and 1: fractions, decay rates
Seed = Annotated[int, Range(ge=0, lt=2**63)]
AnyFloat = Annotated[float, Range()]  # any finite number (a signed offset, a log-scale value)
AnyInt = Annotated[int, Range()]


def non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


# Bounds of torch.optim's arguments (torch checks the same ones when the optimizer is built).
_OPTIMIZER_BOUNDS = {
    "lr": Range(ge=0), "eps": Range(ge=0), "weight_decay": Range(ge=0), "momentum": Range(ge=0),
    "dampening": Range(ge=0), "alpha": Range(ge=0), "lr_decay": Range(ge=0), "rho": Range(ge=0, le=1),
    "initial_accumulator_value": Range(ge=0), "momentum_decay": Range(ge=0), "lambd": Range(ge=0),
    "t0": Range(ge=0), "max_iter": Range(ge=1), "history_size": Range(ge=1),
}
_BETAS = Range(ge=0, lt=1)
# torch.optim.lr_scheduler's (the ones a recipe names)
_SCHEDULER_BOUNDS = {
    "start_factor": Range(gt=0, le=1), "end_factor": Range(ge=0, le=1), "total_iters": Range(ge=1),
    "last_epoch": Range(ge=-1), "step_size": Range(ge=1), "gamma": Range(gt=0), "T_max": Range(ge=1),
    "eta_min": Range(ge=0), "factor": Range(gt=0),
}


def known_bounds(target: Any, name: str) -> list[Range]:
    """Bounds for argument `name` of a third-party `target` (a list: one Range, or one per item)."""
    module = getattr(target, "__module__", "") or ""
    if module.startswith("torch.optim.lr_scheduler"):
        bound = _SCHEDULER_BOUNDS.get(name)
        return [bound] if bound else []
    if module.startswith("torch.optim"):
        if name == "betas":
            return [_BETAS]
        bound = _OPTIMIZER_BOUNDS.get(name)
        return [bound] if bound else []
    return []
