"""The comparison recipe: every optimizer of the overview builds and takes a step on the tiny GPT, and the
`compare:` section's variants are exactly the overview's optimizers, each a valid config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import SMALL_GPT
from papertrain.catalog import discover
from papertrain.compare import load_comparison
from papertrain.config import instantiate, load_config
from papertrain.recipes.optim.optimizers.model import OPTIMIZERS, SCHEDULES, build
from papertrain.trainer import weight_decay_groups

FOLDER = Path(__file__).resolve().parents[2] / "recipes" / "optim" / "optimizers"


@pytest.fixture(scope="module")
def tiny() -> tuple:
    config = load_config(FOLDER / "tiny.yaml", SMALL_GPT)
    data = instantiate(config.run.data)
    return config, data.train.batch(torch.arange(4)), instantiate(config.run.task)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_builds_and_steps_on_the_tiny_gpt(tiny: tuple, name: str) -> None:
    config, batch, task = tiny
    torch.manual_seed(0)
    model = instantiate(config.run.model)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build(name, weight_decay_groups(model))
    if name in SCHEDULES:
        SCHEDULES[name](optimizer, d_model=model.d_model, warmup_steps=10)
    if hasattr(optimizer, "update_curvature"):  # Sophia-G: one curvature estimate, as the trainer makes it
        generators = [torch.Generator().manual_seed(row) for row in range(len(batch["input_ids"]))]
        task.sampled_loss(model, batch, generators).backward()
        optimizer.update_curvature(task.count(batch))
        optimizer.zero_grad()
    loss, _ = task.loss(model, batch)
    loss.backward()
    optimizer.step()
    moved = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert all(moved) and all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        assert task.loss(model, batch)[0] < loss  # a small step downhill


def test_the_comparison_runs_exactly_the_overviews_optimizers_and_each_variant_validates() -> None:
    comparison = load_comparison(discover()["optimizers"], [])  # (loads every variant's config)
    assert [v.name for v in comparison.variants] == list(OPTIMIZERS)
    assert comparison.metric == "val/loss"
    for variant in comparison.variants:
        config = load_config(variant.config, variant.overrides)
        assert config.run.trainer.max_steps == 600
        assert config.tree["model"] == load_config(FOLDER / "tiny.yaml").tree["model"], variant.name  # same model
        assert config.tree["data"] == load_config(FOLDER / "tiny.yaml").tree["data"], variant.name  # same data


def test_the_recipe_is_the_adam_recipes_tiny_gpt() -> None:
    ours = yaml.safe_load((FOLDER / "tiny.yaml").read_text())
    adam = yaml.safe_load((FOLDER.parent / "adam" / "tiny.yaml").read_text())
    assert {**ours, "name": "adam"} == adam
