"""Shared test setup: offline, quiet, small.

Tests never touch the network: PAPERTRAIN_OFFLINE=1 makes data resolve from the cache or the installed
packages, exactly as on an offline machine. Each test gets its own data cache so runs cannot leak
state into each other.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"

# A GPT small enough to train in seconds, for engine tests (the recipe's own tests use its real configs).
SMALL_GPT = [
    "model.n_layers=2", "model.d_model=32", "model.n_heads=2", "data.block_size=32", "trainer.batch_size=8",
    "trainer.eval_batches=2", "trainer.log_every=1", "trainer.progress=none", "task.sample_tokens=16",
    "trainer.tensorboard=false", "trainer.plot=false", "trainer.checkpoint_every=0", "trainer.eval_every=0",
    "trainer.sample_every=0",
]


@pytest.fixture(autouse=True)
def _offline_and_isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAPERTRAIN_OFFLINE", "1")
    monkeypatch.setenv("PAPERTRAIN_DATA", str(tmp_path_factory.mktemp("data-cache")))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def gpt_config_path() -> Path:
    return RECIPES / "transformers" / "gpt" / "tiny.yaml"
