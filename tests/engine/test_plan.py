"""`papertrain plan`: exact parameter counts from the meta device, and a model-state formula that
agrees with the bytes the strategies really hold (measured on 2 CPU ranks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import SMALL_GPT, gpt_config_path
from multiprocess import run_ranks
from papertrain.config import instantiate, load_config
from papertrain.errors import PapertrainError
from papertrain.metrics import read_metrics
from papertrain.plan import model_facts, parse_bytes, training_estimates
from papertrain.trainer import Trainer

FP32 = [*SMALL_GPT, "trainer.max_steps=1", "trainer.precision=fp32"]


@pytest.mark.parametrize("text, value", [("48GB", 48 * 2**30), ("80 GiB", 80 * 2**30), ("512MB", 512 * 2**20),
                                         ("1.5T", int(1.5 * 2**40))])
def test_memory_sizes_parse(text: str, value: int) -> None:
    assert parse_bytes(text) == value


def test_a_bad_size_is_a_clear_error() -> None:
    with pytest.raises(PapertrainError, match="like 48GB"):
        parse_bytes("lots")


def test_parameter_count_is_exact_without_memory() -> None:
    config = load_config(gpt_config_path(), ["model.n_layers=44", "model.d_model=6144", "model.n_heads=64",
                                             "model.vocab_size=50432", "data.block_size=2048"])
    facts = model_facts(config)  # a 20B model: built on the meta device, it costs nothing
    assert facts.parameters == 20_257_296_384 and facts.layers == 44
    small = load_config(gpt_config_path())
    assert model_facts(small).parameters == sum(p.numel() for p in instantiate(small.run.model).parameters())


def train(run_dir: str, overrides: list[str]) -> None:
    Trainer(load_config(gpt_config_path(), [*FP32, *overrides]), Path(run_dir)).run()


def measured(run_dir: Path) -> float:
    m = next(e for e in read_metrics(run_dir / "metrics.jsonl") if "memory/params_bytes" in e)
    return m["memory/params_bytes"] + m["memory/grads_bytes"] + m["memory/optimizer_bytes"]


@pytest.mark.slow
def test_model_state_formula_matches_measured_bytes(tmp_path: Path) -> None:
    os.environ["PAPERTRAIN_OFFLINE"] = "1"
    runs = {"single / ddp": [], "fsdp2": ["strategy=fsdp2"], "zero3_reference": ["strategy=zero3_reference"]}
    try:
        import deepspeed  # noqa: F401
        runs["deepspeed zero-3"] = ["strategy=deepspeed", "strategy.stage=3"]
    except ImportError:
        pass
    config = load_config(gpt_config_path(), FP32)
    estimates = {e.name: e for e in training_estimates(config, model_facts(config), gpus=2)}
    for name, overrides in runs.items():
        run_dir = tmp_path / name.replace(" ", "").replace("/", "")
        if overrides:
            run_ranks(2, train, str(run_dir), overrides)
        else:
            train(str(run_dir), overrides)
        estimate = estimates[name]
        predicted = estimate.weights + estimate.grads + estimate.optimizer
        assert abs(predicted - measured(run_dir)) <= 0.01 * measured(run_dir), (name, predicted, measured(run_dir))
