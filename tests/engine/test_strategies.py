"""Every strategy computes what one process computes: the GPT recipe's loss, step by step, on 2 gloo ranks.

The global batch is the same in every run (trainer.batch_size is global), so DDP, FSDP2 and DeepSpeed
ZeRO 1/2/3 must reproduce the single-process losses to float32 rounding (|diff| <= 1e-5).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import SMALL_GPT, gpt_config_path
from multiprocess import run_ranks
from papertrain.config import load_config
from papertrain.metrics import read_metrics
from papertrain.trainer import Trainer

STEPS = ["trainer.max_steps=5", "trainer.eval_batches=2"]


def train_rank(run_dir: str, overrides: list[str]) -> None:
    Trainer(load_config(gpt_config_path(), [*SMALL_GPT, *STEPS, *overrides]), Path(run_dir)).run()


def losses(run_dir: Path) -> list[float]:
    return [e["train/loss"] for e in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in e]


def memory(run_dir: Path) -> dict[str, float]:
    return next(e for e in read_metrics(run_dir / "metrics.jsonl") if "memory/params_bytes" in e)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    os.environ["PAPERTRAIN_OFFLINE"] = "1"
    train_rank(str(run_dir), [])
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    ["strategy=ddp"],
    ["strategy=fsdp2"],
    ["strategy=deepspeed", "strategy.stage=1"],
    ["strategy=deepspeed", "strategy.stage=2"],
    ["strategy=deepspeed", "strategy.stage=3"],
], ids=["ddp", "fsdp2", "zero1", "zero2", "zero3"])
def test_two_ranks_match_one_process(tmp_path: Path, single_process: Path, strategy: list[str]) -> None:
    if "strategy=deepspeed" in strategy:
        pytest.importorskip("deepspeed")
    run_ranks(2, train_rank, str(tmp_path), strategy)
    expected, got = losses(single_process), losses(tmp_path)
    assert len(got) == len(expected) == 5
    assert max(abs(a - b) for a, b in zip(expected, got)) <= 1e-5, (expected, got)


# -- checkpoints across strategies and world sizes ----------------------------------------------------
HALVES = ["scheduler.total_steps=6", "trainer.checkpoint_every=3"]  # one schedule for both halves


def run(run_dir: Path, world: int, steps: int, strategy: list[str]) -> None:
    overrides = [*HALVES, f"trainer.max_steps={steps}", *strategy]
    if world == 1:
        train_rank(str(run_dir), overrides)
    else:
        run_ranks(world, train_rank, str(run_dir), overrides)


@pytest.fixture(scope="module")
def straight_six(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("straight")
    os.environ["PAPERTRAIN_OFFLINE"] = "1"
    run(run_dir, 1, 6, [])
    return losses(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [
    ((2, ["strategy=fsdp2"]), (1, [])),  # sharded on 2 ranks -> one process
    ((1, []), (2, ["strategy=fsdp2"])),  # one process -> sharded on 2 ranks
    ((2, ["strategy=fsdp2"]), (2, ["strategy=ddp"])),
], ids=["fsdp2x2-to-single", "single-to-fsdp2x2", "fsdp2x2-to-ddpx2"])
def test_checkpoint_resumes_on_another_world_size(tmp_path: Path, straight_six: list[float], first, second) -> None:
    run(tmp_path, first[0], 3, first[1])
    assert len(losses(tmp_path)) == 3
    run(tmp_path, second[0], 6, second[1])
    got = losses(tmp_path)
    assert len(got) == 6 and max(abs(a - b) for a, b in zip(straight_six, got)) <= 1e-5, (straight_six, got)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [["strategy=fsdp2"], ["strategy=deepspeed", "strategy.stage=3"]],
                         ids=["fsdp2", "zero3"])
def test_resume_on_the_same_ranks_is_exact(tmp_path: Path, strategy: list[str]) -> None:
    if "strategy=deepspeed" in strategy:
        pytest.importorskip("deepspeed")
    run(tmp_path / "straight", 2, 6, strategy)
    run(tmp_path / "resumed", 2, 3, strategy)
    run(tmp_path / "resumed", 2, 6, strategy)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # bit for bit


def test_a_deepspeed_checkpoint_refuses_another_strategy(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    run(tmp_path, 2, 3, ["strategy=deepspeed", "strategy.stage=2"])
    with pytest.raises(Exception, match="written by strategy 'deepspeed'"):
        run(tmp_path, 1, 6, [])


# -- memory per rank -----------------------------------------------------------------------------------
def model_state_bytes(run_dir: Path) -> float:
    m = memory(run_dir)
    return m["memory/params_bytes"] + m["memory/grads_bytes"] + m["memory/optimizer_bytes"]


@pytest.mark.slow
def test_fsdp2_holds_half_the_model_state_per_rank(tmp_path: Path, single_process: Path) -> None:
    run_ranks(2, train_rank, str(tmp_path), ["strategy=fsdp2"])
    assert model_state_bytes(tmp_path) <= 0.6 * model_state_bytes(single_process)


@pytest.mark.slow
def test_zero3_holds_about_half_the_model_state_per_rank(tmp_path: Path) -> None:
    """In bf16, ZeRO-3's only extra over an even split is the fp32 master copy of each rank's shard."""
    pytest.importorskip("deepspeed")
    train_rank(str(tmp_path / "single"), ["trainer.precision=bf16"])
    run_ranks(2, train_rank, str(tmp_path / "zero3"), ["strategy=deepspeed", "strategy.stage=3",
                                                      "trainer.precision=bf16"])
    assert model_state_bytes(tmp_path / "zero3") <= 0.6 * model_state_bytes(tmp_path / "single")
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "single"), losses(tmp_path / "zero3"))) < 2e-3
