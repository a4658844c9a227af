"""Recipe configs: YAML -> overrides -> `${}` references -> validation -> a typed `RunConfig`.

    cfg = load_config("recipes/transformers/gpt/tiny.yaml", ["trainer.max_steps=200"])
    cfg.run.trainer.max_steps      # 200, typed
    cfg.tree                       # the resolved plain tree, saved as RUN_DIR/config.yaml

Every problem in the file and on the command line is collected and raised together as one ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from papertrain.config.components import COMPONENT_KEY, instantiate, is_component, locate
from papertrain.config.interpolation import resolve_references
from papertrain.config.overrides import apply_overrides, is_override
from papertrain.config.schema import RunConfig, StrategyConfig, TrainerConfig, build_dataclass
from papertrain.config.validate import Validator
from papertrain.config.yamlfile import Origins, dump_yaml, load_yaml
from papertrain.errors import ConfigError

NAMED_SECTIONS = {"strategy": "name", "quant": "mode", "finetune": "train"}

__all__ = [
    "COMPONENT_KEY", "LoadedConfig", "RunConfig", "StrategyConfig", "TrainerConfig", "dump_yaml", "instantiate",
    "is_component", "is_override", "load_config", "locate",
]


@dataclass
class LoadedConfig:
    source: Path  # the YAML file it came from
    tree: dict[str, Any]  # resolved plain values: what RUN_DIR/config.yaml holds
    run: RunConfig  # the same, typed
    origins: Origins  # dotted key -> where it was set


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> LoadedConfig:
    """Load, override, resolve and validate a config; raise one ConfigError listing every problem."""
    path = Path(path)
    tree, origins = load_yaml(path)
    issues = apply_overrides(tree, origins, list(overrides))
    for section, key in NAMED_SECTIONS.items():  # `strategy: fsdp2` is short for `strategy: {name: fsdp2}`
        if isinstance(tree.get(section), str):
            tree[section] = {key: tree[section]}
    unresolved = resolve_references(tree, origins)
    validator = Validator(origins, default_where=str(path))
    validator.check(tree, RunConfig, "")
    # a reference that failed to resolve is reported once, not again as "wrong type"
    failed = {issue.key for issue in unresolved}
    issues += unresolved + [i for i in validator.issues if i.key not in failed]
    if issues:
        raise ConfigError(str(path), issues)
    return LoadedConfig(source=path, tree=tree, run=build_dataclass(RunConfig, tree), origins=origins)
