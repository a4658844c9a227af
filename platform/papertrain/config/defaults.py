"""Every setting a run uses, written out: the defaults a config leaves unsaid, filled into its tree.

A recipe YAML names only what it changes. The run directory's config.yaml must hold *every* setting the
run used, or two runs that differ only in a default look identical, and resuming after a default changed
in the code would silently train something else. So after validation, `fill_defaults` adds

- each field of the engine's own sections (`trainer`, `strategy`, and `pretrained`, `quant`, `finetune`
  where present) that the config left out, with the schema's default, and
- each keyword a `_component_` section's class accepts and the section left out, with the default of
  that class's signature (e.g. `min_lr_ratio: 0.1` of WarmupCosine, `stage: 3` of DeepSpeed),

and returns where each default came from, for `papertrain show --origins`. Only plain values are filled
(numbers, strings, booleans, null and lists of them): a default that YAML cannot hold, such as a dtype
or a function, stays implicit, and the arguments the engine supplies itself (`params`, `optimizer`) are
never written.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any

from papertrain.config.components import COMPONENT_KEY, ComponentNotFound, ComponentPolicy, locate

SUPPLIED_BY_ENGINE = {"params", "optimizer", "self"}


def fill_defaults(tree: dict[str, Any], policy: ComponentPolicy) -> dict[str, str]:
    """Fill `tree` in place with the defaults it leaves unsaid; return {dotted key: where the default is}."""
    from papertrain.config.schema import RunConfig

    filled: dict[str, str] = {}
    _fill_dataclass(tree, RunConfig, "", filled, top_level=True)
    _fill_components(tree, "", policy, filled)
    return filled


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_plain(item) for item in value)


def _as_yaml(value: Any) -> Any:
    return [_as_yaml(item) for item in value] if isinstance(value, (list, tuple)) else value


def _dataclass_of(kind: Any) -> type | None:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next((k for k in typing.get_args(kind) if dataclasses.is_dataclass(k)), None)
    return kind if dataclasses.is_dataclass(kind) else None


def _fill_dataclass(node: dict[str, Any], cls: type, prefix: str, filled: dict[str, str], top_level: bool = False) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        section = _dataclass_of(hints[f.name])
        if section is not None:  # an engine section: filled where present, or where it always exists (strategy)
            if f.name not in node and f.default_factory is not dataclasses.MISSING:
                node[f.name] = {}
            if isinstance(node.get(f.name), dict):
                _fill_dataclass(node[f.name], section, f"{key}.", filled)
            continue
        if f.name in node:
            continue
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue  # required: validation already made sure it is there
        if top_level and value in (None, [], ()):
            continue  # an optional top-level section or setting the config does not use
        if _plain(value):
            node[f.name] = _as_yaml(value)
            filled[key] = f"default of {cls.__name__}.{f.name}"


def _fill_components(node: Any, prefix: str, policy: ComponentPolicy, filled: dict[str, str]) -> None:
    if isinstance(node, list):
        for index, item in enumerate(node):
            _fill_components(item, f"{prefix}{index}.", policy, filled)
        return
    if not isinstance(node, dict):
        return
    if isinstance(node.get(COMPONENT_KEY), str):
        _fill_signature(node, prefix, policy, filled)
    for key, value in node.items():
        _fill_components(value, f"{prefix}{key}.", policy, filled)


def _fill_signature(section: dict[str, Any], prefix: str, policy: ComponentPolicy, filled: dict[str, str]) -> None:
    try:
        target = locate(section[COMPONENT_KEY], policy)
        signature = inspect.signature(target)
    except (ComponentNotFound, TypeError, ValueError):
        return  # validation reports what cannot be found; some builtins have no signature
    for name, parameter in signature.parameters.items():
        if (name in section or name in SUPPLIED_BY_ENGINE or name.startswith("_")
                or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD, parameter.POSITIONAL_ONLY)
                or parameter.default is parameter.empty or not _plain(parameter.default)):
            continue
        section[name] = _as_yaml(parameter.default)
        filled[f"{prefix}{name}"] = f"default of {section[COMPONENT_KEY]}"
