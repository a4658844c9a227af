"""`papertrain compare`: variants from a recipe's meta.yaml, trained side by side, one table and one plot;
an interrupted or repeated comparison does not train a finished variant again; clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import RECIPES, SMALL_GPT
from papertrain.catalog import Recipe, discover
from papertrain.cli import main
from papertrain.compare import load_comparison, run_comparison, write_outputs
from papertrain.errors import PapertrainError

META = """title: two optimizers
paper: a test
url: https://example.org
compare:
  metric: val/loss
  overrides: [trainer.max_steps=3]
  variants:
    AdamW: {}
    SGD + momentum: {overrides: ["optimizer={_component_: torch.optim.SGD, lr: 0.1, momentum: 0.9}"]}
    Adam (other recipe): {config: adam, overrides: [optimizer.lr=1e-2]}
"""


def make_recipe(folder: Path, meta: str = META) -> Recipe:
    folder.mkdir(parents=True)
    shutil.copyfile(RECIPES / "transformers" / "gpt" / "tiny.yaml", folder / "tiny.yaml")
    (folder / "meta.yaml").write_text(meta)
    return Recipe(name="gpt", family="test", folder=folder, title="two optimizers", paper="a test", configs=["tiny"])


def test_variants_train_side_by_side_into_one_table_and_plot(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path / "recipe")
    comparison = load_comparison(recipe, [*SMALL_GPT, "trainer.eval_every=3"])
    assert [v.folder for v in comparison.variants] == ["adamw", "sgd-momentum", "adam-other-recipe"]
    assert comparison.variants[2].config == RECIPES / "optim" / "adam" / "tiny.yaml"
    assert run_comparison(comparison, tmp_path / "runs") == "completed"
    outputs = write_outputs(comparison, tmp_path / "runs", recipe.title)
    assert all(p.is_file() and p.stat().st_size > 0 for p in outputs)
    table = (tmp_path / "runs" / "comparison.md").read_text()
    assert "| SGD + momentum |" in table and table.count("**") == 2  # the best value is marked once
    results = json.loads((tmp_path / "runs" / "comparison.json").read_text())["variants"]
    assert [r["steps"] for r in results] == [3, 3, 3]
    assert len({round(r["val/loss"], 6) for r in results}) == 3  # three different optimizers, three results
    # a second comparison finds every variant finished and trains nothing again
    again = load_comparison(recipe, [*SMALL_GPT, "trainer.eval_every=3"])
    before = (tmp_path / "runs" / "adamw" / "metrics.jsonl").read_text()
    assert run_comparison(again, tmp_path / "runs") == "completed"
    assert (tmp_path / "runs" / "adamw" / "metrics.jsonl").read_text() == before
    assert [r["val/loss"] for r in again.results] == [r["val/loss"] for r in results]


def test_only_runs_the_named_variants_and_rejects_unknown_ones(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path / "recipe")
    assert [v.name for v in load_comparison(recipe, [], only=["sgd-momentum"]).variants] == ["SGD + momentum"]
    with pytest.raises(PapertrainError, match="unknown variants"):
        load_comparison(recipe, [], only=["Adagrad"])


def test_every_variant_is_validated_before_anything_trains(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path / "recipe", META.replace("momentum: 0.9", "momentum: 0.9, nesterov_typo: true"))
    with pytest.raises(PapertrainError, match="nesterov_typo"):
        load_comparison(recipe, [])
    broken = make_recipe(tmp_path / "broken", META.replace("AdamW: {}", "AdamW: {overrides: [], runs: 3}"))
    with pytest.raises(PapertrainError, match="unknown keys"):
        load_comparison(broken, [])


def test_command_line_errors_are_messages(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "gpt"]) == 2
    assert "has nothing to compare" in capsys.readouterr().err
    assert main(["compare", "norms", "--record", "trainer.max_steps=2"]) == 2
    assert "--record stores the shipped comparison" in capsys.readouterr().err


def test_shipped_comparisons_are_valid() -> None:
    for recipe in discover().values():
        if "compare:" in (recipe.folder / "meta.yaml").read_text():
            assert load_comparison(recipe, []).variants
