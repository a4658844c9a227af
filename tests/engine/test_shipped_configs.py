"""Every shipped YAML validates, and every recipe folder meets the recipe contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, RECIPES
from papertrain.catalog import META_FILE, discover
from papertrain.config import load_config

CONFIGS = sorted(p for p in RECIPES.glob("*/*/*.yaml") if p.name != META_FILE)
RECIPE_DIRS = sorted(p.parent for p in RECIPES.glob(f"*/*/{META_FILE}"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(RECIPES)))
def test_shipped_config_is_valid(path: Path) -> None:
    config = load_config(path)
    assert config.run.name == path.parent.name, "a recipe's config names its recipe (runs go to runs/<name>)"


@pytest.mark.parametrize("folder", RECIPE_DIRS, ids=lambda p: p.name)
def test_recipe_folder_has_everything_the_contract_asks(folder: Path) -> None:
    for required in ("model.py", "tiny.yaml", "README.md", "meta.yaml", "__init__.py"):
        assert (folder / required).is_file(), f"{folder.name} lacks {required}"
    package = "papertrain.recipes." + ".".join(folder.relative_to(RECIPES).parts)
    task = load_config(folder / "tiny.yaml").run.task["_component_"]
    if task.startswith(package + "."):  # a recipe may reuse another's task (zero3 trains GPT's)
        assert (folder / "task.py").is_file(), f"{folder.name}'s config names {task} but there is no task.py"
    meta = yaml.safe_load((folder / "meta.yaml").read_text())
    assert meta["title"] and meta["paper"] and meta["url"].startswith("http")
    model_doc = (folder / "model.py").read_text().split('"""')[1]
    assert len(model_doc.splitlines()) >= 10, "model.py opens with the paper's idea in prose"
    tests = list((REPO / "tests" / "recipes").glob(f"test_{folder.name}.py"))
    assert tests, f"tests/recipes/test_{folder.name}.py is missing"


@pytest.mark.parametrize("folder", RECIPE_DIRS, ids=lambda p: p.name)
def test_every_recipe_is_verified_and_its_readme_reports_the_measurement(folder: Path) -> None:
    """`papertrain ls` shows it verified (its recorded tiny run met the goal of its meta.yaml), and the
    README has a Measured section with no placeholder left in it."""
    assert discover()[folder.name].status() == "verified", f"record it: papertrain run {folder.name} --record"
    readme = (folder / "README.md").read_text()
    measured = readme.split("\n## Measured", 1)
    assert len(measured) == 2, f"{folder.name}/README.md has no '## Measured' section"
    section = measured[1].split("\n## ", 1)[0]
    placeholders = [line for line in section.splitlines() if line.strip().isupper() and line.strip().isalpha()]
    assert not placeholders and any(ch.isdigit() for ch in section), f"{folder.name}: {placeholders or 'no numbers'}"


def test_recipe_names_are_unique() -> None:
    assert len(discover()) == len(RECIPE_DIRS)


def _numeric_without_a_range(annotation) -> bool:
    """An int or float hint (alone, optional, or in a list/tuple) that carries no Range."""
    import types
    import typing

    from papertrain.config.constraints import Range

    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        return not any(isinstance(e, Range) for e in extras) and _numeric_without_a_range(base)
    if origin in (typing.Union, types.UnionType, list, tuple):
        return any(_numeric_without_a_range(a) for a in typing.get_args(annotation) if a not in (type(None), Ellipsis))
    return annotation in (int, float)


def _unconstrained(section, found: set[str]) -> None:
    import inspect
    import typing

    from papertrain.config import locate
    from papertrain.config.constraints import known_bounds

    if not isinstance(section, dict):
        return
    if "_component_" in section:
        target = locate(section["_component_"])
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target, include_extras=True)
        for name, parameter in inspect.signature(target).parameters.items():
            hint = hints.get(name, parameter.annotation)
            if name not in ("params", "optimizer") and _numeric_without_a_range(hint) and not known_bounds(target, name):
                found.add(f"{section['_component_']}.{name}")
    for value in section.values():
        _unconstrained(value, found)


def test_every_numeric_setting_of_every_shipped_component_has_its_constraint() -> None:
    """So `papertrain validate` refuses 0 layers or a dropout of 1.5 before any work (config/constraints.py)."""
    found: set[str] = set()
    for path in CONFIGS:
        _unconstrained(load_config(path).tree, found)
    assert not found, "give these a Range (papertrain.config.constraints): " + ", ".join(sorted(found))
