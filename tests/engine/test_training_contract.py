"""The training contract on a toy two-part model: a task that owns its step, two named optimizers with a
schedule each, their states in the checkpoint, exact resume, and 2 ranks (DDP, FSDP2) computing what one
process computes. The recipes gan, ppo and cfr prove the same contract on real papers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from multiprocess import run_ranks
from papertrain.config import load_config
from papertrain.errors import PapertrainError
from papertrain.metrics import read_metrics
from papertrain.trainer import Trainer


class Points:
    """y = 3x - 1 + noise, 256 points for training and 64 for validation."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(320, 4, generator=g)
        y = x @ torch.tensor([3.0, -1.0, 0.5, 2.0]) - 1 + 0.1 * torch.randn(320, generator=g)

        class Split:
            def __init__(self, x: torch.Tensor, y: torch.Tensor):
                self.x, self.y = x, y

            def __len__(self) -> int:
                return len(self.x)

            def batch(self, indices: torch.Tensor) -> dict:
                return {"x": self.x[indices], "y": self.y[indices]}

        self.train, self.val = Split(x[:256], y[:256]), Split(x[256:], y[256:])


class TwoParts(nn.Module):
    """An encoder and a head, each trained by an optimizer of its own."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, 1)

    def parallel_units(self) -> list[str]:
        return ["encoder", "head"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).squeeze(-1)


class AlternatingTask:
    """Each step: the head's optimizer on the loss, then the encoder's on a fresh forward."""

    unit = "samples"
    wants: str | None = None  # a test sets it to ask for an optimizer the config lacks

    def count(self, batch: dict) -> int:
        return len(batch["y"])

    def train_step(self, ctx, batch: dict) -> dict:
        if self.wants:
            ctx.optimizer_named(self.wants)
        noise = ctx.local(torch.randn(ctx.trainer.batch_size, generator=ctx.random("noise")))  # same on any ranks
        losses = {}
        for part in ("head", "encoder"):
            with ctx.autocast():
                prediction = ctx.model.head(ctx.model.encoder(batch["x"])).squeeze(-1)
                loss = (prediction - batch["y"] - 0.01 * noise).pow(2).mean()
            ctx.backward(loss)
            ctx.optimizer_step(part)
            losses[part] = loss.detach()
        return {"loss": losses["encoder"], "head_loss": losses["head"]}

    def evaluate(self, model: nn.Module, batch: dict) -> dict:
        return {"loss": float((model(batch["x"]) - batch["y"]).pow(2).mean())}


CONFIG = {
    "name": "contract", "seed": 3, "trust": ["test_training_contract"],
    "data": {"_component_": "test_training_contract.Points"},
    "model": {"_component_": "test_training_contract.TwoParts", "hidden": 8},
    "task": {"_component_": "test_training_contract.AlternatingTask"},
    "optimizers": {"encoder": {"_component_": "torch.optim.Adam", "lr": 0.01, "parameters": "encoder"},
                   "head": {"_component_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9, "parameters": "head"}},
    "schedulers": {"head": {"_component_": "torch.optim.lr_scheduler.StepLR", "step_size": 3, "gamma": 0.5}},
    "trainer": {"max_steps": 8, "batch_size": 16, "log_every": 1, "progress": "none", "plot": False,
                "tensorboard": False, "eval_batches": 2, "sample_every": -1, "checkpoint_every": 0},
}


def config_file(tmp_path: Path, **trainer) -> Path:
    tree = {**CONFIG, "trainer": {**CONFIG["trainer"], **trainer}}
    path = tmp_path / "contract.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def losses(run_dir: Path, key: str = "train/loss") -> list[float]:
    return [e[key] for e in read_metrics(run_dir / "metrics.jsonl") if key in e]


def test_each_named_optimizer_steps_its_part_with_its_own_schedule(tmp_path: Path) -> None:
    trainer = Trainer(load_config(config_file(tmp_path)), tmp_path / "run")
    trainer.run()
    encoder, head = trainer.optimizers["encoder"], trainer.optimizers["head"]
    assert {id(p) for g in encoder.param_groups for p in g["params"]} == {id(p) for p in trainer.raw_model.encoder.parameters()}
    assert {id(p) for g in head.param_groups for p in g["params"]} == {id(p) for p in trainer.raw_model.head.parameters()}
    assert head.param_groups[0]["lr"] == 0.05 * 0.5 ** (8 // 3) and encoder.param_groups[0]["lr"] == 0.01
    final = tmp_path / "run" / "checkpoints" / "step_00000008"
    assert (final / "optimizer.encoder").is_dir() and (final / "optimizer.head").is_dir()
    assert len(losses(tmp_path / "run")) == 8 and len(losses(tmp_path / "run", "train/head_loss")) == 8


def test_a_resumed_run_with_named_optimizers_is_bit_identical(tmp_path: Path) -> None:
    Trainer(load_config(config_file(tmp_path)), tmp_path / "straight").run()
    Trainer(load_config(config_file(tmp_path, max_steps=4, checkpoint_every=4)), tmp_path / "resumed").run()
    torch.manual_seed(7)
    Trainer(load_config(config_file(tmp_path)), tmp_path / "resumed").run()
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    assert losses(tmp_path / "straight", "train/head_loss") == losses(tmp_path / "resumed", "train/head_loss")


def test_a_step_that_asks_for_a_missing_optimizer_names_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AlternatingTask, "wants", "critic")
    with pytest.raises(PapertrainError, match="asks for optimizer 'critic', but the config has encoder, head"):
        Trainer(load_config(config_file(tmp_path)), tmp_path / "run").run()


def test_schedulers_and_parameters_are_checked_against_the_optimizers(tmp_path: Path) -> None:
    from papertrain.errors import ConfigError

    path = config_file(tmp_path)
    with pytest.raises(ConfigError, match="schedulers.critic: there is no optimizer 'critic'"):
        load_config(path, ["schedulers.critic={_component_: torch.optim.lr_scheduler.StepLR, step_size: 2}"])
    with pytest.raises(PapertrainError, match="optimizers.head.parameters: the model has no part 'tail'"):
        Trainer(load_config(path, ["optimizers.head.parameters=tail"]), tmp_path / "run").run()
    with pytest.raises(ConfigError, match="named optimizers .* cannot run under strategy=deepspeed"):
        load_config(path, ["strategy=deepspeed", "strategy.world_size=2"])


def train_rank(path: str, run_dir: str, overrides: list[str]) -> None:
    Trainer(load_config(path, overrides), Path(run_dir)).run()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_with_named_optimizers_compute_what_one_process_computes(tmp_path: Path, strategy: str) -> None:
    path = str(config_file(tmp_path))
    train_rank(path, str(tmp_path / "one"), [])
    run_ranks(2, train_rank, path, str(tmp_path / "two"), [f"strategy={strategy}"])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(two) == 8 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)
