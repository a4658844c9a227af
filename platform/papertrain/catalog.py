"""The recipe catalog: every paper folder under `recipes/`, its configs, and its last measured result.

A recipe folder holds `meta.yaml` (title, paper, the goal its tiny config must reach), its configs
(`tiny.yaml`, `paper.yaml`, ...) and, once someone ran `papertrain run <name> --record`, a
`results.json` written by that run. `papertrain ls` shows each recipe's status from those:

    verified   the recorded tiny run met the goal in meta.yaml
    failing    the recorded run missed it
    measured   a recorded run, but no goal to judge it by
    stale      recorded, but the code it ran has changed since (papertrain/codehash.py says which part)
    new        never recorded

Each record is stamped with hashes of the code it ran; `papertrain rerecord --stale` runs the stale ones
again and prints each old figure beside the new one.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from papertrain.errors import PapertrainError, did_you_mean

META_FILE = "meta.yaml"
RESULTS_FILE = "results.json"
DEFAULT_CONFIG = "tiny"


@dataclass(frozen=True)
class Goal:
    metric: str
    at_most: float | None = None
    at_least: float | None = None

    def met_by(self, value: float) -> bool:
        return ((self.at_most is None or value <= self.at_most)
                and (self.at_least is None or value >= self.at_least))

    def describe(self) -> str:
        if self.at_most is not None:
            return f"{self.metric} <= {self.at_most:g}"
        return f"{self.metric} >= {self.at_least:g}"


@dataclass
class Recipe:
    name: str
    family: str
    folder: Path
    title: str
    paper: str
    url: str = ""
    goal: Goal | None = None
    configs: list[str] = field(default_factory=list)

    def config_path(self, config: str = DEFAULT_CONFIG) -> Path:
        if config not in self.configs:
            raise PapertrainError(f"recipe '{self.name}' has no config '{config}'",
                                  f"its configs: {', '.join(self.configs)} (e.g. papertrain run {self.name}:{self.configs[0]})")
        return self.folder / f"{config}.yaml"

    def result(self) -> dict[str, Any] | None:
        path = self.folder / RESULTS_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def stale_parts(self, recipes: dict[str, Recipe] | None = None) -> list[str] | None:
        """The code that changed since the record: [] if none, None if the record has no stamp (or none exists)."""
        from papertrain.codehash import stale_parts

        result = self.result()
        if result is None:
            return None
        return stale_parts(self, result.get("code"), recipes or discover())

    def status(self, recipes: dict[str, Recipe] | None = None) -> str:
        result = self.result()
        if result is None:
            return "new"
        if self.stale_parts(recipes):
            return "stale"
        if self.goal is None:
            return "measured"
        value = result.get("metrics", {}).get(self.goal.metric)
        return "verified" if isinstance(value, (int, float)) and self.goal.met_by(value) else "failing"

    def summary(self) -> str:
        result = self.result()
        if result is None:
            return ""
        metric = self.goal.metric if self.goal else next(iter(result.get("metrics", {})), None)
        value = result.get("metrics", {}).get(metric)
        shown = f"{metric} {value:.4g}" if isinstance(value, (int, float)) else ""
        wall = result.get("wall_s", 0)
        took = f"{wall:.0f} s" if wall < 60 else f"{wall / 60:.1f} min"
        return f"{shown} in {took} ({result.get('date', '?')})"


def recipes_root() -> Path:
    from papertrain.registry import recipes_root as root

    return root()


def discover(root: Path | None = None) -> dict[str, Recipe]:
    """Every folder with a meta.yaml, keyed by its (unique) folder name."""
    root = root or recipes_root()
    found: dict[str, Recipe] = {}
    for meta_path in sorted(root.glob(f"*/*/{META_FILE}")):
        folder = meta_path.parent
        meta = yaml.safe_load(meta_path.read_text()) or {}
        name = folder.name
        if name in found:
            raise RuntimeError(f"two recipes are named '{name}': {found[name].folder} and {folder}")
        goal = meta.get("goal")
        found[name] = Recipe(
            name=name, family=folder.parent.name, folder=folder, title=meta.get("title", name),
            paper=meta.get("paper", ""), url=meta.get("url", ""),
            goal=Goal(**goal) if goal else None,
            configs=sorted(p.stem for p in folder.glob("*.yaml") if p.name != META_FILE))
    return found


def resolve_target(target: str) -> tuple[Path, Recipe | None]:
    """`gpt`, `gpt:paper`, `transformers/gpt` or a path to a YAML file -> (config path, recipe or None)."""
    if target.endswith((".yaml", ".yml")) or os.sep in target and Path(target).is_file():
        path = Path(target)
        if not path.is_file():
            raise PapertrainError(f"config file not found: {path}", "check the path, or `papertrain ls` for recipes")
        return path, None
    name, _, config = target.partition(":")
    name = name.rstrip("/").split("/")[-1]
    recipes = discover()
    if name not in recipes:
        close = did_you_mean(name, recipes)
        hint = f"did you mean '{close}'? " if close else ""
        raise PapertrainError(f"no recipe named '{name}'", f"{hint}`papertrain ls` lists them")
    recipe = recipes[name]
    return recipe.config_path(config or DEFAULT_CONFIG), recipe


def record_result(recipe: Recipe, config: str, run_dir: Path, wall_s: float, metrics: dict[str, Any],
                  steps: int) -> Path:
    """Write the recipe's results.json from a finished run (what `papertrain ls` shows)."""
    import torch

    kept = {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "time"
            and (k.startswith(("val/", "sample/", "train/loss", "throughput/")))}
    record = {
        "recipe": recipe.name, "config": config, "date": time.strftime("%Y-%m-%d"), "steps": steps,
        "wall_s": round(wall_s, 1), "metrics": kept, "run_dir": str(run_dir),
        "machine": {"cpus": os.cpu_count(), "processor": platform.machine(), "torch": torch.__version__,
                    "device": "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
    }
    if recipe.goal is not None and recipe.goal.metric in kept:
        record["goal"] = recipe.goal.describe()
        record["goal_met"] = recipe.goal.met_by(kept[recipe.goal.metric])
    from papertrain.codehash import code_stamp

    record["code"] = code_stamp(recipe, discover())  # what `papertrain ls` checks for staleness
    path = recipe.folder / RESULTS_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
