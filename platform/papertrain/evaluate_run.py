"""`papertrain eval RUN_DIR [--split test]`: a trained run's metrics on a whole split, such as MNIST's test set.

During training, validation runs on a fixed subset of the validation split (`trainer.eval_batches`
batches), cheap enough to repeat; a result to report belongs on a split the run never looked at, all
of it. This builds the run's data, model and task from its validated config.yaml, loads a checkpoint
(the latest, or `--step`), and evaluates the task over every example of the split, on one process, in
fp32. The figures go to RUN_DIR/eval/<split>-step_<N>.json and are printed. Recipes that evaluate
themselves (`evaluate_all`: environments, solvers) have no split to choose and are refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from papertrain.errors import PapertrainError

SPLITS = ("train", "val", "test")


class _AsValidation:
    """The data with `split` standing in for `.val`, which is what the evaluator reads."""

    def __init__(self, data: Any, split: Any):
        self._data, self.val = data, split

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)


def evaluate_run(run_dir: Path, split: str = "test", step: int | None = None, device: str = "auto",
                 batch_size: int | None = None, trust: Sequence[str] = ()) -> tuple[dict[str, float], Path, int]:
    """Evaluate a run's checkpoint on all of `split`; returns (metrics named `<split>/...`, file, step)."""
    from papertrain.artifacts import prepare_artifacts
    from papertrain.config.schema import StrategyConfig
    from papertrain.evaluation import Evaluator
    from papertrain.generation import load_checkpoint_into
    from papertrain.modelbuild import model_builder
    from papertrain.rundir import load_run_config
    from papertrain.seeding import seed_everything
    from papertrain.steps import StepContext
    from papertrain.strategies import build_strategy

    run_dir = Path(run_dir)
    config = load_run_config(run_dir, trust=trust)  # validated: a run directory is data
    if split not in SPLITS:
        raise PapertrainError(f"--split {split}: not a split", f"use one of {', '.join(SPLITS)}")
    trainer = dataclasses.replace(config.run.trainer, device=device, precision="fp32")
    strategy = build_strategy(StrategyConfig(name="single"), trainer)
    seed_everything(config.run.seed)
    data = config.build("data") if config.run.data is not None else None
    examples = getattr(data, split, None)
    if examples is None:
        present = [name for name in SPLITS if getattr(data, name, None) is not None] if data is not None else []
        raise PapertrainError(f"{run_dir}: its data has no {split} split"
                              + (f" (it has {', '.join(present)})" if present else " (it has no data set)"),
                              f"use --split {present[-1]}" if present else "evaluate a recipe trained on a data set")
    model = model_builder(config, strategy.device, "single", "fp32", training=False)()
    folder = load_checkpoint_into(model, run_dir, step)
    model = model.to(strategy.device).eval()
    step_of = int(folder.name.removeprefix("step_"))
    task = config.build("task")
    if callable(getattr(task, "evaluate_all", None)):
        raise PapertrainError(f"{run_dir}: this recipe evaluates itself (e.g. on environment episodes), not on a "
                              "split of a data set", "its val/ metrics in metrics.jsonl are its evaluation")
    ctx = StepContext(strategy=strategy, model=model, raw_model=model, task=task, data=data, optimizers={},
                      schedulers={}, trainer=trainer, seed=config.run.seed, run_dir=run_dir, config=config.tree)
    ctx.step = step_of
    if callable(getattr(task, "artifacts", None)):  # (cached by the run that trained it)
        task.use_artifacts(prepare_artifacts(task.artifacts(ctx) or {}, ctx))
    if callable(getattr(task, "prepare", None)):
        task.prepare(model, data)
    size = batch_size or trainer.batch_size
    evaluator = Evaluator(task, _AsValidation(data, examples), strategy, size, eval_batches=1, seed=config.run.seed)
    evaluator.indices = torch.arange(len(examples))  # every example, in order
    measured = {f"{split}/{key.removeprefix('val/')}": value for key, value in evaluator.evaluate(ctx).items()}
    measured[f"{split}/examples"] = len(examples)
    out = run_dir / "eval" / f"{split}-step_{step_of:08d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"step": step_of, "split": split, "checkpoint": folder.name, **measured}, indent=2))
    strategy.teardown()
    return measured, out, step_of
