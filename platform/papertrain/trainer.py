"""The one training loop, for every recipe.

    setup()   strategy -> data -> model and optimizers -> task -> artifacts -> schedulers -> callbacks -> resume
    train()   the loop below: one screen, top to bottom
    finish    final evaluation, samples and checkpoint; summary.json; loss plot

Each step: the batch (an indexed data set's share for this rank, a stateful source's next batch, or
none for a solver), callbacks' `before_step`, the step itself (the task's own `train_step(ctx, batch)`,
or `default_step`: the loss, its backward pass and one optimizer step), callbacks' `after_step`. The
objects beside the loop do the rest: `Checkpointer` (papertrain/checkpointing.py), `Evaluator`
(evaluation.py), `TrainingLog`, `LogWindow` and `MemoryProbe` (trainlog.py), `StopRequest` (stopping.py).

What a step computes is fixed by (seed, step) and the checkpointed state alone: the batch comes from
`EpochSampler.indices(step)` or a source whose state is checkpointed, and a checkpoint holds model,
optimizers, schedulers, every RNG and every named state. That is why a resumed run continues
bit-identically on CPU, and why N ranks compute what one process computes on the same global batch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from papertrain.artifacts import prepare_artifacts
from papertrain.callbacks import Callbacks
from papertrain.checkpointing import Checkpointer
from papertrain.config import LoadedConfig, dump_yaml, locate
from papertrain.data.batches import IndexedBatches, SourceBatches, is_stateful_source
from papertrain.distributed import disconnect
from papertrain.errors import PapertrainError
from papertrain.evaluation import Evaluator, write_samples
from papertrain.metrics import MetricsLog, Progress, format_count, last_values, plot_curves, read_metrics, truncate_metrics
from papertrain.modelbuild import model_builder
from papertrain.rundir import Extension, RunDirLock, check_resumable, check_writable, clear_run_dir
from papertrain.schedules import load_schedule_progress
from papertrain.seeding import rank_seed, seed_everything, set_deterministic
from papertrain.steps import StepContext, default_step, step_units
from papertrain.stopping import StopRequest
from papertrain.strategies import Strategy, build_strategy
from papertrain.trainlog import LogWindow, MemoryProbe, TrainingLog
from papertrain.warnlog import ThirdPartyWarnings


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "completed", "interrupted" or "already complete"
    step: int
    wall_s: float  # the whole run's training time, over every segment (a resumed run has several)
    metrics: dict[str, Any] = field(default_factory=dict)
    samples: list[Path] = field(default_factory=list)
    plot: Path | None = None
    segments: int = 1  # how many commands trained it (1 + the number of resumes)


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


class Trainer:
    def __init__(self, config: LoadedConfig, run_dir: Path, strategy: Strategy | None = None, restart: bool = False):
        self.config = config
        self.restart = restart  # clear what a previous run left in run_dir, then start at step 0
        self.cfg = config.run
        self.tc = config.run.trainer
        self.run_dir = Path(run_dir)
        self.strategy = strategy
        self.stop = StopRequest()
        self.sample_paths: list[Path] = []
        self.evaluated_step = self.sampled_step = -1
        self.owns_process_group = False
        self.extension: Extension | None = None
        self.history: list[dict[str, Any]] = []  # the earlier segments of this run (from its checkpoint)
        self.segment: dict[str, Any] | None = None  # this command's part of the run (set when training starts)

    @property
    def step(self) -> int:
        return self.ctx.step if hasattr(self, "ctx") else 0

    # == setup ==========================================================================================
    def setup(self) -> None:
        tc, cfg = self.tc, self.cfg
        self.owns_process_group = not torch.distributed.is_initialized()
        task_class = locate(cfg.task["_component_"], self.config.policy)
        self.custom_step = callable(getattr(task_class, "train_step", None))
        if self.strategy is None:
            self.strategy = build_strategy(cfg.strategy, tc, custom_step=self.custom_step)
        strategy = self.strategy
        self.device = strategy.device
        self.window = LogWindow(self.device)
        shared_cores = strategy.world_size > 1 or "SLURM_CPUS_PER_TASK" in os.environ
        threads = tc.threads or (default_threads(strategy.info.local_world_size)
                                 if shared_cores and self.device.type == "cpu" else None)
        if threads:
            torch.set_num_threads(threads)
        seed_everything(cfg.seed)
        set_deterministic(tc.deterministic)
        self._check_batch_size()
        if strategy.is_main:
            check_writable(self.run_dir)  # before any work: a read-only or missing disk says so now
        if self.restart:
            if strategy.is_main:
                self.restarted_from = clear_run_dir(self.run_dir)
            strategy.barrier()
        self.extension = check_resumable(self.run_dir, self.config)  # and a mismatched run is refused early

        self.data = self.config.build("data") if cfg.data is not None else None
        self.model, self.optimizers = strategy.prepare(
            model_builder(self.config, strategy.device, strategy.name, strategy.precision,
                          prune=strategy.model_filter()),
            self._build_optimizers)
        self.raw_model = strategy.unwrap(self.model)  # the module itself: evaluation, samples, task.prepare
        # the model was built from the same seed on every rank; from here on each rank draws its own
        # random numbers (dropout masks), or all ranks would drop the same units of different examples
        seed_everything(rank_seed(cfg.seed, strategy.rank))
        self.task = self.config.build("task")
        self.ctx = StepContext(strategy=strategy, model=self.model, raw_model=self.raw_model, task=self.task,
                               data=self.data, optimizers=self.optimizers, schedulers={}, trainer=tc,
                               seed=cfg.seed, run_dir=self.run_dir, config=self.config.tree)
        if callable(getattr(self.task, "artifacts", None)):  # built once, cached (papertrain/artifacts.py)
            self.task.use_artifacts(prepare_artifacts(self.task.artifacts(self.ctx) or {}, self.ctx))
        if callable(getattr(self.task, "prepare", None)):
            self.task.prepare(self.raw_model, self.data)
        self.schedulers = self.ctx.schedulers = self._build_schedulers()
        if tc.compile:
            self.model = self.ctx.model = torch.compile(self.model)
        self.callbacks = Callbacks.collect(
            {name: self.config.build(f"callbacks.{name}", section) for name, section in (cfg.callbacks or {}).items()},
            {"model": self.raw_model, "task": self.task, "data": self.data, **self.optimizers})
        self.callbacks.call("prepare", self.ctx)  # each checks what it needs, before any work
        self.ctx.memory_probe = MemoryProbe(strategy, self.optimizers)

        # nothing is written until data, model and task were built without error
        if strategy.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        strategy.barrier()
        if getattr(self, "warnings", None) is not None:
            self.warnings.attach(self.run_dir)
        self.lock = RunDirLock(self.run_dir, strategy)
        self.checkpointer = Checkpointer(self.run_dir, strategy, tc.keep_last)
        if strategy.is_main:
            self.checkpointer.remove_partial()

        if self.data is None:
            self.batches = None
        elif is_stateful_source(self.data):
            self.batches = SourceBatches(self.data, strategy)
        else:
            self.batches = IndexedBatches(self.data, tc.batch_size, tc.grad_accum_steps, cfg.seed, strategy)
        self.evaluator = Evaluator(self.task, self.data, strategy, tc.batch_size, tc.eval_batches, cfg.seed)
        self.named_state = self._named_state()

        self._resume()
        self.metrics = MetricsLog(self.run_dir, tensorboard=tc.tensorboard, enabled=strategy.is_main)
        if strategy.is_main:
            (self.run_dir / "config.yaml").write_text(dump_yaml(self.config.tree))
            tokenizer = getattr(self.data, "tokenizer", None)
            if tokenizer is not None and hasattr(tokenizer, "to_json"):
                (self.run_dir / "papertrain-tokenizer.json").write_text(json.dumps(tokenizer.to_json()))

    def _build_optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        """`optimizer:` (one, over every parameter) or `optimizers:` (each over the part it names)."""
        if self.cfg.optimizer is not None:
            return {"optimizer": self.config.build("optimizer", params=weight_decay_groups(model))}
        built = {}
        for name, section in (self.cfg.optimizers or {}).items():
            part = section.get("parameters")
            try:
                module = model.get_submodule(part) if part else model
            except AttributeError:
                children = ", ".join(n for n, _ in model.named_children())
                raise PapertrainError(f"optimizers.{name}.parameters: the model has no part '{part}'",
                                      f"name one of its submodules: {children}") from None
            arguments = {k: v for k, v in section.items() if k != "parameters"}
            built[name] = self.config.build(f"optimizers.{name}", arguments, params=weight_decay_groups(module))
        return built

    def _build_schedulers(self) -> dict[str, Any]:
        if self.cfg.scheduler is not None:
            return {"optimizer": self.config.build("scheduler", optimizer=self.optimizers["optimizer"])}
        return {name: self.config.build(f"schedulers.{name}", section, optimizer=self.optimizers[name])
                for name, section in (self.cfg.schedulers or {}).items()}

    def _named_state(self) -> dict[str, Any]:
        """Everything stateful besides model and optimizers: checkpointed by name (papertrain/checkpoint.py)."""
        named = {name: obj for name, obj in (("data", self.data), ("task", self.task))
                 if obj is not None and callable(getattr(obj, "state_dict", None))
                 and callable(getattr(obj, "load_state_dict", None)) and not isinstance(obj, nn.Module)}
        return {**named, **self.callbacks.stateful()}

    def _check_batch_size(self) -> None:
        tc, world = self.tc, self.strategy.data_world_size
        per_step = world * tc.grad_accum_steps
        if tc.batch_size % per_step:
            raise PapertrainError(
                f"trainer.batch_size={tc.batch_size} is the global batch; it must split evenly into "
                f"{world} rank(s) x {tc.grad_accum_steps} micro-batch(es) = {per_step}",
                f"use a multiple of {per_step}, e.g. trainer.batch_size={max(per_step, tc.batch_size // per_step * per_step)}")

    def _resume(self) -> None:
        # model, optimizers, named state and this rank's random generators; nothing may draw after this
        state = self.checkpointer.resume(self.model, self.optimizers, self.named_state)
        if state is None:
            if self.strategy.is_main:
                truncate_metrics(self.run_dir / "metrics.jsonl", -1)
            return
        schedulers = state.get("schedulers") or {"optimizer": state.get("scheduler")}
        for name, scheduler in self.schedulers.items():
            if schedulers.get(name) is not None:  # where the schedule is; its settings stay the config's
                load_schedule_progress(scheduler, schedulers[name])
        self.ctx.step = self.evaluated_step = self.sampled_step = state["step"]
        self.history = list(state.get("history") or [])
        if state.get("window"):
            self.window.restore(state["window"], self.strategy.is_main)
        if self.strategy.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step)

    # == the loop =======================================================================================
    def run(self) -> RunResult:
        started = time.perf_counter()
        self.warnings = ThirdPartyWarnings(int(os.environ.get("RANK", "0") or 0))
        self.warnings.install()  # other packages' warnings -> RUN_DIR/warnings.log (papertrain/warnlog.py)
        try:
            self.setup()
            return self._run(started)
        finally:
            self._close()

    def _run(self, started: float) -> RunResult:
        self.segment = {"from_step": self.step, "max_steps": self.tc.max_steps, "started": round(time.time(), 1),
                        "clock": started}
        if self.extension is not None:
            self.segment["extended"] = {"from": self.extension.old_max_steps, "to": self.extension.new_max_steps,
                                        **{k: list(v) for k, v in self.extension.following.items()}}
        if self.step >= self.tc.max_steps:
            return RunResult(self.run_dir, "already complete", self.step,
                             sum(segment.get("wall_s", 0.0) for segment in self.history),
                             last_values(read_metrics(self.run_dir / "metrics.jsonl")), segments=len(self.history))
        self._announce()
        progress = Progress(self.tc.progress, self.tc.max_steps, self.step, enabled=self.strategy.is_main)
        self.log = TrainingLog(self.metrics, progress, self.strategy, self.task_unit, self.tc.max_steps)
        self.stop.install()
        try:
            if self.tc.eval_every and self.step == 0:
                self._evaluate()  # where the curve starts: the validation loss of the untrained model
            status = self.train()
            self._finish(final=status == "completed")
        finally:
            self.stop.uninstall()
            progress.close()
        plot = self._plot() if self.strategy.is_main and self.tc.plot else None
        metrics = last_values(read_metrics(self.run_dir / "metrics.jsonl")) if self.strategy.is_main else {}
        segments = self._segments()
        wall = sum(segment["wall_s"] for segment in segments)
        if self.strategy.is_main and getattr(self, "warnings", None) is not None and self.warnings.summary():
            print(self.warnings.summary(), flush=True)
        if self.strategy.is_main and status == "completed":
            summary = {"status": status, "step": self.step, "wall_s": round(wall, 1),
                       **{k: v for k, v in metrics.items() if k != "time" and not isinstance(v, str)},
                       "segments": segments}
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return RunResult(self.run_dir, status, self.step, wall, metrics, self.sample_paths, plot, len(segments))

    def train(self) -> str:
        tc, ctx = self.tc, self.ctx
        while ctx.step < tc.max_steps:
            if self.stop.agreed(self.strategy):  # every rank stops at the same step
                self._save()
                return "interrupted"
            tick = time.perf_counter()
            loss, parts, units, grad_norm = self.train_step()
            self.window.add(loss, parts, units, time.perf_counter() - tick)
            if ctx.step % tc.log_every == 0 or ctx.step == tc.max_steps:
                self.log.line(ctx.step, self.window, self._learning_rate(), grad_norm, self.device)
            if tc.eval_every and ctx.step % tc.eval_every == 0 and ctx.step < tc.max_steps:
                self._evaluate()
            if tc.sample_every > 0 and ctx.step % tc.sample_every == 0 and ctx.step < tc.max_steps:
                self._sample()
            if tc.checkpoint_every and ctx.step % tc.checkpoint_every == 0 and ctx.step < tc.max_steps:
                self._save()  # (the last step's checkpoint comes after its final evaluation: _finish)
            if self.strategy.any_rank(ctx.stop_reason is not None):  # e.g. a callback: the goal is reached
                self.log.write(f"step {ctx.step}: stopping early ({ctx.stop_reason or 'another rank asked'})")
                break
        return "completed"

    def train_step(self) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], int, Any]:
        """One step, then `ctx.step += 1`. Returns this rank's share of the step's loss (averaged over ranks
        when logged; None for a solver's step, which has none), extra metrics likewise, the units of the
        whole step, and the gradient norm."""
        ctx, task = self.ctx, self.task
        self.model.train()
        ctx.grad_norm, ctx.logged = None, {}
        ctx.micro_batches = self._batches()
        if self.custom_step:
            ctx.units = 0
            if callable(getattr(task, "count", None)) and ctx.micro_batches:
                ctx.units = sum(task.count(batch) for batch in ctx.micro_batches)
            self.callbacks.call("before_step", ctx)
            batches = ctx.micro_batches
            metrics = task.train_step(ctx, None if not batches else batches[0] if len(batches) == 1 else batches)
            ctx.units = int(self.strategy.sum_across_ranks({"units": float(ctx.units)})["units"])
        else:
            step_units(ctx, task.count)
            self.callbacks.call("before_step", ctx)
            metrics = default_step(ctx)
        metrics = {**(metrics or {}), **ctx.logged}
        if ctx.memory is not None and ctx.step == 0:  # model-state bytes per rank, measured in the first step
            self.metrics.log(1, ctx.memory)
        ctx.step += 1
        loss = metrics.pop("loss", None)
        loss = None if loss is None else loss.detach().float()
        if loss is not None and not torch.isfinite(loss):
            raise PapertrainError(
                f"training loss became {loss.item()} at step {ctx.step}",
                "lower optimizer.lr, enable trainer.grad_clip, or use trainer.precision=fp32; "
                + self.checkpointer.safe_on_disk())
        parts = {k: (v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v), device=self.device))
                 for k, v in metrics.items()}
        self.callbacks.call("after_step", ctx, {**({"loss": loss} if loss is not None else {}), **parts})
        return loss, parts, ctx.units, ctx.grad_norm

    def _batches(self) -> list[Any]:
        if self.batches is None:
            return []
        if isinstance(self.batches, SourceBatches):
            return self.batches.micro_batches(self.ctx)
        return self.batches.micro_batches(self.ctx.step)

    def _learning_rate(self) -> float | None:
        if not self.optimizers:
            return None
        return next(iter(self.optimizers.values())).param_groups[0]["lr"]

    @property
    def task_unit(self) -> str:
        return getattr(self.task, "unit", "samples")

    # == evaluation, samples, checkpoints ==============================================================
    def _evaluate(self) -> dict[str, float]:
        if not self.evaluator.available:
            return {}
        self.callbacks.call("before_evaluation", self.ctx)
        means = self.evaluator.evaluate(self.ctx)
        self.metrics.log(self.step, means)
        self.evaluated_step = self.step
        if self.strategy.is_main:
            self.log.write(f"step {self.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in means.items()))
        self.callbacks.call("after_evaluation", self.ctx, means)
        return means

    def _sample(self) -> None:
        self.callbacks.call("before_sample", self.ctx)
        samples = self.evaluator.sample(self.ctx)
        self.callbacks.call("after_sample", self.ctx)
        self.sampled_step = self.step
        if self.strategy.is_main and samples:
            self.sample_paths = write_samples(self.run_dir / "samples", self.step, samples)
            self.metrics.log(self.step, {f"sample/{k}": v for k, v in samples.items()
                                         if isinstance(v, (str, int, float)) and not isinstance(v, bool)})
            if self.sample_paths:
                self.log.write(f"step {self.step}: samples -> {', '.join(map(str, self.sample_paths))}")

    def _save(self) -> None:
        if self.checkpointer.saved_step == self.step:
            return
        self.checkpointer.commit_pending()
        schedulers = {name: s.state_dict() for name, s in self.schedulers.items()}
        state = {"step": self.step, "schedulers": schedulers, "scheduler": schedulers.get("optimizer"),
                 "history": self._segments(),
                 "data": self.batches.position(self.step) if self.batches is not None else {"step": self.step},
                 "window": self.window.state(self.strategy)}
        self.checkpointer.save(self.step, self.model, self.optimizers, state, self.named_state)

    def _segments(self) -> list[dict[str, Any]]:
        """The earlier segments of this run and this one so far: steps, length asked for, training time."""
        if self.segment is None:  # (saving before _run started: a caller driving setup/train itself)
            self.segment = {"from_step": self.step, "max_steps": self.tc.max_steps, "clock": time.perf_counter()}
        current = {k: v for k, v in self.segment.items() if k != "clock"}
        current.update(to_step=self.step, wall_s=round(time.perf_counter() - self.segment["clock"], 2))
        return [*self.history, current]

    def _finish(self, final: bool) -> None:
        if final:
            if self.evaluated_step != self.step:
                self._evaluate()
            if self.sampled_step != self.step and self.tc.sample_every >= 0:
                self._sample()
        self._save()
        self.checkpointer.commit_pending()
        if not final and self.strategy.is_main:
            print(f"interrupted at step {self.step}; checkpoint saved in {self.run_dir / 'checkpoints'}. "
                  "Run the same command again to resume.", file=sys.stderr, flush=True)

    def _plot(self) -> Path | None:
        name = self.cfg.name or self.run_dir.name
        return plot_curves(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "plots" / "loss.png", name,
                           getattr(self.task, "loss_unit", None))

    # == around the run =================================================================================
    def _close(self) -> None:
        if getattr(self, "warnings", None) is not None:
            self.warnings.uninstall()
        if hasattr(self, "metrics"):
            self.metrics.close()
        if self.strategy is not None:
            self.strategy.teardown()
        if hasattr(self, "lock"):
            self.lock.release()
        if self.owns_process_group and torch.distributed.is_initialized():
            # Free the model (FSDP2 keeps references to its process groups) before the groups go, so
            # each group is destroyed now, its worker threads joined, not during interpreter exit: a gloo
            # worker releasing its last collective then needs the GIL, and aborts the process.
            for name in ("model", "raw_model", "optimizers", "schedulers", "ctx"):
                self.__dict__.pop(name, None)
        if self.owns_process_group:
            disconnect()

    def _announce(self) -> None:
        if not self.strategy.is_main:
            return
        # (a DeepSpeed ZeRO-3 parameter is an empty placeholder on each rank: ds_numel is its real size)
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.raw_model.parameters())
        n_params += sum(b.numel() for b in self.raw_model.buffers() if b.dtype == torch.int8)  # int8 weights
        n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.raw_model.parameters() if p.requires_grad)
        frozen = (f" ({n_trainable:,} trainable, {100 * n_trainable / max(n_params, 1):.2f}%)"
                  if n_trainable < n_params else "")
        sources = [f"weights from {self.cfg.pretrained.path}"] if self.cfg.pretrained else []
        sources += [f"int8 ({self.cfg.quant.backend})"] if self.cfg.quant else []
        describe = getattr(self.data, "describe", None)
        lines = [f"run dir: {self.run_dir}",
                 f"model:   {getattr(self.raw_model, 'display_name', type(self.raw_model).__name__)}, "
                 f"{format_count(n_params)} parameters{frozen}"
                 + (f"; {', '.join(sources)}" if sources else ""),
                 f"data:    {describe() if describe else type(self.data).__name__ if self.data is not None else 'none'}",
                 f"device:  {self.strategy.describe()}, global batch {self.tc.batch_size}"]
        if self.step:
            lines.append(f"resumed: from {self.checkpointer.resumed_from} (step {self.step})")
        if getattr(self, "restarted_from", None) is not None:
            lines.append(f"restart: removed the previous run in {self.run_dir} (it had reached step "
                         f"{self.restarted_from}); starting at step 0")
        if self.extension is not None and self.step:
            lines.append(f"extend:  {self.extension.describe()}")
        print("\n".join(lines), flush=True)


def default_threads(processes_on_this_machine: int) -> int:
    """CPU threads per rank when several ranks share this machine's cores (under Slurm: the task's CPUs)."""
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    return max(1, (os.cpu_count() or 1) // max(1, processes_on_this_machine))
