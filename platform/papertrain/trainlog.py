"""What the loop reports as it trains: the training lines, throughput, ETA and memory.

    window = LogWindow(device)          sums over the steps since the last logged line (checkpointed)
    log = TrainingLog(...)              every `log_every` steps: one metrics.jsonl event, one console line
    probe = MemoryProbe(...)            once, after the first optimizer step: bytes of params/grads/state

Each logged train/loss is the mean over the steps since the previous line, averaged over the ranks. A
checkpoint taken between two lines keeps the window's sums, so the first line after a resume averages the
same steps as it would have without the interruption.
"""

from __future__ import annotations

import resource
import sys
from collections import defaultdict
from typing import Any

import torch

from papertrain.metrics import MetricsLog, Progress


class LogWindow:
    """Sums over the steps since the last logged line: each line's train/loss is their mean."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.has_loss = False  # a solver's steps have none: then no train/loss is logged
        self.extra: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        self.steps, self.units, self.time = 0, 0, 0.0

    def add(self, loss: torch.Tensor | None, parts: dict[str, Any], units: int, seconds: float) -> None:
        if loss is not None:
            self.loss += loss
            self.has_loss = True
        for k, v in parts.items():
            self.extra[k] += v
        self.steps += 1
        self.units += units
        self.time += seconds

    def state(self, strategy: Any) -> dict[str, Any]:
        """The job's sums (a collective: every rank calls it)."""
        totals = strategy.sum_across_ranks({"loss": float(self.loss), **{f"extra/{k}": float(v)
                                                                          for k, v in self.extra.items()}})
        return {"steps": self.steps, "units": self.units, "time": self.time, "has_loss": self.has_loss, **totals}

    def restore(self, state: dict[str, Any], holds_sums: bool) -> None:
        """Rank 0 holds the job's sums, the other ranks zero: the next line's mean over ranks is unchanged."""
        self.reset()
        self.steps, self.units, self.time = state["steps"], state["units"], state["time"]
        self.has_loss = state.get("has_loss", True)
        if holds_sums:
            self.loss.fill_(state["loss"])
            for key, value in state.items():
                if key.startswith("extra/"):
                    self.extra[key[len("extra/"):]].fill_(value)


class TrainingLog:
    """The training lines: metrics.jsonl (and TensorBoard) on rank 0, and the progress bar or plain lines."""

    def __init__(self, metrics: MetricsLog, progress: Progress, strategy: Any, unit: str, max_steps: int):
        self.metrics, self.progress, self.strategy = metrics, progress, strategy
        self.unit, self.max_steps = unit, max_steps
        self.step_time: float | None = None  # a moving average of seconds per step, for the ETA

    def line(self, step: int, window: LogWindow, lr: float | None, grad_norm: Any, device: torch.device) -> None:
        """Log the window's means at `step` (a collective: every rank calls it), then empty the window."""
        sums = {f"train/{k}": (v / window.steps).item() for k, v in window.extra.items()}
        if window.has_loss:
            sums = {"train/loss": (window.loss / window.steps).item(), **sums}
        mean = self.strategy.mean_across_ranks(sums)
        rate = window.units / max(window.time, 1e-9)  # units of the whole job
        per_step = window.time / window.steps
        self.step_time = per_step if self.step_time is None else 0.7 * self.step_time + 0.3 * per_step
        values: dict[str, Any] = dict(mean)
        if lr is not None:
            values["train/lr"] = lr
        values[f"throughput/{self.unit}_per_s"] = rate
        values["memory/peak_bytes"] = peak_memory_bytes(device)
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        self.metrics.log(step, values)
        headline = {"loss": f"{mean['train/loss']:.4f}"} if "train/loss" in mean else {
            k.split("/", 1)[1]: f"{v:.4g}" for k, v in list(mean.items())[:1]}
        self.progress.update(step, {**headline, self.unit + "/s": f"{rate:,.0f}"}, self.step_time * (self.max_steps - step))
        window.reset()

    def write(self, text: str) -> None:
        self.progress.write(text)


class MemoryProbe:
    """The bytes one rank holds in parameters, gradients and optimizer state, measured once: after the
    first optimizer step and before its gradients are cleared (gradients are counted as the optimizer
    saw them, since DeepSpeed steps one parameter group at a time and frees as it goes)."""

    def __init__(self, strategy: Any, optimizers: dict[str, Any]):
        self.strategy, self.optimizers = strategy, optimizers
        self.grad_bytes: dict[int, int] = {}
        self.done = False
        self.hooks = [o.register_step_pre_hook(self._record_gradient_bytes) for o in optimizers.values()]

    def _record_gradient_bytes(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        from papertrain.strategies import local_bytes

        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.grad_bytes[id(p)] = local_bytes(p.grad)

    def measure(self, model: Any) -> dict[str, float] | None:
        """The model-state bytes (averaged over ranks: a collective), the first time it is called."""
        if self.done:
            return None
        self.done = True
        memory = self.strategy.memory_by_kind(model, self.optimizers)
        memory["memory/grads_bytes"] = max(memory["memory/grads_bytes"], sum(self.grad_bytes.values()))
        for hook in self.hooks:
            hook.remove()
        return {k: float(v) for k, v in self.strategy.mean_across_ranks(memory).items()}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory; on CPU, the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024

