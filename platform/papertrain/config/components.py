"""`_component_`: naming the Python object a config section builds, from an allow-list.

    optimizer:
      _component_: torch.optim.AdamW   # a class or function papertrain allows (see below)
      lr: 3e-4                          # its keyword arguments

`instantiate(section, params=...)` imports the target and calls it with the section's keys plus the
arguments the engine supplies itself (the optimizer's `params`, the scheduler's `optimizer`). Nested
sections with their own `_component_` are built first, depth first.

A config is data. Whoever hands you a YAML file or a run directory must not be able to run code through
it, so a `_component_` resolves only inside these namespaces:

    papertrain's building blocks   papertrain.recipes, .data, .schedules, .optim, .classification, .nn, ...
    torch's building blocks        torch.optim, torch.nn, torch.distributions, tensor constructors
    what you trust explicitly      `trust: [timm]` at the top of a config you wrote, or `--trust timm` on the
                                   command line (a run directory's config.yaml cannot extend trust)

and never inside `NEVER` (os, subprocess, builtins, shutil, pickle, torch.hub, torch.load, ...), whatever is
trusted. The path is checked before anything is imported (importing a module runs its code), every module
passed on the way must itself be allowed (so `papertrain.recipes.x.model.os.system` fails), no part may be
private (`_x`, `__globals__`), and the object found must not come from a NEVER module (a function a recipe
imported from `os` is still `os`'s).
"""

from __future__ import annotations

import importlib
import keyword
import pkgutil
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from papertrain.errors import did_you_mean

COMPONENT_KEY = "_component_"

# papertrain's own namespaces that hold things a config builds (not its CLI, config or cluster code)
ENGINE_NAMESPACES = (
    "papertrain.recipes", "papertrain.data", "papertrain.schedules", "papertrain.optim",
    "papertrain.classification", "papertrain.nn", "papertrain.strategies", "papertrain.callbacks",
)
TORCH_NAMESPACES = ("torch.optim", "torch.nn", "torch.distributions",
                    # tensor constructors, for a data set or buffer given as values
                    "torch.zeros", "torch.ones", "torch.full", "torch.tensor", "torch.arange", "torch.linspace",
                    "torch.eye", "torch.randn", "torch.rand", "torch.randint")

# Never callable through a config, trusted or not: processes, files, the interpreter, deserialisers and
# code loaders. (A prefix covers its submodules: "torch.jit" covers torch.jit.load.)
NEVER = (
    "os", "posix", "nt", "subprocess", "builtins", "shutil", "sys", "importlib", "runpy", "pickle", "_pickle",
    "marshal", "shelve", "dill", "cloudpickle", "joblib", "ctypes", "cffi", "socket", "ssl", "pty", "code",
    "codeop", "pdb", "bdb", "multiprocessing", "concurrent", "threading", "_thread", "signal", "tempfile",
    "pathlib", "io", "_io", "glob", "fileinput", "webbrowser", "urllib", "http", "ftplib", "smtplib",
    "telnetlib", "requests", "asyncio", "selectors", "inspect", "gc", "atexit", "site", "sysconfig",
    "zipimport", "pip", "setuptools", "distutils", "pkg_resources", "yaml", "functools", "operator",
    "types", "copyreg", "this", "antigravity", "papertrain.cli", "papertrain.config", "papertrain.cluster",
    "torch.hub", "torch.load", "torch.save", "torch.jit", "torch.package", "torch.utils.cpp_extension",
    "torch.ops", "torch.classes", "torch.serialization", "torch.library", "torch.export", "torch.onnx",
    "torch.distributed", "torch.multiprocessing", "torch.utils.model_zoo", "numpy.load", "numpy.lib",
)


class ComponentNotFound(Exception):
    """The dotted path does not name an importable object; the message has a did-you-mean."""


class ComponentNotAllowed(ComponentNotFound):
    """The dotted path names something outside the allow-list; the message says what is allowed."""


