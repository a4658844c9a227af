"""Recipe configs: YAML -> overrides -> `${}` references -> validation -> a typed `RunConfig`.

    cfg = load_config("recipes/transformers/gpt/tiny.yaml", ["trainer.max_steps=200"])
    cfg.run.trainer.max_steps      # 200, typed
    cfg.tree                       # the resolved plain tree, saved as RUN_DIR/config.yaml
    cfg.build("model")             # the object the `model:` section names (errors name the section)

Every problem in the file and on the command line is collected and raised together as one ConfigError.
Components resolve inside an allow-list (see components.py): papertrain's and torch's building blocks,
plus what the config's `trust:` key or the command line's `--trust` adds. A run directory's own
config.yaml is data someone else may have written: loaded with `trusting_file=False`, its `trust:` key
is ignored, and only the command line can extend trust.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from papertrain.config.components import (COMPONENT_KEY, DEFAULT_POLICY, ComponentNotFound, ComponentPolicy,
                                          instantiate, is_component, locate, trust_issues)
from papertrain.config.interpolation import resolve_references
from papertrain.config.overrides import apply_overrides, is_override
from papertrain.config.schema import RunConfig, StrategyConfig, TrainerConfig, build_dataclass
from papertrain.config.validate import Validator
from papertrain.config.yamlfile import Origins, dump_yaml, load_yaml, origin_of
from papertrain.errors import ConfigError, ConfigIssue, PapertrainError

NAMED_SECTIONS = {"strategy": "name", "quant": "mode", "finetune": "train"}

__all__ = [
    "COMPONENT_KEY", "ComponentPolicy", "LoadedConfig", "RunConfig", "StrategyConfig", "TrainerConfig", "dump_yaml",
    "instantiate", "is_component", "is_override", "load_config", "locate",
]


@dataclass
class LoadedConfig:
    source: Path  # the YAML file it came from
    tree: dict[str, Any]  # resolved plain values: what RUN_DIR/config.yaml holds
    run: RunConfig  # the same, typed
    origins: Origins  # dotted key -> where it was set
    policy: ComponentPolicy = field(default_factory=ComponentPolicy)  # what `_component_` may name
    references: dict[str, list[str]] = field(default_factory=dict)  # key -> the keys its `${...}` named
    defaults: dict[str, str] = field(default_factory=dict)  # keys no file or override set: whose default

    def follows(self, key: str) -> set[str]:
        """Every key whose value `key` takes through `${...}`, directly or through other references."""
        found: set[str] = set()
        todo = list(self.references.get(key, ()))
        while todo:
            ref = todo.pop()
            if ref not in found:
                found.add(ref)
                todo += self.references.get(ref, ())
        return found

    def origin(self, key: str) -> str:
        """Where the value of `key` really came from: a file line, the command line, a reference to
        another key (and where that was set), or a default of the schema or of the component's class."""
        if key in self.defaults:
            return self.defaults[key]
        where = origin_of(key, self.origins) or str(self.source)
        if key in self.references:
            named = ", ".join(f"${{{ref}}} = {self.origin(ref)}" for ref in self.references[key]
                              if not ref.startswith("env:"))
            return f"{where}, through {named}" if named else where
        return where

    def where(self, key: str) -> str:
        return origin_of(key, self.origins) or str(self.source)

    def build(self, key: str, section: dict[str, Any] | None = None, **supplied: Any) -> Any:
        """Build the top-level section `key` (or `section`, reported as `key`). An exception raised while
        building becomes one PapertrainError that names the section, where it was set, and the error."""
        section = self.tree[key] if section is None else section
        return build_section(section, key, self.where(key), self.policy, **supplied)


def build_section(section: dict[str, Any], key: str, where: str, policy: ComponentPolicy = DEFAULT_POLICY,
                  **supplied: Any) -> Any:
    """`instantiate`, with any failure reported against the config section that asked for it."""
    try:
        return instantiate(section, policy, **supplied)
    except PapertrainError as err:
        if key in err.message:
            raise
        raise PapertrainError(f"{where}: {key}: {err.message}", err.hint) from None
    except ComponentNotFound as err:  # an unvalidated section (validation reports these first)
        raise PapertrainError(f"{where}: {key}: {err}", "fix the section's _component_") from None
    except Exception as err:
        if os.environ.get("PAPERTRAIN_DEBUG"):
            raise
        frame = traceback.extract_tb(err.__traceback__)[-1]
        raise PapertrainError(
            f"{where}: {key}: building {section.get(COMPONENT_KEY)} failed: {type(err).__name__}: {err} "
            f"(raised at {Path(frame.filename).name}:{frame.lineno})",
            f"check the values under `{key}:`; PAPERTRAIN_DEBUG=1 shows the traceback") from None


def load_config(path: str | Path, overrides: Sequence[str] = (), trust: Sequence[str] = (),
                trusting_file: bool = True) -> LoadedConfig:
    """Load, override, resolve and validate a config; raise one ConfigError listing every problem.

    `trust`: packages trusted from the command line; `trusting_file=False` (a run directory's config)
    ignores the file's own `trust:` key."""
    path = Path(path)
    tree, origins = load_yaml(path)
    issues = apply_overrides(tree, origins, list(overrides))
    for section, key in NAMED_SECTIONS.items():  # `strategy: fsdp2` is short for `strategy: {name: fsdp2}`
        if isinstance(tree.get(section), str):
            tree[section] = {key: tree[section]}
    references: dict[str, list[str]] = {}
    unresolved = resolve_references(tree, origins, references)
    from_file = tree.get("trust") if trusting_file else None
    trusted = [*trust, *(from_file if isinstance(from_file, list) else [])]
    issues += [ConfigIssue(origin_of("trust", origins) or "command line (--trust)", "trust", problem)
               for problem in trust_issues(trusted)]
    policy = ComponentPolicy(tuple(dict.fromkeys(t for t in trusted if isinstance(t, str))))
    validator = Validator(origins, default_where=str(path), policy=policy)
    validator.check(tree, RunConfig, "")
    # a reference that failed to resolve is reported once, not again as "wrong type"
    failed = {issue.key for issue in unresolved}
    issues += unresolved + [i for i in validator.issues if i.key not in failed]
    if not issues:  # what the run needs against what its strategy can do (papertrain/capabilities.py)
        from papertrain.capabilities import run_issues

        issues += run_issues(tree, policy, origins, str(path))
    ignored = [t for t in (tree.get("trust") or []) if t not in trust] if not trusting_file else []
    if issues and ignored:
        issues.append(ConfigIssue(origin_of("trust", origins) or str(path), "trust",
                                  f"ignored: a run directory's config cannot extend trust ({', '.join(map(str, ignored))}); "
                                  f"if you trust it, pass {' '.join('--trust ' + str(t) for t in ignored)}"))
    if issues:
        raise ConfigError(str(path), issues)
    from papertrain.config.defaults import fill_defaults

    defaults = fill_defaults(tree, policy)  # every setting the run will use, written out
    return LoadedConfig(source=path, tree=tree, run=build_dataclass(RunConfig, tree), origins=origins, policy=policy,
                        references=references, defaults=defaults)
