"""Config loading: YAML with line numbers, overrides, ${} references, validation, _component_."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from papertrain.config import instantiate, load_config, locate
from papertrain.config.components import ComponentNotFound
from papertrain.config.yamlfile import load_yaml, parse_scalar
from papertrain.errors import ConfigError, PapertrainError

MINIMAL = """\
name: demo
seed: 3
model:
  _component_: torch.nn.Linear
  in_features: 4
  out_features: ${model.in_features}
data:
  _component_: papertrain.data.tensors.TensorExamples
task:
  _component_: papertrain.recipes.transformers.mha.task.LookupTask
optimizer:
  _component_: torch.optim.SGD
  lr: 1e-3
scheduler:
  _component_: papertrain.schedules.WarmupCosine
  warmup_steps: 2
  total_steps: ${trainer.max_steps}
trainer:
  max_steps: 10
  batch_size: 4
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "demo.yaml"
    path.write_text(MINIMAL)
    return path


def issues_of(path: Path, overrides: list[str] = ()) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    return [str(issue) for issue in caught.value.issues]


def test_minimal_config_loads_typed(config_file: Path) -> None:
    cfg = load_config(config_file)
    assert cfg.run.trainer.max_steps == 10 and cfg.run.trainer.grad_accum_steps == 1
    assert cfg.run.optimizer["lr"] == 0.001  # an unquoted 1e-3 is a float, not YAML 1.1's string
    assert cfg.tree["model"]["out_features"] == 4  # a whole-value reference keeps its type
    assert cfg.tree["scheduler"]["total_steps"] == 10


def test_overrides_set_create_and_delete(config_file: Path) -> None:
    cfg = load_config(config_file, ["trainer.max_steps=50", "model.bias=false", "~scheduler",
                                    "optimizer.momentum=0.9", "run_dir=null"])
    assert cfg.run.trainer.max_steps == 50
    assert cfg.tree["model"]["bias"] is False
    assert cfg.run.scheduler is None and "scheduler" not in cfg.tree
    assert cfg.tree["optimizer"]["momentum"] == 0.9
    assert cfg.origins["trainer.max_steps"].startswith("command line")


def test_reference_follows_an_override(config_file: Path) -> None:
    cfg = load_config(config_file, ["trainer.max_steps=77"])
    assert cfg.tree["scheduler"]["total_steps"] == 77


def test_string_interpolation_and_environment(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_ROOT", "/scratch")
    cfg = load_config(config_file, ["run_dir=${env:DEMO_ROOT}/${name}-${seed}"])
    assert cfg.run.run_dir == "/scratch/demo-3"
    cfg = load_config(config_file, ["run_dir=${env:DEMO_UNSET_VARIABLE,/tmp/fallback}"])
    assert cfg.run.run_dir == "/tmp/fallback"


def test_unknown_reference_and_cycles_are_reported(config_file: Path) -> None:
    problems = issues_of(config_file, ["run_dir=${trainer.max_stpes}", "name=${seed_alias}", "seed_alias=${name}"])
    joined = "\n".join(problems)
    assert "did you mean 'trainer.max_steps'" in joined
    assert "circular reference" in joined


def test_every_problem_is_reported_at_once_with_file_and_line(config_file: Path) -> None:
    text = MINIMAL.replace("  in_features: 4", "  in_featurs: 4").replace("max_steps: 10", "max_steps: ten")
    text = text.replace("torch.optim.SGD", "torch.optim.SGDD")
    config_file.write_text(text + "  eval_evry: 5\n")
    problems = issues_of(config_file, ["trainer.precision=bf61", "model.out_features=???"])
    joined = "\n".join(problems)
    assert f"{config_file}:5: model.in_featurs: unknown key" in joined and "did you mean 'in_features'" in joined
    assert "model.in_features: required value missing" in joined
    assert f"{config_file}:19: trainer.max_steps: expected an integer, got 'ten'" in joined
    assert f"{config_file}:12: optimizer._component_: cannot import 'torch.optim.SGDD'" in joined
    assert "did you mean 'SGD'" in joined
    assert "trainer.eval_evry: unknown key; did you mean 'eval_every'" in joined
    assert "command line (trainer.precision=bf61): trainer.precision: must be one of" in joined
    assert "model.out_features: required value not set" in joined
    assert "scheduler.total_steps: expected an integer" in joined  # via ${trainer.max_steps}
    assert len(problems) == 8


def test_engine_supplied_arguments_and_missing_sections(config_file: Path) -> None:
    problems = issues_of(config_file, ["optimizer.params=[1]", "~task"])
    assert any("optimizer.params: is supplied by the engine" in p for p in problems)
    assert any("task: required key missing" in p for p in problems)


def test_component_type_checks_use_the_signature(config_file: Path) -> None:
    problems = issues_of(config_file, ["model.in_features=4.5", "model.bias=maybe"])
    assert any("model.in_features: expected an integer, got 4.5" in p for p in problems)
    assert any("model.bias: expected true/false, got 'maybe'" in p for p in problems)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  a: [1, 2\ntrainer: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    assert f"{bad}:" in str(caught.value) and "not valid YAML" in str(caught.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PapertrainError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_override(config_file: Path) -> None:
    problems = issues_of(config_file, ["trainer.max_steps.deeper=3", "~no.such.key"])
    assert any("cannot set a key inside trainer.max_steps" in p for p in problems)
    assert any("cannot delete" in p for p in problems)


def test_line_numbers_and_quoted_strings(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("a:\n  b: 1e-4\n  c: '1e-4'\n  d: [3e2, x]\n")
    tree, origins = load_yaml(path)
    assert tree == {"a": {"b": 1e-4, "c": "1e-4", "d": [300.0, "x"]}}
    assert origins["a.b"] == f"{path}:2" and origins["a.c"] == f"{path}:3"


@pytest.mark.parametrize("text, value", [("200", 200), ("1e-3", 1e-3), ("'1e-3'", "1e-3"), ("null", None),
                                         ("true", True), ("[1, 2]", [1, 2]), ("gpt", "gpt"), ("", "")])
def test_parse_scalar(text: str, value: object) -> None:
    assert parse_scalar(text) == value


def test_locate_and_instantiate_nested_components() -> None:
    assert locate("torch.optim.AdamW") is torch.optim.AdamW
    with pytest.raises(ComponentNotFound, match="did you mean 'Linear'"):
        locate("torch.nn.Linaer")
    with pytest.raises(ComponentNotFound, match="outside what a config may build from"):
        locate("nonexistent_package_xyz.Thing")
    with pytest.raises(ComponentNotFound, match="'papertrain.recipes' has no 'nonexistent_family_xyz'"):
        locate("papertrain.recipes.nonexistent_family_xyz.Thing")
    built = instantiate({"_component_": "torch.nn.Linear", "in_features": 2, "out_features": 3})
    assert isinstance(built, torch.nn.Linear) and built.out_features == 3
    nested = instantiate({"_component_": "papertrain.data.tensors.TensorExamples",
                          "x": {"_component_": "torch.zeros", "size": [5, 2]}})
    assert len(nested) == 5 and nested.batch(torch.tensor([0, 4]))["x"].shape == (2, 2)
