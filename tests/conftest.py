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

try:
    # submitit configures logging with `dictConfig` when first imported, and dictConfig closes every
    # handler that exists at that moment. open_spiel's absl creates one at import (test_cfr's collection)
    # whose stream is pytest's capture of stderr: submitit imported later, inside a test, would close that
    # capture and crash the whole session ("I/O operation on closed file"). Imported here, first, it
    # finds no handler to close.
    import submitit  # noqa: F401
except ImportError:  # the cluster extra is not installed: the cluster tests skip
    pass

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
    # OMP_NUM_THREADS=1 when other jobs share the cores: busy-waiting threads then slow torch 10-30x
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


class TrustedSGD(torch.optim.SGD):
    """An optimizer outside papertrain and torch: a config may name it only with `trust: [conftest]`."""


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


# A classifier run that takes seconds: 300 steps of 32 images from the first 5,000 of MNIST, 1,000 for validation.
QUICK_CLASSIFIER = [
    "data.train_examples=5000", "data.val_examples=1000", "trainer.max_steps=300", "trainer.batch_size=32",
    "optimizer.lr=0.1",
    "trainer.eval_batches=32", "trainer.log_every=10", "trainer.progress=none", "trainer.tensorboard=false",
    "trainer.plot=false", "trainer.checkpoint_every=0", "trainer.eval_every=0", "trainer.sample_every=-1",
]


def classifier_accuracy(config_path: Path, run_dir: Path, overrides: list[str] = ()) -> float:
    """Validation accuracy of `config_path`'s classifier after a QUICK_CLASSIFIER run with `overrides`."""
    from papertrain.config import load_config
    from papertrain.trainer import Trainer

    result = Trainer(load_config(config_path, [*QUICK_CLASSIFIER, *overrides]), run_dir).run()
    print(f"{config_path.parent.name} {' '.join(overrides)}: val/accuracy {result.metrics['val/accuracy']:.4f}")
    return result.metrics["val/accuracy"]


def same_forward_and_backward(ours: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor,
                              atol: float = 1e-5) -> None:
    """Both modules on the same input: equal outputs, and equal input gradients for one random upstream
    gradient (the parameters' gradients accumulate in each module for the caller to compare)."""
    x, x_ref = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    y, y_ref = ours(x), reference(x_ref)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-5)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=atol, rtol=1e-4)


def set_affine(gain: torch.Tensor, bias: torch.Tensor, *modules: torch.nn.Module) -> None:
    """Give normalization layers the same (non-trivial) scale and shift, so the affine part is tested too."""
    with torch.no_grad():
        for module in modules:
            module.weight.copy_(gain)
            module.bias.copy_(bias)


def optimizer_trajectory(make_optimizer, steps: int = 100, seed: int = 0,
                         rebuild_at: int | None = None) -> list[torch.Tensor]:
    """The parameters (8x5 weights, then 8 biases, flattened) after each step of minimising a small,
    non-convex, noisy objective: a tanh regression on fresh random data plus a quartic penalty.

    With `rebuild_at`, the optimizer is rebuilt from its `state_dict` just before that step, as a resumed
    run would be."""
    torch.manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(8, 5))
    bias = torch.nn.Parameter(torch.randn(8))
    optimizer = make_optimizer([weight, bias])
    data = torch.Generator().manual_seed(seed + 1)
    path = []
    for step in range(steps):
        if step == rebuild_at:
            saved = optimizer.state_dict()
            optimizer = make_optimizer([weight, bias])
            optimizer.load_state_dict(saved)
        x = torch.randn(16, 5, generator=data)
        target = torch.randn(16, 8, generator=data)
        loss = (torch.tanh(x @ weight.T + bias) - target).pow(2).mean() + 0.01 * weight.pow(4).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        path.append(torch.cat([weight.detach().flatten(), bias.detach()]).clone())
    return path


# -- how long each part of the suite takes (printed at the end of every run, for the README's table) --------
_SECONDS_BY_FILE: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = report.nodeid.split("::")[0]
    _SECONDS_BY_FILE[path] = _SECONDS_BY_FILE.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _SECONDS_BY_FILE:
        return
    total = sum(_SECONDS_BY_FILE.values())
    terminalreporter.section("seconds by test file (setup + call + teardown)")
    for path, seconds in sorted(_SECONDS_BY_FILE.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:8.1f} s  {100 * seconds / total:5.1f}%  {path}")
    terminalreporter.write_line(f"{total:8.1f} s  in all")
