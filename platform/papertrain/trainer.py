"""The one training loop, for every recipe.

    setup()   seed -> device -> data -> model -> task -> optimizer -> scheduler -> resume
    train()   for each step: micro-batches (forward, backward) -> clip -> optimizer step -> schedule
              every N steps: log, evaluate, sample, checkpoint
              (an optimizer with `curvature_every = k`, e.g. Sophia: every k steps a curvature pass first,
              see `_update_curvature`)
    finish()  final evaluation, samples and checkpoint; summary.json; loss plot

What a step computes is fixed by (seed, step) alone: the batch comes from `EpochSampler.indices(step)`,
and a checkpoint holds model, optimizer, scheduler and every RNG. That is why a resumed run continues
bit-identically on CPU, and why N ranks compute what one process computes on the same global batch.
Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and exits; a second Ctrl-C
stops at once (the last complete checkpoint is untouched, as saves are atomic).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from papertrain.checkpoint import CheckpointDir
from papertrain.config import LoadedConfig, dump_yaml, instantiate
from papertrain.data.sampler import EpochSampler, evaluation_indices, shard
from papertrain.errors import PapertrainError
from papertrain.modelbuild import model_builder
from papertrain.metrics import MetricsLog, Progress, last_values, plot_curves, read_metrics, truncate_metrics
from papertrain.distributed import disconnect
from papertrain.rundir import RunDirLock, check_resumable
from papertrain.seeding import rank_seed, seed_everything, set_deterministic
from papertrain.strategies import Strategy, build_strategy, local_bytes


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "completed", "interrupted" or "already complete"
    step: int
    wall_s: float
    metrics: dict[str, Any] = field(default_factory=dict)
    samples: list[Path] = field(default_factory=list)
    plot: Path | None = None


def weight_decay_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Decay matrices and embeddings only; biases and norm gains get none (GPT-1 §4.1, and common practice).

    The optimizer's own `weight_decay` applies to the matrices; the vectors' group overrides it with 0.
    """
    def decays(p: torch.Tensor) -> bool:  # a flattened shard says which kind it holds (zero3_reference)
        return getattr(p, "apply_weight_decay", p.dim() >= 2)

    decay = [p for p in model.parameters() if p.requires_grad and decays(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not decays(p)]
    groups: list[dict[str, Any]] = [{"params": decay}] if decay or not no_decay else []
    if no_decay:  # (an empty group would not survive a checkpoint: DCP names groups by their parameters)
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class _StopRequest:
    """Turns the first SIGINT/SIGTERM into "stop after this step"; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing this step, then saving a checkpoint (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    def request(self, reason: str) -> None:
        """Stop after this step, for `reason` (e.g. a cluster's preemption signal; see papertrain.cluster)."""
        if self.requested is None:
            self.requested = reason
            print(f"\n{reason}: finishing this step, then saving a checkpoint", file=sys.stderr, flush=True)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class _LogWindow:
    """Sums over the steps since the last logged line: each line's train/loss is their mean.

    A checkpoint taken between two lines keeps these sums (added up over the ranks), so the first line
    after a resume averages the same steps as it would have without the interruption."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.extra: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        self.steps, self.units, self.time = 0, 0, 0.0

    def state(self, strategy: Strategy) -> dict[str, Any]:
        """The job's sums (a collective: every rank calls it)."""
        totals = strategy.sum_across_ranks({"loss": float(self.loss), **{f"extra/{k}": float(v)
                                                                          for k, v in self.extra.items()}})
        return {"steps": self.steps, "units": self.units, "time": self.time, **totals}

    def restore(self, state: dict[str, Any], holds_sums: bool) -> None:
        """Rank 0 holds the job's sums, the other ranks zero: the next line's mean over ranks is unchanged."""
        self.reset()
        self.steps, self.units, self.time = state["steps"], state["units"], state["time"]
        if holds_sums:
            self.loss.fill_(state["loss"])
            for key, value in state.items():
                if key.startswith("extra/"):
                    self.extra[key[len("extra/"):]].fill_(value)


class _SampledLabels:
    """The task as a curvature pass shows it to the strategy: its `loss` is `task.sampled_loss`, the loss on
    labels drawn from the model's own predictions, with the next micro-batch's generators (a strategy
    computes the losses of a step's micro-batches once each, in order)."""

    def __init__(self, task: Any, generators: list[list[torch.Generator]]):
        self.task, self.generators = task, iter(generators)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.task.sampled_loss(model, batch, next(self.generators)), {}


class _CurvatureStep:
    """Stands in for the optimizer in `strategy.clip_and_step` on a curvature pass: `step()` updates the
    optimizer's curvature estimate from the gradients instead of the parameters; all else is the optimizer's."""

    def __init__(self, optimizer: torch.optim.Optimizer, num_samples: int):
        self.optimizer, self.num_samples = optimizer, num_samples

    def step(self, closure: Any = None) -> None:
        self.optimizer.update_curvature(self.num_samples)

    def __getattr__(self, name: str) -> Any:  # param_groups, state: what a strategy or GradScaler reads
        return getattr(self.optimizer, name)


class Trainer:
    def __init__(self, config: LoadedConfig, run_dir: Path, strategy: Strategy | None = None):
        self.config = config
        self.cfg = config.run
        self.tc = config.run.trainer
        self.run_dir = Path(run_dir)
        self.strategy = strategy
        self.step = 0
        self.stop = _StopRequest()
        self.saved_step = -1  # step of the last checkpoint written or loaded
        self.evaluated_step = -1
        self.sampled_step = -1
        self.sample_paths: list[Path] = []
        self.owns_process_group = False

    # == setup ==========================================================================================
    def setup(self) -> None:
        tc = self.tc
        self.owns_process_group = not torch.distributed.is_initialized()
        if self.strategy is None:
            self.strategy = build_strategy(self.cfg.strategy, tc)
        strategy = self.strategy
        self.device = strategy.device
        self.window = _LogWindow(self.device)
        shared_cores = strategy.world_size > 1 or "SLURM_CPUS_PER_TASK" in os.environ
        threads = tc.threads or (default_threads(strategy.info.local_world_size)
                                 if shared_cores and self.device.type == "cpu" else None)
        if threads:
            torch.set_num_threads(threads)
        seed_everything(self.cfg.seed)
        set_deterministic(tc.deterministic)
        self._check_batch_size()

        check_resumable(self.run_dir, self.config.tree)  # before any work: refuse a mismatched run early

        self.data = instantiate(self.cfg.data)
        self.model, self.optimizer = strategy.prepare(
            model_builder(self.cfg, strategy.device, strategy.name, strategy.precision,
                          prune=getattr(strategy, "prune", None)),
            lambda m: instantiate(self.cfg.optimizer, params=weight_decay_groups(m)))
        self.raw_model = strategy.unwrap(self.model)  # the module itself: evaluation, samples, task.prepare
        # the model was built from the same seed on every rank; from here on each rank draws its own
        # random numbers (dropout masks), or all ranks would drop the same units of different examples
        seed_everything(rank_seed(self.cfg.seed, strategy.rank))
        self.task = instantiate(self.cfg.task)
        if hasattr(self.task, "prepare"):
            self.task.prepare(self.raw_model, self.data)
        self.scheduler = (instantiate(self.cfg.scheduler, optimizer=self.optimizer)
                          if self.cfg.scheduler else None)
        self._check_curvature()
        if tc.compile:
            self.model = torch.compile(self.model)
        self.grad_bytes: dict[int, int] = {}
        self._measure_gradients = self.optimizer.register_step_pre_hook(self._record_gradient_bytes)

        # nothing is written until data, model and task were built without error
        if strategy.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock = RunDirLock(self.run_dir)
        strategy.barrier()
        self.checkpoints = CheckpointDir(self.run_dir / "checkpoints", tc.keep_last, is_main=strategy.is_main)
        self.checkpoints.remove_partial()

        self.train_sampler = EpochSampler(len(self.data.train), tc.batch_size, seed=self.cfg.seed)
        n_eval = tc.eval_batches * tc.batch_size
        n_eval -= min(n_eval, len(self.data.val)) % strategy.data_world_size  # equal shares for every rank
        self.eval_indices = evaluation_indices(len(self.data.val), n_eval)

        self._resume()
        self.log = MetricsLog(self.run_dir, tensorboard=tc.tensorboard, enabled=strategy.is_main)
        if strategy.is_main:
            (self.run_dir / "config.yaml").write_text(dump_yaml(self.config.tree))
            tokenizer = getattr(self.data, "tokenizer", None)
            if tokenizer is not None and hasattr(tokenizer, "to_json"):
                (self.run_dir / "tokenizer.json").write_text(json.dumps(tokenizer.to_json()))

    def _check_batch_size(self) -> None:
        tc, world = self.tc, self.strategy.data_world_size
        per_step = world * tc.grad_accum_steps
        if tc.batch_size % per_step:
            raise PapertrainError(
                f"trainer.batch_size={tc.batch_size} is the global batch; it must split evenly into "
                f"{world} rank(s) x {tc.grad_accum_steps} micro-batch(es) = {per_step}",
                f"use a multiple of {per_step}, e.g. trainer.batch_size={max(per_step, tc.batch_size // per_step * per_step)}")

    def _resume(self) -> None:
        latest = self.checkpoints.latest()
        if latest is None:
            if self.strategy.is_main:
                truncate_metrics(self.run_dir / "metrics.jsonl", -1)
            return
        step, folder = latest
        # model, optimizer and this rank's random generators; nothing may draw random numbers after this
        state = self.strategy.load(folder, self.model, self.optimizer)
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = self.saved_step = self.evaluated_step = self.sampled_step = state["step"]
        if state.get("window"):
            self.window.restore(state["window"], self.strategy.is_main)
        if self.strategy.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        self.resumed_from = folder

    # == the loop =======================================================================================
    def run(self) -> RunResult:
        started = time.perf_counter()
        try:
            self.setup()
            return self._run(started)
        finally:
            self._close()

    def _run(self, started: float) -> RunResult:
        total = self.tc.max_steps
        if self.step >= total:
            return RunResult(self.run_dir, "already complete", self.step, 0.0,
                             last_values(read_metrics(self.run_dir / "metrics.jsonl")))
        self._announce()
        progress = Progress(self.tc.progress, total, self.step, enabled=self.strategy.is_main)
        self.progress = progress
        self.stop.install()
        try:
            status = self._train(progress)
            self._finish(final=status == "completed")
        finally:
            self.stop.uninstall()
            progress.close()
        plot = self._plot() if self.strategy.is_main and self.tc.plot else None
        metrics = last_values(read_metrics(self.run_dir / "metrics.jsonl")) if self.strategy.is_main else {}
        wall = time.perf_counter() - started
        if self.strategy.is_main and status == "completed":
            summary = {"status": status, "step": self.step, "wall_s": round(wall, 1),
                       **{k: v for k, v in metrics.items() if k != "time" and not isinstance(v, str)}}
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return RunResult(self.run_dir, status, self.step, wall, metrics, self.sample_paths, plot)

    def _close(self) -> None:
        if hasattr(self, "log"):
            self.log.close()
        if self.strategy is not None:
            self.strategy.teardown()
        if hasattr(self, "lock"):
            self.lock.release()
        if self.owns_process_group and torch.distributed.is_initialized():
            # Free the model (FSDP2 keeps references to its process groups) before the groups go, so
            # each group is destroyed now, its worker threads joined, not during interpreter exit: a gloo
            # worker releasing its last collective then needs the GIL, and aborts the process.
            for name in ("model", "raw_model", "optimizer", "scheduler"):
                self.__dict__.pop(name, None)
        if self.owns_process_group:
            disconnect()

    def _announce(self) -> None:
        if not self.strategy.is_main:
            return
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        n_params += sum(b.numel() for b in self.raw_model.buffers() if b.dtype == torch.int8)  # int8 weights
        n_trainable = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
        frozen = (f" ({n_trainable:,} trainable, {100 * n_trainable / max(n_params, 1):.2f}%)"
                  if n_trainable < n_params else "")
        sources = [f"weights from {self.cfg.pretrained.path}"] if self.cfg.pretrained else []
        sources += [f"int8 ({self.cfg.quant.backend})"] if self.cfg.quant else []
        describe = getattr(self.data, "describe", None)
        lines = [f"run dir: {self.run_dir}",
                 f"model:   {getattr(self.raw_model, 'display_name', type(self.raw_model).__name__)}, "
                 f"{n_params / 1e6:.2f}M parameters{frozen}"
                 + (f"; {', '.join(sources)}" if sources else ""),
                 f"data:    {describe() if describe else type(self.data).__name__}",
                 f"device:  {self.strategy.describe()}, global batch {self.tc.batch_size}"]
        if self.step:
            lines.append(f"resumed: from {self.resumed_from} (step {self.step})")
        print("\n".join(lines), flush=True)

    def _train(self, progress: Progress) -> str:
        tc = self.tc
        window = self.window  # the steps since the last logged line (restored on resume: see _save)
        step_time_avg: float | None = None
        while self.step < tc.max_steps:
            if self.strategy.any_rank(self.stop.requested is not None):  # all ranks stop at the same step
                self._save()
                return "interrupted"
            tick = time.perf_counter()
            loss, parts, units, grad_norm = self.train_step()
            window.loss += loss
            for k, v in parts.items():
                window.extra[k] += v
            window.steps += 1
            window.units += units
            window.time += time.perf_counter() - tick

            if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                mean = self.strategy.mean_across_ranks(
                    {"train/loss": (window.loss / window.steps).item(),
                     **{f"train/{k}": (v / window.steps).item() for k, v in window.extra.items()}})
                rate = window.units / max(window.time, 1e-9)  # units of the whole job
                per_step = window.time / window.steps
                step_time_avg = per_step if step_time_avg is None else 0.7 * step_time_avg + 0.3 * per_step
                values = {**mean, "train/lr": self.optimizer.param_groups[0]["lr"],
                          f"throughput/{self.task.unit}_per_s": rate,
                          "memory/peak_bytes": peak_memory_bytes(self.device)}
                if grad_norm is not None:
                    values["train/grad_norm"] = float(grad_norm)
                self.log.log(self.step, values)
                eta = step_time_avg * (tc.max_steps - self.step)
                progress.update(self.step, {"loss": f"{mean['train/loss']:.4f}", self.task.unit + "/s": f"{rate:,.0f}"},
                                eta)
                window.reset()

            if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.max_steps:
                self._evaluate()
            if tc.sample_every > 0 and self.step % tc.sample_every == 0 and self.step < tc.max_steps:
                self._sample()
            if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                self._save()
        return "completed"

    def train_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, torch.Tensor | float | None]:
        """One optimizer step on the global batch of `self.step`, then `self.step += 1`.

        A task's loss is a mean over the units its `count()` counts (tokens, non-padding tokens,
        samples). Micro-batches and ranks may hold different numbers of them, so each micro-batch's loss
        is weighted by its share of the whole step's units: the gradient is then the gradient of the
        global mean on any number of ranks and micro-batches. (Data parallelism averages gradients
        over the W ranks, hence the factor W.)

        Returns the step's global mean loss (this rank's share x W, to be averaged over ranks), extra
        metrics likewise, the units of the whole step, and the gradient norm.
        """
        tc, strategy = self.tc, self.strategy
        indices = self.train_sampler.indices(self.step)
        self.model.train()
        micro_batches = [to_device(self.data.train.batch(shard(indices, strategy.data_rank, strategy.data_world_size,
                                                                 tc.grad_accum_steps, micro)), self.device)
                         for micro in range(tc.grad_accum_steps)]
        local_units = [self.task.count(batch) for batch in micro_batches]
        step_units = max(1.0, strategy.sum_across_ranks({"units": float(sum(local_units))})["units"])
        weights = [units * strategy.data_world_size / step_units for units in local_units]
        if self.curvature_every and self.step and self.step % self.curvature_every == 0:
            self._update_curvature(micro_batches, weights, step_units)
        total, parts_total = self._forward_backward(self.task, micro_batches, weights)
        grad_norm = strategy.clip_and_step(self.model, self.optimizer, tc.grad_clip)
        if self.step == 0:  # model-state bytes per rank, once gradients and optimizer state exist
            memory = strategy.memory_by_kind(self.model, self.optimizer)
            memory["memory/grads_bytes"] = max(memory["memory/grads_bytes"], sum(self.grad_bytes.values()))
            self._measure_gradients.remove()
            self.log.log(1, {k: float(v) for k, v in strategy.mean_across_ranks(memory).items()})
        strategy.zero_grad(self.optimizer)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        if not torch.isfinite(total):
            raise PapertrainError(
                f"training loss became {total.item()} at step {self.step}",
                "lower optimizer.lr, enable trainer.grad_clip, or use trainer.precision=fp32; "
                f"the last good checkpoint is in {self.run_dir / 'checkpoints'}")
        return total, parts_total, int(step_units), grad_norm

    def _forward_backward(self, task: Any, micro_batches: list[dict[str, torch.Tensor]], weights: list[float]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward passes of `task.loss` over the step's micro-batches, each loss weighted by its
        share of the step's units; returns this rank's share of the step's loss and extra metrics."""
        tc, strategy = self.tc, self.strategy
        if hasattr(strategy, "forward_backward"):  # a pipeline schedules the micro-batches across its stages
            return strategy.forward_backward(self.model, task, micro_batches, weights)
        total = torch.zeros((), device=self.device)
        parts_total: dict[str, torch.Tensor] = {}
        for micro, (batch, weight) in enumerate(zip(micro_batches, weights)):
            with strategy.micro_step_context(self.model, micro == tc.grad_accum_steps - 1):
                with strategy.autocast():
                    loss, parts = task.loss(self.model, batch)
                strategy.backward(loss * weight)
            total += loss.detach().float() * weight
            for k, v in parts.items():
                parts_total[k] = parts_total.get(k, 0) + v.detach().float() * weight
        return total, parts_total

    # == the curvature hook (Sophia, recipes/optim/sophia) ==============================================
    def _check_curvature(self) -> None:
        """An optimizer that estimates curvature from the model's own predictions declares `curvature_every`
        (k) and `update_curvature(num_samples)`; the task must be able to sample labels. Checked before any step."""
        self.curvature_every = int(getattr(self.optimizer, "curvature_every", 0) or 0)
        if not self.curvature_every:
            return
        name = type(self.optimizer).__name__
        if not callable(getattr(self.task, "sampled_loss", None)):
            raise PapertrainError(f"{name} estimates curvature from labels sampled from the model, but the task "
                                  f"{type(self.task).__name__} has no sampled_loss(model, batch, generators)",
                                  "use another optimizer, or give the task a sampled_loss (see LanguageModelTask)")
        if self.strategy.name == "deepspeed" and self.tc.max_steps > self.curvature_every:
            raise PapertrainError(f"{name} refreshes its curvature every {self.curvature_every} steps with an extra "
                                  "backward pass, which strategy=deepspeed cannot run: its engine steps the "
                                  "optimizer inside backward and keeps the gradients in its own partitions",
                                  "use strategy=fsdp2 (sharded like ZeRO-3) or strategy=ddp")

    def _update_curvature(self, micro_batches: list[dict[str, torch.Tensor]], weights: list[float],
                          step_units: float) -> None:
        """Every k-th step, before its own forward/backward: one more pass over the same micro-batches, on
        labels drawn from the model's own predictions (`task.sampled_loss`), through the same path as
        training, so the gradient ĝ is reduced across ranks (all-reduced, reduce-scattered, pipelined)
        exactly as g is. The strategy then finishes the gradients as on any step (unscaling them, gathering
        shards), without clipping, and calls `update_curvature(B)` in place of the optimizer's `step`, B
        being the step's units (the labels sampled); then the gradients are cleared.

        One generator per example, seeded from (seed, step, its place in the global batch): the labels do
        not depend on how the batch is split over ranks and micro-batches, and a resumed run draws them
        again exactly. The curvature estimate itself is optimizer state, so it is checkpointed."""
        strategy, tc = self.strategy, self.tc
        positions = torch.arange(tc.batch_size)
        generators = [[torch.Generator(device=self.device).manual_seed(
                           ((self.cfg.seed * 1_000_003 + self.step) * 1_000_003 + int(p)) % 2**63)
                       for p in shard(positions, strategy.data_rank, strategy.data_world_size,
                                      tc.grad_accum_steps, micro)]
                      for micro in range(tc.grad_accum_steps)]
        self._forward_backward(_SampledLabels(self.task, generators), micro_batches, weights)
        strategy.clip_and_step(self.model, _CurvatureStep(self.optimizer, int(step_units)), None)
        strategy.zero_grad(self.optimizer)

    # == evaluation, samples, checkpoints ==============================================================
    def _evaluate(self) -> dict[str, float]:
        """Validation metrics over the fixed evaluation subset, shared out across ranks.

        A metric is averaged weighted by `task.count(batch)` (the units its mean is over), or, when the
        task returns it as a `(total, count)` pair, summed as such (e.g. exact matches per sequence).
        """
        strategy, batch_size = self.strategy, self.tc.batch_size
        self.raw_model.eval()
        sums: dict[str, float] = defaultdict(float)
        with torch.no_grad():
            for start in range(0, len(self.eval_indices), batch_size):
                chunk = self.eval_indices[start:start + batch_size]
                local = shard(chunk, strategy.data_rank, strategy.data_world_size, 1, 0)
                batch = to_device(self.data.val.batch(local), self.device)
                with strategy.autocast():
                    values = self.task.evaluate(self.raw_model, batch)
                units = float(self.task.count(batch))
                for k, v in values.items():
                    total, count = (float(v[0]), float(v[1])) if isinstance(v, tuple) else (float(v) * units, units)
                    sums[f"{k}/total"] += total
                    sums[f"{k}/count"] += count
        sums = strategy.sum_across_ranks(dict(sums))
        names = sorted({k.rsplit("/", 1)[0] for k in sums})
        means = {f"val/{k}": sums[f"{k}/total"] / max(sums[f"{k}/count"], 1e-12) for k in names}
        self.log.log(self.step, means)
        self.evaluated_step = self.step
        if strategy.is_main:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in means.items())
            self.progress.write(f"step {self.step}: {shown}")
        return means

    def _sample(self) -> None:
        if not hasattr(self.task, "sample"):
            return
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 7919 + self.step)
        self.raw_model.eval()
        with torch.no_grad(), self.strategy.autocast():
            samples = self.task.sample(self.raw_model, self.data, generator)
        self.sampled_step = self.step
        if self.strategy.is_main and samples:
            self.sample_paths = write_samples(self.run_dir / "samples", self.step, samples)
            self.log.log(self.step, {f"sample/{k}": v for k, v in samples.items()
                                     if isinstance(v, (str, int, float)) and not isinstance(v, bool)})
            if self.sample_paths:
                self.progress.write(f"step {self.step}: samples -> {', '.join(map(str, self.sample_paths))}")

    def _save(self) -> None:
        if self.saved_step == self.step:
            return
        self._commit_pending()  # one background save at a time
        state = {"step": self.step, "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                 "data": {"step": self.step, "epoch": self.train_sampler.epoch_of(self.step)},
                 "window": self.window.state(self.strategy)}
        strategy = self.strategy
        meta = {"world_size": strategy.world_size, "strategy": strategy.name, "format": strategy.checkpoint_format}
        if getattr(strategy, "consolidate_module", None):
            meta["consolidate"] = strategy.consolidate_module  # how `papertrain export` reads this format
        folder = self.checkpoints.begin(self.step)
        pending = strategy.save(folder, self.model, self.optimizer, state) or []
        self.pending_save = (self.step, pending, meta)
        if not pending:
            self._commit_pending()
        self.saved_step = self.step

    def _commit_pending(self) -> None:
        """Wait for a checkpoint being written in the background, then rename it into place."""
        if getattr(self, "pending_save", None) is None:
            return
        step, futures, meta = self.pending_save
        for future in futures:
            future.result()
        self.checkpoints.commit(step, meta)
        self.pending_save = None

    def _record_gradient_bytes(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Just before the first optimizer step: the bytes of the gradients this rank holds. (DeepSpeed
        steps one parameter group at a time, so this may run several times; each gradient counts once.)"""
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.grad_bytes[id(p)] = local_bytes(p.grad)

    def _finish(self, final: bool) -> None:
        if final:
            if self.evaluated_step != self.step:
                self._evaluate()
            if self.sampled_step != self.step and self.tc.sample_every >= 0:
                self._sample()
        self._save()
        self._commit_pending()
        if not final and self.strategy.is_main:
            print(f"interrupted at step {self.step}; checkpoint saved in {self.run_dir / 'checkpoints'}. "
                  "Run the same command again to resume.", file=sys.stderr, flush=True)

    def _plot(self) -> Path | None:
        name = self.cfg.name or self.run_dir.name
        return plot_curves(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "plots" / "loss.png", name)


def default_threads(processes_on_this_machine: int) -> int:
    """CPU threads per rank when several ranks share this machine's cores (under Slurm: the task's CPUs)."""
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    return max(1, (os.cpu_count() or 1) // max(1, processes_on_this_machine))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory; on CPU, the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def write_samples(folder: Path, step: int, samples: dict[str, Any]) -> list[Path]:
    """Text samples go into one .txt per step; images (tensors, or matplotlib figures) into PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    texts = {k: v for k, v in samples.items() if isinstance(v, str)}
    if texts:
        path = folder / f"step_{step:08d}.txt"
        if len(texts) == 1:
            path.write_text(next(iter(texts.values())) + "\n")
        else:
            path.write_text("".join(f"=== {k} ===\n{v}\n\n" for k, v in texts.items()))
        written.append(path)
    for name, value in samples.items():
        path = folder / f"step_{step:08d}_{name}.png"
        if isinstance(value, torch.Tensor):
            save_image_grid(value, path)
        elif hasattr(value, "savefig"):  # a matplotlib figure the task drew (axes, labels, colour bars)
            import matplotlib.pyplot as plt

            value.savefig(path, dpi=110)
            plt.close(value)
        else:
            continue
        written.append(path)
    return written


def save_image_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    """[N, C, H, W] or [C, H, W] in [0, 1] -> one PNG, tiled in rows of `columns`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = images.detach().float().cpu().clamp(0, 1)
    if images.dim() == 3:
        images = images[None]
    n, c, h, w = images.shape
    columns = min(columns, n)
    rows = (n + columns - 1) // columns
    grid = torch.ones(c, rows * (h + 2), columns * (w + 2))
    for i in range(n):
        r, col = divmod(i, columns)
        grid[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = images[i]
    array = grid.permute(1, 2, 0).numpy()
    plt.imsave(path, array[..., 0] if c == 1 else array, cmap="gray" if c == 1 else None)
