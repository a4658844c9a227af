"""Every shipped recipe, under the engine's promises that no recipe-specific test would think to check.

- Its model initialises to the same distribution whether it is built eagerly or on the meta device and
  initialised module by module (what `strategy.meta_init` does under FSDP2 and ZeRO-3): every submodule's
  own `reset_parameters` and `init_weights` must run. A model that freezes part of itself (LoRA) cannot be
  rebuilt that way and is refused, naming the fix.
- It trains a few steps under bf16 and fp16 autocast (GPUs pick bf16 by default), with a finite loss.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from papertrain.config import load_config
from papertrain.errors import PapertrainError
from papertrain.metrics import read_metrics
from papertrain.strategies.base import initialise, refuse_frozen_base_on_meta
from papertrain.trainer import Trainer

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY = sorted(RECIPES.glob("*/*/tiny.yaml"))
# 2 steps of 2 examples: CPU autocast is slow (bf16 matmuls without hardware support), and a step is enough
BRIEF = ["trainer.max_steps=2", "trainer.eval_batches=1", "trainer.batch_size=2", "trainer.log_every=1",
         "trainer.progress=none", "trainer.plot=false", "trainer.tensorboard=false", "trainer.checkpoint_every=0",
         "trainer.eval_every=0", "trainer.sample_every=-1"]
# work a recipe does before its first step, cut short so that these tests stay about the training itself
BRIEF_SETUP = {"distillation": ["task.teacher_steps=3", "task.teacher_hidden=[32]"],  # its teacher artifact
               "ppo": ["task.eval_episodes=2", "task.epochs=2"],
               "gan": ["task.classifier_steps=3", "task.classifier_hidden=[16]"]}  # its classifier artifact


def recipe_id(path: Path) -> str:
    return path.parent.name


def agree(name: str, eager: torch.Tensor, meta: torch.Tensor) -> None:
    """The same shape and dtype; a constant tensor the same constant; a random one the same distribution."""
    assert eager.shape == meta.shape and eager.dtype == meta.dtype, name
    if not eager.is_floating_point():
        assert torch.equal(eager, meta), name
        return
    assert torch.isfinite(meta).all(), f"{name}: not finite after meta-init"
    e, m = eager.double().flatten(), meta.double().flatten()
    if e.numel() < 2:
        return  # one random number says nothing about its distribution
    if torch.all(e == e[0]):
        assert torch.all(m == e[0]), f"{name}: {e[0].item()} eagerly, not constant after meta-init"
        return
    n = e.numel()
    std = e.std().item()
    slack = 4 / math.sqrt(n)
    assert abs(m.mean().item() - e.mean().item()) <= (0.1 + slack) * std, f"{name}: means {e.mean():.4g} vs {m.mean():.4g}"
    assert abs(m.std().item() / std - 1) <= 0.15 + slack, f"{name}: stds {std:.4g} vs {m.std():.4g}"


@pytest.mark.parametrize("config", TINY, ids=recipe_id)
def test_meta_init_gives_the_models_own_initialisation(config: Path) -> None:
    loaded = load_config(config)
    torch.manual_seed(0)
    eager = loaded.build("model")
    with torch.device("meta"):
        meta = loaded.build("model")
    if any(not p.requires_grad for p in eager.parameters()):
        with pytest.raises(PapertrainError, match="drop strategy.meta_init"):
            refuse_frozen_base_on_meta(meta)
        return
    meta.to_empty(device="cpu")
    torch.manual_seed(1)
    initialise(meta)
    eager_state, meta_state = eager.state_dict(), meta.state_dict()
    assert eager_state.keys() == meta_state.keys()
    for key in eager_state:
        agree(key, eager_state[key], meta_state[key])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("config", TINY, ids=recipe_id)
def test_a_few_steps_under_autocast_give_a_finite_loss(tmp_path: Path, config: Path, precision: str) -> None:
    """Every logged training number is finite (the loss, or for a solver, which has none, its own metrics). The
    gradient norm may not be: fp16's loss scaler starts high, and skips the steps whose gradients overflow."""
    overrides = [*BRIEF, *BRIEF_SETUP.get(recipe_id(config), []), f"trainer.precision={precision}"]
    Trainer(load_config(config, overrides), tmp_path).run()
    lines = [{k: v for k, v in e.items() if k.startswith("train/") and k not in ("train/lr", "train/grad_norm")}
             for e in read_metrics(tmp_path / "metrics.jsonl") if any(k.startswith("train/") for k in e)]
    assert len(lines) == 2 and all(lines), lines
    assert all(isinstance(v, float) and math.isfinite(v) for line in lines for v in line.values()), lines
