"""`${...}` references between config values.

    total_steps: ${trainer.max_steps}        the whole value: keeps its type (an int stays an int)
    run_dir: runs/${name}-${seed}            inside a string: substituted as text
    cache: ${env:PAPERTRAIN_DATA,~/.cache}   an environment variable, with an optional default

References resolve against the config after overrides, so `trainer.max_steps=50` on the command line
also moves every value that refers to it. Cycles and unknown keys are reported as config issues.
"""

from __future__ import annotations

import os
import re
from typing import Any

from papertrain.config.yamlfile import Origins
from papertrain.errors import ConfigIssue, did_you_mean

_REFERENCE = re.compile(r"\$\{([^${}]+)\}")


class _Unresolvable(Exception):
    pass


def resolve_references(tree: dict[str, Any], origins: Origins,
                       references: dict[str, list[str]] | None = None) -> list[ConfigIssue]:
    """Replace every `${...}` in `tree` in place; return what could not be resolved. `references`, if
    given, receives each key that held references and the config keys it referred to (directly or
    through other references), e.g. {"scheduler.total_steps": ["trainer.max_steps"]}: what `show
    --origins` credits a value to, and which settings follow the run's length when it is extended."""
    issues: list[ConfigIssue] = []
    resolver = _Resolver(tree)

    def visit(node: Any, key: str) -> Any:
        if isinstance(node, dict):
            for child in node:
                node[child] = visit(node[child], f"{key}.{child}" if key else str(child))
            return node
        if isinstance(node, list):
            return [visit(item, key) for item in node]
        if isinstance(node, str) and "${" in node:
            try:
                resolver.seen = []
                value = resolver.value_of_string(node, stack=(key,))
                if references is not None:
                    references[key] = list(dict.fromkeys(resolver.seen))
                return value
            except _Unresolvable as err:
                issues.append(ConfigIssue(origins.get(key, "config"), key, str(err)))
        return node

    visit(tree, "")
    return issues


class _Resolver:
    def __init__(self, tree: dict[str, Any]):
        self.tree = tree
        self.seen: list[str] = []  # the config keys the value being resolved referred to

    def value_of_string(self, text: str, stack: tuple[str, ...]) -> Any:
        whole = _REFERENCE.fullmatch(text.strip())
        if whole:
            return self.lookup(whole.group(1).strip(), stack)
        return _REFERENCE.sub(lambda m: str(self.lookup(m.group(1).strip(), stack)), text)

    def lookup(self, ref: str, stack: tuple[str, ...]) -> Any:
        if ref.startswith("env:"):
            name, _, default = ref[4:].partition(",")
            value = os.environ.get(name.strip())
            if value is None:
                if not default:
                    raise _Unresolvable(f"environment variable {name.strip()} is not set "
                                        f"(give a default: ${{env:{name.strip()},value}})")
                value = default.strip()
            return os.path.expanduser(value)
        if ref in stack:
            raise _Unresolvable("circular reference: " + " -> ".join(stack + (ref,)))
        self.seen.append(ref)
        node: Any = self.tree
        walked: list[str] = []
        for part in ref.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                close = did_you_mean(part, node) if isinstance(node, dict) else None
                hint = f" (did you mean '{'.'.join(walked + [close])}'?)" if close else ""
                raise _Unresolvable(f"${{{ref}}} refers to a key that does not exist{hint}")
            walked.append(part)
        if isinstance(node, str) and "${" in node:
            return self.value_of_string(node, stack + (ref,))
        return node
