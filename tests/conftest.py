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


def learns(config, run_dir: Path) -> tuple[float, float]:
    """(validation loss before training on 64 windows, validation loss after `config`'s run): what a
    recipe's learning test compares, the first against chance and the second against a threshold."""
    from papertrain.config import instantiate
    from papertrain.recipes.transformers.gpt.task import LanguageModelTask
    from papertrain.trainer import Trainer

    data = instantiate(config.run.data)
    with torch.no_grad():
        untrained = LanguageModelTask().evaluate(instantiate(config.run.model).eval(), data.val.batch(torch.arange(64)))
    result = Trainer(config, run_dir).run()
    print(f"{result.step} steps: val/loss {result.metrics['val/loss']:.3f} (untrained {untrained['loss']:.3f})")
    return untrained["loss"], result.metrics["val/loss"]


def run_shipped(recipe: str, run_dir: Path) -> dict:
    """`papertrain run RECIPE` exactly as shipped, in a subprocess; its summary.json."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "papertrain", "run", recipe, "trainer.progress=plain",
                             "--run-dir", str(run_dir)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"tiny {recipe}: val/loss {summary['val/loss']:.4f} in {summary['wall_s']:.0f} s")
    return summary
