"""Checking a config against what the code accepts, reporting every problem at once.

There is no second schema to keep in sync: the engine's own sections are dataclasses (schema.py), and a
`_component_` section is checked against the signature of the class or function it names. So the
keys `model:` accepts are exactly the arguments of the model's `__init__`, with its type hints.

Each problem becomes a `ConfigIssue` naming the file and line (or "command line") and the dotted key:
unknown keys (with a did-you-mean), wrong types, missing required values (absent, or written `???`),
`_component_` paths that do not import, and arguments the engine supplies itself.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from papertrain.config.components import (COMPONENT_KEY, DEFAULT_POLICY, ComponentNotAllowed, ComponentNotFound,
                                          ComponentPolicy, locate)
from papertrain.config.constraints import OneOf, Range, known_bounds, non_finite
from papertrain.config.yamlfile import Origins, origin_of
from papertrain.errors import ConfigIssue, did_you_mean

MISSING = "???"  # a value the user must fill in, as in `path: ???`


@dataclass(frozen=True)
class Component:
    """Marks a field as a `_component_` section. `supplied`: arguments the engine passes itself;
    `engine_keys`: keys the engine reads from the section (not passed to the component), with their types."""

    supplied: tuple[str, ...] = ()
    engine_keys: dict[str, Any] | None = None


class Validator:
    def __init__(self, origins: Origins, default_where: str, policy: ComponentPolicy = DEFAULT_POLICY):
        self.origins = origins
        self.default_where = default_where
        self.policy = policy
        self.issues: list[ConfigIssue] = []

    # -- reporting -----------------------------------------------------------------------------------
    def where(self, key: str) -> str:
        return origin_of(key, self.origins) or self.default_where

    def report(self, key: str, message: str) -> None:
        self.issues.append(ConfigIssue(self.where(key), key, message))

    def passes(self, value: Any, annotation: Any, key: str) -> bool:
        """Check without reporting (for the members of a Union)."""
        trial = Validator(self.origins, self.default_where, self.policy)
        trial.check(value, annotation, key)
        return not trial.issues

    # -- the checks ----------------------------------------------------------------------------------
    def check(self, value: Any, annotation: Any, key: str) -> None:
        if isinstance(value, str) and value.strip() == MISSING:
            self.report(key, "required value not set (it is '???'); set it in the file or on the "
                             f"command line: {key}=...")
            return
        if non_finite(value):
            self.report(key, f"must be a finite number, got {value!r}")
            return
        if annotation in (Any, inspect.Parameter.empty, None, object):
            return
        origin = get_origin(annotation)
        if origin is Annotated:
            base, *extras = get_args(annotation)
            component = next((e for e in extras if isinstance(e, Component)), None)
            if component is None:
                before = len(self.issues)
                self.check(value, base, key)
                if len(self.issues) == before:
                    self.bounds(value, [e for e in extras if isinstance(e, Range)], key)
                    for choice in (e for e in extras if isinstance(e, OneOf)):
                        problem = choice.problem(value)
                        if problem:
                            self.report(key, problem)
            elif value is None and type(None) in get_args(base):
                return
            else:
                self.component(value, key, component.supplied, component.engine_keys or {})
            return
        if origin in (Union, types.UnionType):
            members = get_args(annotation)
            if value is None and type(None) in members:
                return
            others = [m for m in members if m is not type(None)]
            if len(others) == 1:  # `X | None` with a value: its problems as an X
                self.check(value, others[0], key)
                return
            if not any(self.passes(value, member, key) for member in members if member is not type(None)):
                if isinstance(value, dict) and any(m for m in members if dataclasses.is_dataclass(m)):
                    for member in members:  # report the section's own problems, not "wrong type"
                        if dataclasses.is_dataclass(member):
                            self.check(value, member, key)
                            return
                self.report(key, f"expected {_describe(annotation)}, got {_show(value)}")
            return
        if origin is Literal:
            allowed = get_args(annotation)
            if value not in allowed:
                close = did_you_mean(str(value), allowed)
                hint = f" (did you mean '{close}'?)" if close else ""
                self.report(key, f"must be one of {', '.join(map(repr, allowed))}, got {_show(value)}{hint}")
            return
        if dataclasses.is_dataclass(annotation):
            self.dataclass_section(value, annotation, key)
            return
        if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
            self.sequence(value, annotation, key)
            return
        if origin is dict or annotation is dict:
            if not isinstance(value, dict):
                self.report(key, f"expected a mapping, got {_show(value)}")
            elif len(get_args(annotation)) == 2:  # dict[str, X]: each value checked as an X
                for name, item in value.items():
                    self.check(item, get_args(annotation)[1], f"{key}.{name}")
            return
        if annotation is bool:
            ok = isinstance(value, bool)
        elif annotation is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif annotation is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif annotation is str:
            ok = isinstance(value, str)
        elif isinstance(annotation, type):
            if isinstance(value, dict) and COMPONENT_KEY in value:
                self.component(value, key, ())
                return
            if annotation.__module__ == "torch" and annotation.__name__ == "Tensor":
                ok = _numeric(value)  # a tensor from YAML: a number or a (nested) list of numbers
            else:
                ok = True  # a class we cannot build from YAML: accept the plain values it converts from
        else:
            ok = True  # typing constructs we do not model (Callable, TypeVar, ...): trust the code
        if not ok:
            self.report(key, f"expected {_describe(annotation)}, got {_show(value)}")

    def bounds(self, value: Any, ranges: list[Range], key: str) -> None:
        """Each Range of an Annotated hint: on the value, or on every item of a list."""
        for bound in ranges:
            items = value if isinstance(value, (list, tuple)) else [value]
            for i, item in enumerate(items):
                problem = bound.problem(item)
                if problem:
                    self.report(key if items is not value else f"{key}.{i}", problem)
                    return

    def sequence(self, value: Any, annotation: Any, key: str) -> None:
        if not isinstance(value, (list, tuple)):
            self.report(key, f"expected a list, got {_show(value)}")
            return
        args = get_args(annotation)
        if get_origin(annotation) is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                self.report(key, f"expected {len(args)} items, got {len(value)}")
                return
            for i, (item, item_type) in enumerate(zip(value, args)):
                self.check(item, item_type, f"{key}.{i}")
        elif args:
            for i, item in enumerate(value):
                self.check(item, args[0], f"{key}.{i}")

    def dataclass_section(self, value: Any, cls: type, key: str) -> None:
        if not isinstance(value, dict):
            self.report(key or "<root>", f"expected a section (a mapping of keys), got {_show(value)}")
            return
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls, include_extras=True)
        prefix = f"{key}." if key else ""
        for name, item in value.items():
            if name not in fields:
                self.report(prefix + str(name), "unknown key" + _suggest(str(name), list(fields)))
            else:
                self.check(item, hints[name], prefix + name)
        for name, field in fields.items():
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if required and name not in value:
                self.report(prefix + name, "required key missing" + _field_help(field))

    def component(self, value: Any, key: str, supplied: tuple[str, ...], engine_keys: dict[str, Any] | None = None
                  ) -> None:
        engine_keys = engine_keys or {}
        if not isinstance(value, dict) or COMPONENT_KEY not in value:
            self.report(key, f"expected a section with a '{COMPONENT_KEY}:' naming the class to build "
                             f"(e.g. {COMPONENT_KEY}: torch.optim.AdamW), got {_show(value)}")
            return
        try:
            target = locate(value[COMPONENT_KEY], self.policy)
        except ComponentNotFound as err:
            if isinstance(err, ComponentNotAllowed):
                self.report(f"{key}.{COMPONENT_KEY}", f"not allowed: {err}")
            else:
                self.report(f"{key}.{COMPONENT_KEY}", f"cannot import {value[COMPONENT_KEY]!r}: {err}")
            return
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            return  # a builtin without a signature: nothing to check against
        parameters = {name: p for name, p in signature.parameters.items()
                      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        takes_any_keyword = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        hints = _type_hints(target)
        before = len(self.issues)
        for name, item in value.items():
            if name == COMPONENT_KEY:
                continue
            dotted = f"{key}.{name}"
            if name in engine_keys:
                self.check(item, engine_keys[name], dotted)
            elif name in supplied:
                self.report(dotted, "is supplied by the engine; remove it from the config")
            elif name in parameters:
                checked = len(self.issues)
                self.check(item, hints.get(name, parameters[name].annotation), dotted)
                if len(self.issues) == checked:
                    self.bounds(item, known_bounds(target, name), dotted)
            elif not takes_any_keyword:
                self.report(dotted, f"unknown key for {value[COMPONENT_KEY]}"
                            + _suggest(name, [n for n in parameters if n not in supplied]))
        for name, parameter in parameters.items():
            if (parameter.default is parameter.empty and name not in value and name not in supplied
                    and parameter.kind is not parameter.POSITIONAL_ONLY):
                self.report(f"{key}.{name}", f"required value missing (an argument of {value[COMPONENT_KEY]} "
                                             "without a default)")
        cross_check = getattr(target, "check_arguments", None)
        if callable(cross_check) and len(self.issues) == before:  # arguments that constrain each other
            arguments = {name: value.get(name, p.default) for name, p in parameters.items()
                         if name not in supplied and name not in engine_keys}
            for name, problem in cross_check(arguments) or ():
                self.report(f"{key}.{name}", problem)


def _numeric(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_numeric(item) for item in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_hints(target: Any) -> dict[str, Any]:
    """Evaluated type hints of a class's __init__ or a function; {} where they cannot be evaluated."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function, include_extras=True)
    except Exception:  # forward references a library never made importable: check nothing
        return {}


def _suggest(name: str, options: list[str]) -> str:
    close = did_you_mean(name, options)
    if close:
        return f"; did you mean '{close}'?"
    if options and len(options) <= 12:
        return f"; valid keys: {', '.join(sorted(options))}"
    return ""


def _field_help(field: dataclasses.Field) -> str:
    text = field.metadata.get("help")
    return f" ({text})" if text else ""


def _describe(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(annotation))
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return {"int": "an integer", "float": "a number", "bool": "true/false", "str": "a string"}.get(
            annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = "null" if value is None else type(value).__name__
    return f"{text} ({kind})"