def _within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class ComponentPolicy:
    """Which namespaces `_component_` paths may name: papertrain's and torch's building blocks, plus
    `trusted` (from the config's `trust:` key or `--trust`), never anything under NEVER."""

    trusted: tuple[str, ...] = ()

    @property
    def allowed(self) -> tuple[str, ...]:
        return ENGINE_NAMESPACES + TORCH_NAMESPACES + self.trusted

    def permits_module(self, name: str) -> bool:
        return _within(name, self.allowed) and not _within(name, NEVER)

    def check_path(self, path: str) -> None:
        """Before importing anything: the path's syntax and namespace."""
        if not isinstance(path, str) or not path:
            raise ComponentNotFound(f"{path!r} is not a dotted import path like torch.optim.AdamW")
        parts = path.split(".")
        if any(not part.isidentifier() or keyword.iskeyword(part) for part in parts):
            raise ComponentNotFound(f"'{path}' is not a dotted import path like torch.optim.AdamW")
        private = [part for part in parts if part.startswith("_")]
        if private:
            raise ComponentNotAllowed(f"'{path}' names a private attribute ('{private[0]}'); a config may only "
                                      "name public classes and functions")
        if _within(path, NEVER):
            raise ComponentNotAllowed(f"'{path}' is never callable from a config (it can run programs, touch "
                                      "files or load code), trusted or not")
        if not _within(path, self.allowed):
            trusted = f", and the trusted {', '.join(self.trusted)}" if self.trusted else ""
            raise ComponentNotAllowed(
                f"'{path}' is outside what a config may build from (papertrain's recipes and components, torch.optim, "
                f"torch.nn, torch.distributions and torch's tensor constructors{trusted}); to allow a package you "
                f"trust, add `trust: [{parts[0]}]` to your config or pass --trust {parts[0]}")

    def check_object(self, path: str, obj: Any) -> None:
        """After resolving: the object must not come from a NEVER module (e.g. a re-exported os.system)."""
        origin = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
        if isinstance(origin, str) and _within(origin, NEVER):
            raise ComponentNotAllowed(f"'{path}' is {origin}.{getattr(obj, '__name__', '?')}, which is never "
                                      "callable from a config")


DEFAULT_POLICY = ComponentPolicy()


def trust_issues(trusted: Iterable[Any]) -> list[str]:
    """Problems with a `trust:` list (each entry a dotted package name outside NEVER)."""
    problems = []
    for entry in trusted:
        if not isinstance(entry, str) or not all(part.isidentifier() for part in entry.split(".")):
            problems.append(f"{entry!r} is not a package name like timm or mylab.models")
        elif any(part.startswith("_") for part in entry.split(".")):
            problems.append(f"'{entry}' is private; trust a public package")
        elif _within(entry, NEVER):
            problems.append(f"'{entry}' is never callable from a config (it can run programs, touch files or "
                            "load code), trusted or not")
    return problems


def locate(path: str, policy: ComponentPolicy = DEFAULT_POLICY) -> Callable[..., Any]:
    """Import `package.module.Name` (or a nested attribute) and return the object, within `policy`."""
    policy.check_path(path)
    parts = path.split(".")
    module, imported = None, 0
    for i in range(len(parts), 0, -1):  # (the path is allowed, so are the packages it starts with)
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
        raise ComponentNotFound(f"no module named '{'.'.join(parts[:2]) if len(parts) > 1 else parts[0]}'")
    obj: Any = module
    for depth in range(imported, len(parts)):
        attribute = parts[depth]
        if not hasattr(obj, attribute):
            where = ".".join(parts[:depth])
            close = did_you_mean(attribute, _names_in(obj))
            hint = f" (did you mean '{close}'?)" if close else ""
            raise ComponentNotFound(f"'{where}' has no '{attribute}'{hint}")
        obj = getattr(obj, attribute)
        if isinstance(obj, types.ModuleType) and not policy.permits_module(obj.__name__):
            raise ComponentNotAllowed(f"'{path}' reaches module '{obj.__name__}' through "
                                      f"'{'.'.join(parts[:depth + 1])}', which a config may not build from")
    policy.check_object(path, obj)
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


def instantiate(section: dict[str, Any], policy: ComponentPolicy = DEFAULT_POLICY, **supplied: Any) -> Any:
    """Build the object a `_component_` section describes; `supplied` are the engine's own arguments."""
    target = locate(section[COMPONENT_KEY], policy)
    kwargs = {key: _build(value, policy) for key, value in section.items() if key != COMPONENT_KEY}
    return target(**kwargs, **supplied)


def _build(value: Any, policy: ComponentPolicy) -> Any:
    if is_component(value):
        return instantiate(value, policy)
    if isinstance(value, dict):
        return {key: _build(item, policy) for key, item in value.items()}
    if isinstance(value, list):
        return [_build(item, policy) for item in value]
    return value
