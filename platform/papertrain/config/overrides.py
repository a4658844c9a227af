"""Dotted command-line overrides: `trainer.max_steps=200 model.n_layers=4 ~scheduler`.

    key.path=value   set a value (parsed as a YAML scalar: 200 -> int, 1e-3 -> float, null -> None,
                     [1,2] -> list); missing parent sections are created, and a section given by
                     name (`strategy=deepspeed`) becomes {name: deepspeed} when a key is set inside it
    ~key.path        delete a key (e.g. drop `optimizer.betas` after switching the optimizer to SGD)

Validation runs after overrides, so a mistyped key on the command line is reported like one in a file.
"""

from __future__ import annotations

import re
from typing import Any

from papertrain.config.yamlfile import Origins, parse_scalar
from papertrain.errors import ConfigIssue

COMMAND_LINE = "command line"
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def is_override(arg: str) -> bool:
    """Whether a command-line word is an override rather than a recipe name or path."""
    return arg.startswith("~") or ("=" in arg and _KEY.match(arg.split("=", 1)[0]) is not None)


def apply_overrides(tree: dict[str, Any], origins: Origins, overrides: list[str]) -> list[ConfigIssue]:
    """Apply each override in order; return the malformed ones as issues (the rest still apply)."""
    issues: list[ConfigIssue] = []
    for text in overrides:
        if text.startswith("~"):
            key = text[1:]
            problem = _delete(tree, key) if _KEY.match(key) else "not a dotted key"
        elif "=" in text and _KEY.match(text.split("=", 1)[0]):
            key, raw = text.split("=", 1)
            problem = _set(tree, key, parse_scalar(raw))
            if problem is None:
                _forget_origins_below(origins, key)
                origins[key] = f"{COMMAND_LINE} ({text})"
        else:
            key, problem = text, "expected key.path=value or ~key.path (e.g. trainer.max_steps=200)"
        if problem:
            issues.append(ConfigIssue(COMMAND_LINE, key, problem))
    return issues


def _set(tree: dict[str, Any], key: str, value: Any) -> str | None:
    *parents, leaf = key.split(".")
    node: Any = tree
    walked: list[str] = []
    for part in parents:
        walked.append(part)
        if node.get(part) is None:
            node[part] = {}
        elif isinstance(node[part], str):  # a section given by name: `strategy=deepspeed strategy.stage=2`
            from papertrain.config import NAMED_SECTIONS

            node[part] = {NAMED_SECTIONS.get(part, "name"): node[part]}
        node = node[part]
        if not isinstance(node, dict):
            return f"cannot set a key inside {'.'.join(walked)}, which is a {type(node).__name__}, not a section"
    node[leaf] = value
    return None


def _delete(tree: dict[str, Any], key: str) -> str | None:
    *parents, leaf = key.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
        return "cannot delete: no such key in the config"
    del node[leaf]
    return None


def _forget_origins_below(origins: Origins, key: str) -> None:
    for known in [k for k in origins if k.startswith(key + ".")]:
        del origins[known]
