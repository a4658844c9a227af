"""Reading YAML configs: values, and the line each key was written on.

Values come from `yaml.safe_load` (never the unsafe loader). A second, safe `yaml.compose` pass over the
same text gives each key's line number, so that an error can say `tiny.yaml:14: model.n_layer: ...`.

The compose pass also fixes a YAML 1.1 quirk that bites every ML config: PyYAML reads an unquoted
`1e-3` as the *string* "1e-3" (its float pattern wants a dot). Unquoted scalars that Python's float()
accepts become floats; quoted ones stay strings, as the author asked.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from papertrain.errors import ConfigError, ConfigIssue, PapertrainError

# Numbers that YAML 1.1 leaves as strings but every reader means as floats: 1e-3, 3E+4, -2e5.
_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")

Origins = dict[str, str]  # dotted key -> "file:line" where it was last set


def origin_of(key: str, origins: Origins) -> str | None:
    """Where `key` was set, or else its nearest parent section (a default inside a section)."""
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return None


def parse_scalar(text: str) -> Any:
    """The value of one YAML scalar as written on a command line (`1e-3` -> 0.001, `null` -> None)."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str) and not _is_quoted(text) and _SCIENTIFIC.match(text.strip()):
        return float(text)
    return value


def _is_quoted(text: str) -> bool:
    text = text.strip()
    return len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""


def load_yaml(path: str | Path) -> tuple[dict[str, Any], Origins]:
    """Load a YAML mapping from `path`; return it with the line of every key."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PapertrainError(f"config file not found: {path}",
                              "check the path, or run `papertrain ls` for the recipe names") from None
    try:
        tree = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(str(path), [ConfigIssue(where, "<yaml>", f"not valid YAML: {problem}")]) from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(str(path), [ConfigIssue(f"{path}:1", "<root>",
                                                  "a config must be a mapping of sections (model:, trainer:, ...)")])
    origins: Origins = {}
    tree = _walk(tree, root, "", str(path), origins)
    return tree, origins


def _walk(value: Any, node: yaml.Node | None, prefix: str, file: str, origins: Origins) -> Any:
    """Pair the loaded value with its node: record key lines and fix unquoted scientific floats."""
    if isinstance(node, yaml.MappingNode) and isinstance(value, dict):
        children = {_key_text(k): (k, v) for k, v in node.value}
        for key in list(value):
            key_node, value_node = children.get(str(key), (None, None))
            dotted = f"{prefix}{key}"
            if key_node is not None:
                origins[dotted] = f"{file}:{key_node.start_mark.line + 1}"
            value[key] = _walk(value[key], value_node, dotted + ".", file, origins)
        return value
    if isinstance(node, yaml.SequenceNode) and isinstance(value, list):
        return [_walk(item, child, f"{prefix}{i}.", file, origins)
                for i, (item, child) in enumerate(zip(value, node.value))]
    if isinstance(node, yaml.ScalarNode) and isinstance(value, str) and node.style is None:
        if _SCIENTIFIC.match(value):
            return float(value)
    return value


def _key_text(node: yaml.Node) -> str:
    return str(node.value) if isinstance(node, yaml.ScalarNode) else repr(node)


def dump_yaml(tree: dict[str, Any]) -> str:
    """YAML text for a config tree, keys in their given order."""
    return yaml.safe_dump(tree, sort_keys=False, default_flow_style=None, width=100)
