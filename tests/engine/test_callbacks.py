"""Callbacks and named state, proven on the EMA of the weights (papertrain/nn/ema.py), the callback that
diffusion and GAN recipes evaluate with: its average is the formula's, it is checkpointed and resumes bit
for bit, it is used for evaluation without touching training, and it reshards under FSDP2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import SMALL_GPT, gpt_config_path
from multiprocess import run_ranks
from papertrain.config import load_config
from papertrain.metrics import read_metrics
from papertrain.trainer import Trainer

EMA = ["callbacks={ema: {_component_: papertrain.nn.ema.EMA, decay: 0.9}}", "scheduler.total_steps=8"]


class RecordParameters:
    """Records the model's parameters after every step (what the EMA must average)."""

    seen: list[dict[str, torch.Tensor]] = []

    def prepare(self, ctx) -> None:
        RecordParameters.seen = [{n: p.detach().clone() for n, p in ctx.raw_model.named_parameters()}]

    def after_step(self, ctx, metrics) -> None:
        RecordParameters.seen.append({n: p.detach().clone() for n, p in ctx.raw_model.named_parameters()})


def train(run_dir: Path, *overrides: str) -> Trainer:
    trainer = Trainer(load_config(gpt_config_path(), [*SMALL_GPT, *EMA, *overrides]), run_dir)
    trainer.run()
    return trainer


def test_the_average_is_the_formula_over_the_trained_weights(tmp_path: Path) -> None:
    recorded = ["callbacks.record._component_=test_callbacks.RecordParameters", "trust=[test_callbacks]"]
    trainer = train(tmp_path, "trainer.max_steps=6", *recorded)
    expected = {n: p.clone() for n, p in RecordParameters.seen[0].items()}
    for params in RecordParameters.seen[1:]:
        for name in expected:
            expected[name] = 0.9 * expected[name] + 0.1 * params[name]  # θ̄ ← β θ̄ + (1 - β) θ
    shadow = trainer.callbacks.named["ema"].shadow
    for name in expected:
        torch.testing.assert_close(shadow[name], expected[name], rtol=1e-6, atol=1e-7)


def losses(run_dir: Path) -> list[float]:
    return [e["train/loss"] for e in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in e]


def test_the_average_is_named_state_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    straight = train(tmp_path / "straight", "trainer.max_steps=8")
    train(tmp_path / "resumed", "trainer.max_steps=4", "trainer.checkpoint_every=4")
    torch.manual_seed(123)
    resumed = train(tmp_path / "resumed", "trainer.max_steps=8")
    assert (tmp_path / "resumed" / "checkpoints" / "step_00000004" / "state" / "callback.ema").is_dir()
    a, b = straight.callbacks.named["ema"], resumed.callbacks.named["ema"]
    assert a.updates == b.updates == 8
    assert all(torch.equal(a.shadow[n], b.shadow[n]) for n in a.shadow)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


def test_evaluation_uses_the_average_and_training_never_sees_it(tmp_path: Path) -> None:
    common = ["trainer.max_steps=6", "trainer.eval_every=2", "trainer.log_every=1"]
    with_average = train(tmp_path / "with", *common)
    without = train(tmp_path / "without", *common, "callbacks.ema.evaluate=false")
    assert losses(tmp_path / "with") == losses(tmp_path / "without")  # the swap is undone before each step
    val = [[e["val/loss"] for e in read_metrics(tmp_path / name / "metrics.jsonl") if "val/loss" in e]
           for name in ("with", "without")]
    assert len(val[0]) == 4 and val[0] != val[1]  # steps 0 (the untrained model), 2, 4, 6
    for name, p in with_average.raw_model.named_parameters():  # the trained weights are back in the model
        assert torch.equal(p, dict(without.raw_model.named_parameters())[name])


def train_rank(run_dir: str, overrides: list[str]) -> None:
    train(Path(run_dir), *overrides)


@pytest.mark.slow
def test_an_average_saved_by_two_fsdp2_ranks_resumes_on_one_process(tmp_path: Path) -> None:
    """Each FSDP2 rank keeps the shard of θ̄ beside its shard of θ; DCP writes them with their offsets, so
    the run continues on one process with the same average as one process all along (to float rounding)."""
    one = train(tmp_path / "one", "trainer.max_steps=8")
    run_ranks(2, train_rank, str(tmp_path / "two"), ["trainer.max_steps=4", "trainer.checkpoint_every=4",
                                                     "strategy=fsdp2"])
    moved = train(tmp_path / "two", "trainer.max_steps=8")
    for name, tensor in one.callbacks.named["ema"].shadow.items():
        torch.testing.assert_close(moved.callbacks.named["ema"].shadow[name], tensor, atol=1e-5, rtol=1e-5)
