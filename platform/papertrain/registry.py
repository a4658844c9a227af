"""What recipes contribute to the engine, found without the engine importing any recipe.

A recipe that gives the engine a strategy, a quantizer, a finetuning method or the text generator says so
in its meta.yaml (data, read with yaml.safe_load):

    provides:
      strategies: {zero3_reference: papertrain.recipes.scaling.zero3.strategy.Zero3Reference}
      quantizers: {int8: papertrain.recipes.quantization.llm_int8.model.quantize_linears}
      finetune:   {lora: papertrain.recipes.finetune.lora.model.apply_lora}
      generation: {sampler: ..., stream: ...}

The engine looks names up here (`provided(kind)`, `lookup(kind, name)`); each path must lie inside
`papertrain.recipes` and is located through the same allow-list as a config's `_component_`. So the
engine's code names no recipe, a new recipe plugs in by its meta.yaml alone, and tests/engine/
test_engine_imports_no_recipe.py keeps it that way.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import yaml

from papertrain.errors import PapertrainError

KINDS = ("strategies", "quantizers", "finetune", "generation")


def recipes_root() -> Path:
    """The folder of `papertrain.recipes`, found without importing it."""
    spec = importlib.util.find_spec("papertrain.recipes")
    if spec is None or not spec.submodule_search_locations:
        raise PapertrainError("papertrain.recipes is not installed", "pip install -e . from the repository")
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def _all_provided() -> dict[str, dict[str, tuple[str, str]]]:
    """kind -> name -> (dotted path, the meta.yaml that provides it)."""
    found: dict[str, dict[str, tuple[str, str]]] = {kind: {} for kind in KINDS}
    for meta_path in sorted(recipes_root().glob("*/*/meta.yaml")):
        provides = (yaml.safe_load(meta_path.read_text()) or {}).get("provides") or {}
        for kind, entries in provides.items():
            if kind not in KINDS:
                raise PapertrainError(f"{meta_path}: provides.{kind} is not something a recipe can provide",
                                      f"one of: {', '.join(KINDS)}")
            for name, path in (entries or {}).items():
                if not isinstance(path, str) or not path.startswith("papertrain.recipes."):
                    raise PapertrainError(f"{meta_path}: provides.{kind}.{name} must be a path inside "
                                          f"papertrain.recipes, got {path!r}")
                if name in found[kind]:
                    raise PapertrainError(f"{meta_path}: provides.{kind}.{name}, which {found[kind][name][1]} "
                                          "provides already", "give it another name")
                found[kind][name] = (path, str(meta_path))
    return found


def provided(kind: str) -> dict[str, str]:
    """name -> dotted path of everything recipes provide of `kind`."""
    return {name: path for name, (path, _) in _all_provided()[kind].items()}


def lookup(kind: str, name: str) -> Any:
    """The object a recipe provides as `kind`.`name` (located within the allow-list)."""
    from papertrain.config.components import locate

    entries = provided(kind)
    if name not in entries:
        raise PapertrainError(f"no recipe provides {kind} '{name}'",
                              f"known: {', '.join(entries) or 'none'} (a recipe's meta.yaml `provides:` adds one)")
    return locate(entries[name])
