"""Callbacks: a recipe's own code at fixed points of the loop, shipped in the recipe's folder.

    prepare(ctx)                   once, before any work: check what the callback needs (raise PapertrainError)
    before_step(ctx)               the step's batch is on ctx (ctx.micro_batches), nothing computed yet
    after_step(ctx, metrics)       the optimizer(s) stepped; ctx.step counts the step just taken
    before_evaluation(ctx)         e.g. swap averaged weights in (papertrain/nn/ema.py) ...
    after_evaluation(ctx, metrics) ... and out again; the validation metrics of this step
    before_sample(ctx), after_sample(ctx)   the same around samples

A callback is any object with some of these methods (`Callback` below is an optional base). They come
from two places, by name:
- the config's `callbacks:` section, `{name: {_component_: ..., ...}}` (e.g. EMA weights for diffusion);
- components that need one: any built object (model, task, optimizer, data) with a `callbacks()` method
  returning `{name: callback}`. Sophia's optimizer ships its curvature pass this way
  (recipes/optim/sophia), so choosing `optimizer: SophiaG` is all a config says.
A callback with `state_dict()`/`load_state_dict()` is checkpointed as named state `callback.<name>`
(an EMA's shadow weights, a DQN target network's last sync).
"""

from __future__ import annotations

from typing import Any

from papertrain.errors import PapertrainError

HOOKS = ("before_step", "after_step", "before_evaluation", "after_evaluation", "before_sample", "after_sample")


class Callback:
    """Optional base class: override the hooks you need."""

    def prepare(self, ctx: Any) -> None:
        pass

    def before_step(self, ctx: Any) -> None:
        pass

    def after_step(self, ctx: Any, metrics: dict[str, Any]) -> None:
        pass

    def before_evaluation(self, ctx: Any) -> None:
        pass

    def after_evaluation(self, ctx: Any, metrics: dict[str, float]) -> None:
        pass

    def before_sample(self, ctx: Any) -> None:
        pass

    def after_sample(self, ctx: Any) -> None:
        pass


class Callbacks:
    def __init__(self, named: dict[str, Any]):
        self.named = named

    @classmethod
    def collect(cls, configured: dict[str, Any], components: dict[str, Any]) -> Callbacks:
        """The config's callbacks, then those the built components ask for (a name may not repeat)."""
        named = dict(configured)
        for owner, component in components.items():
            provide = getattr(component, "callbacks", None)
            if not callable(provide) or isinstance(component, type):
                continue
            for name, callback in (provide() or {}).items():
                if name in named:
                    raise PapertrainError(f"two callbacks are named '{name}' (one from {owner})",
                                          f"rename the one under callbacks.{name} in the config")
                named[name] = callback
        for name, callback in named.items():
            if not any(callable(getattr(callback, hook, None)) for hook in HOOKS):
                raise PapertrainError(f"callbacks.{name} ({type(callback).__name__}) has none of "
                                      f"{', '.join(HOOKS)}", "give it at least one of these methods")
        return cls(named)

    def call(self, hook: str, *args: Any) -> None:
        for callback in self.named.values():
            method = getattr(callback, hook, None)
            if callable(method):
                method(*args)

    def stateful(self) -> dict[str, Any]:
        return {f"callback.{name}": cb for name, cb in self.named.items()
                if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None))}


class StopAtGoal(Callback):
    """End the run (as completed) once a validation metric crosses a threshold: a learning test stops as
    soon as it has shown what it set out to show, e.g.
    `callbacks.goal={_component_: papertrain.callbacks.StopAtGoal, metric: val/mean_return, at_least: 475}`."""

    def __init__(self, metric: str, at_least: float | None = None, at_most: float | None = None):
        if (at_least is None) == (at_most is None):
            raise PapertrainError("StopAtGoal needs exactly one of at_least, at_most", "e.g. at_least: 0.95")
        self.metric, self.at_least, self.at_most = metric, at_least, at_most

    def after_evaluation(self, ctx: Any, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None:
            return
        if (self.at_least is not None and value >= self.at_least) or (self.at_most is not None and value <= self.at_most):
            ctx.request_stop(f"{self.metric} {value:.4g} reached the goal")
