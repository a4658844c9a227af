"""The ZeRO-3 reference computes what FSDP2, DeepSpeed ZeRO-3 and one process compute, holds half the
model states per rank on two ranks, frees every gathered block after use, and checkpoints exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import RECIPES, SMALL_GPT, gpt_config_path
from multiprocess import run_ranks
from papertrain.config import load_config
from papertrain.metrics import read_metrics
from papertrain.trainer import Trainer

FIVE = [*SMALL_GPT, "trainer.max_steps=5"]


def train(run_dir: str, overrides: list[str]) -> None:
    Trainer(load_config(gpt_config_path(), [*FIVE, *overrides]), Path(run_dir)).run()


def losses(run_dir: Path) -> list[float]:
    return [e["train/loss"] for e in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in e]


def state_bytes(run_dir: Path) -> float:
    m = next(e for e in read_metrics(run_dir / "metrics.jsonl") if "memory/params_bytes" in e)
    return m["memory/params_bytes"] + m["memory/grads_bytes"] + m["memory/optimizer_bytes"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zero3")
    os.environ["PAPERTRAIN_OFFLINE"] = "1"
    train(str(root / "single"), [])
    run_ranks(2, train, str(root / "zero3"), ["strategy=zero3_reference"])
    run_ranks(2, train, str(root / "fsdp2"), ["strategy=fsdp2"])
    return root


@pytest.mark.slow
def test_matches_one_process_and_fsdp2(runs: Path) -> None:
    reference = losses(runs / "zero3")
    for other in ("single", "fsdp2"):
        assert max(abs(a - b) for a, b in zip(reference, losses(runs / other))) <= 1e-5, other


@pytest.mark.slow
def test_matches_deepspeed_zero3(runs: Path, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    run_ranks(2, train, str(tmp_path), ["strategy=deepspeed", "strategy.stage=3"])
    assert max(abs(a - b) for a, b in zip(losses(runs / "zero3"), losses(tmp_path))) <= 1e-5


@pytest.mark.slow
def test_each_rank_holds_half_the_model_states(runs: Path) -> None:
    assert state_bytes(runs / "zero3") <= 0.55 * state_bytes(runs / "single")


def check_blocks_are_freed(out: str) -> None:
    """One training step on 2 ranks; afterwards no block may keep its gathered parameters."""
    config = load_config(gpt_config_path(), [*FIVE, "strategy=zero3_reference", "trainer.max_steps=1"])
    trainer = Trainer(config, Path(out))
    trainer.setup()
    gathers = []
    for unit in trainer.strategy.zero.units:
        original = unit.gather

        def counted(asynchronous: bool = False, unit=unit, original=original) -> None:
            gathers.append(unit.name)
            original(asynchronous)
        unit.gather = counted
    trainer.train_step()
    held = [g.full.untyped_storage().nbytes() for unit in trainer.strategy.zero.units for g in unit.groups]
    if trainer.strategy.rank == 0:
        Path(out, "check.json").write_text(json.dumps({"held": held, "gathers": gathers,
                                                       "units": [u.name for u in trainer.strategy.zero.units]}))


@pytest.mark.slow
def test_blocks_are_gathered_for_forward_and_backward_then_freed(tmp_path: Path) -> None:
    run_ranks(2, check_blocks_are_freed, str(tmp_path))
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["held"] and all(size == 0 for size in result["held"])  # nothing whole after the step
    for unit in result["units"]:  # each unit gathered once for forward and once for backward
        assert result["gathers"].count(unit) == 2, (unit, result["gathers"])
    assert result["units"] == ["root", "layers.0", "layers.1"]


@pytest.mark.slow
def test_resume_is_exact_and_export_gives_the_single_process_weights(tmp_path: Path, runs: Path) -> None:
    from safetensors.torch import load_file

    from papertrain.export import export

    halves = ["strategy=zero3_reference", "scheduler.total_steps=6", "trainer.checkpoint_every=3"]
    run_ranks(2, train, str(tmp_path / "straight"), [*halves, "trainer.max_steps=6"])
    run_ranks(2, train, str(tmp_path / "resumed"), [*halves, "trainer.max_steps=3"])
    run_ranks(2, train, str(tmp_path / "resumed"), [*halves, "trainer.max_steps=6"])
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")

    ours = load_file(export(runs / "zero3", out=tmp_path / "z", layout="papertrain")[0] / "model.safetensors")
    single = load_file(export(runs / "single", out=tmp_path / "s", layout="papertrain")[0] / "model.safetensors")
    assert ours.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(ours[key], single[key], atol=1e-5, rtol=0)


def test_the_tiny_config_runs_on_one_process(tmp_path: Path) -> None:
    config = load_config(RECIPES / "scaling/zero3/tiny.yaml",
                         ["trainer.max_steps=3", "trainer.progress=none", "trainer.eval_batches=1",
                          "trainer.plot=false", "task.sample_tokens=8", "model.n_layers=2"])
    result = Trainer(config, tmp_path).run()
    assert result.status == "completed" and result.metrics["val/loss"] < 4.3
