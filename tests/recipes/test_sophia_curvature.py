"""Sophia's curvature pass, a callback the optimizer ships (recipes/optim/sophia/curvature.py): before every
k-th step, the optimizer's `update_curvature(num_samples)` gets the gradient of the loss on labels sampled
from the model itself, over the whole global batch, reduced across ranks as a training gradient is; the
pass leaves the training step untouched, resumes exactly, and gives the same result on 1 process and on
2 ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import RECIPES, SMALL_GPT
from multiprocess import run_ranks
from papertrain.config import load_config
from papertrain.errors import PapertrainError
from papertrain.metrics import read_metrics
from papertrain.recipes.optim.sophia.model import SophiaG
from papertrain.recipes.transformers.gpt.task import LanguageModelTask
from papertrain.trainer import Trainer

SOPHIA = RECIPES / "optim" / "sophia" / "tiny.yaml"
SHORT = ["trainer.max_steps=10", "scheduler.total_steps=10", "optimizer.curvature_every=3",
         f"trust=[{__name__}]"]  # the test's own optimizer and task classes


class RecordingSophia(SophiaG):
    """SophiaG that records each curvature update: after how many steps, with how many samples, and
    whether every parameter had a gradient; `record_only` leaves the curvature at 0."""

    record_only = False
    calls: list[tuple[int, int, bool]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps_taken = 0
        RecordingSophia.calls = []

    def update_curvature(self, num_samples: int) -> None:
        every_grad = all(p.grad is not None for g in self.param_groups for p in g["params"])
        RecordingSophia.calls.append((self.steps_taken, num_samples, every_grad))
        if not self.record_only:
            super().update_curvature(num_samples)

    def step(self, closure=None):  # type: ignore[override]
        self.steps_taken += 1
        return super().step(closure)


class RecordOnly(RecordingSophia):
    record_only = True


class NoSampling(LanguageModelTask):
    sampled_loss = None  # a task that cannot draw labels from the model


def config(*overrides: str):
    return load_config(SOPHIA, [*SMALL_GPT, *SHORT, *overrides])


def losses(run_dir: Path) -> list[float]:
    return [e["train/loss"] for e in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in e]


def test_the_curvature_is_refreshed_before_every_kth_step_from_the_global_batch(tmp_path: Path) -> None:
    Trainer(config(f"optimizer._component_={__name__}.RecordingSophia"), tmp_path).run()
    tokens = 8 * 32  # SMALL_GPT: batch 8 x 32 tokens, every one a sampled label
    assert RecordingSophia.calls == [(3, tokens, True), (6, tokens, True), (9, tokens, True)]


def test_the_curvature_pass_leaves_no_trace_but_the_curvature(tmp_path: Path) -> None:
    """With an update_curvature that only records, training is bit-identical to a run without the pass
    (the sampled gradients are cleared before the step's own backward, nothing else changes); with the
    real one, the steps change from the first pass (step 3) on."""
    Trainer(config(f"optimizer._component_={__name__}.RecordOnly"), tmp_path / "record-only").run()
    assert len(RecordingSophia.calls) == 3
    Trainer(config("optimizer.curvature_every=1000"), tmp_path / "without").run()
    Trainer(config(), tmp_path / "with").run()
    without, with_curvature = losses(tmp_path / "without"), losses(tmp_path / "with")
    assert losses(tmp_path / "record-only") == without
    assert with_curvature[:4] == without[:4] and with_curvature[4:] != without[4:]


@pytest.mark.slow
def test_resume_is_bit_identical_with_the_curvature_hook(tmp_path: Path) -> None:
    """10 straight steps == 5 steps, a fresh process state, then 5 more, with curvature passes at steps
    3, 6 and 9 and dropout on (the extra forward pass draws dropout masks too)."""
    common = ["model.dropout=0.1", "trainer.checkpoint_every=5"]
    Trainer(config(*common), tmp_path / "straight").run()
    Trainer(config(*common, "trainer.max_steps=5"), tmp_path / "resumed").run()
    torch.manual_seed(12345)  # disturb the global RNG: the checkpoint must restore it
    Trainer(config(*common), tmp_path / "resumed").run()
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    folder = "checkpoints/step_00000010/optimizer/model-00001-of-00001.safetensors"
    straight, resumed = load_file(tmp_path / "straight" / folder), load_file(tmp_path / "resumed" / folder)
    hessians = [k for k in straight if k.endswith(".hessian")]
    assert hessians and all(straight[k].abs().sum() > 0 for k in hessians)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_task_that_cannot_sample_labels_is_a_clear_error_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(PapertrainError, match="no sampled_loss"):
        Trainer(config(f"task._component_={__name__}.NoSampling"), tmp_path / "run").run()
    assert not (tmp_path / "run").exists()


def train_rank(run_dir: str, overrides: list[str]) -> None:
    Trainer(config(*overrides), Path(run_dir)).run()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero3_reference"])
def test_two_ranks_compute_what_one_process_computes(tmp_path: Path, strategy: str) -> None:
    """Curvature passes at steps 2, 4, 6: one process with 2 micro-batches == 2 ranks with one each (the
    sampled labels depend on each example's place in the global batch, not on who computes it)."""
    steps = ["trainer.max_steps=7", "scheduler.total_steps=7", "optimizer.curvature_every=2"]
    train_rank(str(tmp_path / "one"), [*steps, "trainer.grad_accum_steps=2"])
    run_ranks(2, train_rank, str(tmp_path / "two"), [*steps, f"strategy={strategy}"])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 7 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)


def test_deepspeed_refuses_a_run_that_needs_a_curvature_pass_before_training(tmp_path: Path) -> None:
    """SophiaG declares the second backward pass it needs; validate refuses DeepSpeed before any work."""
    from papertrain.errors import ConfigError

    with pytest.raises(ConfigError, match="an extra backward pass .* cannot run under strategy=deepspeed"):
        config("strategy=deepspeed", "strategy.world_size=1")
    config("strategy=deepspeed", "strategy.world_size=1", "trainer.max_steps=3")  # a run shorter than k needs none
    assert not (tmp_path / "run").exists()
