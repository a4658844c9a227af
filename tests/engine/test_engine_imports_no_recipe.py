"""The engine names no recipe: strategies, quantizers, finetuning methods and the text generator that
recipes give it are found through their meta.yaml `provides:` (papertrain/registry.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "platform" / "papertrain"


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_nothing_under_platform_imports_a_recipe() -> None:
    offenders = [f"{path.relative_to(ENGINE.parent)}: {name}" for path in sorted(ENGINE.rglob("*.py"))
                 for name in imported_modules(path)
                 if name == "papertrain.recipes" or name.startswith("papertrain.recipes.")
                 or name == "papertrain.recipes" or (name.startswith("papertrain") and name.endswith(".recipes"))]
    assert not offenders, "the engine imports recipes: " + "; ".join(offenders)


def test_what_recipes_provide_is_found_and_allowed() -> None:
    from papertrain.registry import lookup, provided
    from papertrain.strategies import strategy_class

    assert strategy_class("zero3_reference").name == "zero3_reference"
    assert callable(lookup("quantizers", "int8")) and callable(lookup("finetune", "lora"))
    assert {"sampler", "stream"} <= set(provided("generation"))
