"""`_component_`: naming the Python object a config section builds.

    optimizer:
      _component_: torch.optim.AdamW   # any importable class or function
      lr: 3e-4                          # its keyword arguments

`instantiate(section, params=...)` imports the target and calls it with the section's keys plus the
arguments the engine supplies itself (the optimizer's `params`, the scheduler's `optimizer`). Nested
sections with their own `_component_` are built first, depth first.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from papertrain.errors import did_you_mean

COMPONENT_KEY = "_component_"


class ComponentNotFound(Exception):
    """The dotted path does not name an importable object; the message has a did-you-mean."""


def locate(path: str) -> Callable[..., Any]:
    """Import `package.module.Name` (or a nested attribute) and return the object."""
    if not isinstance(path, str) or not path or path.startswith(".") or ".." in path:
        raise ComponentNotFound(f"'{path}' is not a dotted import path like torch.optim.AdamW")
    parts = path.split(".")
    module, imported = None, 0
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            module = importlib.import_module(name)
            imported = i
            break
        except ModuleNotFoundError as err:
            if err.name is not None and not name.startswith(err.name) and err.name != name:
                # the module exists but one of *its* imports is missing: say that, not "no such module"
                raise ComponentNotFound(f"importing {name} failed: {err}") from None
    if module is None:
        raise ComponentNotFound(f"no module named '{parts[0]}'")
    obj: Any = module
    for depth in range(imported, len(parts)):
        attribute = parts[depth]
        if not hasattr(obj, attribute):
            where = ".".join(parts[:depth])
            close = did_you_mean(attribute, _names_in(obj))
            hint = f" (did you mean '{close}'?)" if close else ""
            raise ComponentNotFound(f"'{where}' has no '{attribute}'{hint}")
        obj = getattr(obj, attribute)
    if not callable(obj):
        raise ComponentNotFound(f"'{path}' is a {type(obj).__name__}, not a class or function")
    return obj


def _names_in(obj: Any) -> list[str]:
    names = [n for n in dir(obj) if not n.startswith("_")]
    if hasattr(obj, "__path__"):  # a package: its submodules count too, imported or not
        names += [info.name for info in pkgutil.iter_modules(obj.__path__)]
    return names


def is_component(value: Any) -> bool:
    return isinstance(value, dict) and COMPONENT_KEY in value


def instantiate(section: dict[str, Any], **supplied: Any) -> Any:
    """Build the object a `_component_` section describes; `supplied` are the engine's own arguments."""
    target = locate(section[COMPONENT_KEY])
    kwargs = {key: _build(value) for key, value in section.items() if key != COMPONENT_KEY}
    return target(**kwargs, **supplied)


def _build(value: Any) -> Any:
    if is_component(value):
        return instantiate(value)
    if isinstance(value, dict):
        return {key: _build(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_build(item) for item in value]
    return value
