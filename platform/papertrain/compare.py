"""Train variants of a recipe side by side: one table and one plot of their loss curves.

A recipe that compares things (optimizers, normalization layers, a distilled student against the
same student alone) lists them in the `compare:` section of its meta.yaml:

    compare:
      metric: val/loss                        # the table's column and the plot's right panel
      lower_is_better: true                   # (default: as the recipe's goal says, else true for losses)
      log_scale: false                        # the metric's axes log-log (a solver's exploitability)
      overrides: [trainer.max_steps=600]      # for every variant (optional)
      variants:                               # name -> where its config comes from and what it changes
        Adam: {config: adam}                  #   a recipe (`adam`, `adam:tiny`) or this recipe's config name
        AMSGrad: {config: adam, overrides: [optimizer.amsgrad=true]}
        RAdam: {config: radam}

`papertrain compare RECIPE` trains each variant into RUN_DIR/<variant> with the ordinary trainer (so an
interrupted comparison resumes where it stopped, and a finished variant is not trained again), then
writes RUN_DIR/comparison.{png,md,json}. `--record` copies those three files into the recipe's folder,
where its README shows them (and records the variant that is the recipe's unchanged tiny config, if one is).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from papertrain.catalog import DEFAULT_CONFIG, META_FILE, Recipe, discover, recipes_root, resolve_target
from papertrain.errors import PapertrainError

OUTPUTS = ("comparison.png", "comparison.md", "comparison.json")


@dataclass
class Variant:
    name: str
    config: Path
    overrides: list[str]

    @property
    def folder(self) -> str:
        """A file-system name for the variant: `Adam + Noam` -> `adam-noam`."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "variant"


@dataclass
class Comparison:
    recipe: Recipe
    metric: str
    variants: list[Variant]
    results: list[dict[str, Any]] = field(default_factory=list)
    lower_is_better: bool = True
    log_scale: bool = False


def load_comparison(recipe: Recipe, overrides: list[str], only: list[str] | None = None) -> Comparison:
    """The recipe's `compare:` section as variants with their config files and overrides, checked."""
    from papertrain.config import load_config
    from papertrain.config.yamlfile import load_yaml

    meta_path = recipe.folder / META_FILE
    meta, _ = load_yaml(meta_path)  # (load_yaml reads 3e-3 as a number, as recipe configs do)
    section = meta.get("compare")
    where = f"{meta_path}: compare"
    if not isinstance(section, dict) or not isinstance(section.get("variants"), dict) or not section["variants"]:
        with_compare = sorted(r.name for r in discover().values() if "compare:" in (r.folder / META_FILE).read_text())
        raise PapertrainError(f"recipe '{recipe.name}' has nothing to compare (no compare.variants in {meta_path})",
                              f"recipes with comparisons: {', '.join(with_compare) or 'none'}")
    shared = [str(o) for o in section.get("overrides") or []]
    variants = []
    for name, spec in section["variants"].items():
        spec = spec or {}
        unknown = set(spec) - {"config", "overrides"}
        if unknown:
            raise PapertrainError(f"{where}.variants.{name} has unknown keys {sorted(unknown)}",
                                  "a variant takes `config` (a recipe or config name) and `overrides` (a list)")
        config = str(spec.get("config") or DEFAULT_CONFIG)
        path = recipe.config_path(config) if config in recipe.configs else resolve_target(config)[0]
        variants.append(Variant(str(name), path, [*shared, *[str(o) for o in spec.get("overrides") or []],
                                                  *overrides]))
    if only:
        names = {v.name for v in variants} | {v.folder for v in variants}
        missing = [o for o in only if o not in names]
        if missing:
            raise PapertrainError(f"--only names unknown variants {missing}",
                                  f"variants of {recipe.name}: {', '.join(v.name for v in variants)}")
        variants = [v for v in variants if v.name in only or v.folder in only]
    for variant in variants:  # every config must validate before the first one trains
        load_config(variant.config, variant.overrides)
    metric = str(section.get("metric", "val/loss"))
    lower = section.get("lower_is_better")
    if lower is None:  # the recipe's goal says which way is better; else losses and errors go down
        goal = recipe.goal if recipe.goal is not None and recipe.goal.metric == metric else None
        lower = goal.at_most is not None if goal else ("loss" in metric or "error" in metric)
    return Comparison(recipe, metric, variants, lower_is_better=bool(lower), log_scale=bool(section.get("log_scale")))


def run_comparison(comparison: Comparison, run_dir: Path) -> str:
    """Train every variant in turn; "completed" or "interrupted" (Ctrl-C stops after a checkpoint)."""
    from papertrain.config import load_config
    from papertrain.trainer import Trainer

    for index, variant in enumerate(comparison.variants, 1):
        print(f"[{index}/{len(comparison.variants)}] {variant.name}: {variant.config} "
              f"{' '.join(variant.overrides)}".rstrip(), flush=True)
        result = Trainer(load_config(variant.config, variant.overrides), run_dir / variant.folder).run()
        if result.status == "interrupted":
            return "interrupted"
        comparison.results.append(_summarise(variant, run_dir / variant.folder, comparison.metric))
    return "completed"


def _summarise(variant: Variant, folder: Path, metric: str) -> dict[str, Any]:
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    try:  # a shipped config by its place under recipes/, not by this machine's path
        config = str(variant.config.resolve().relative_to(recipes_root().resolve()))
    except ValueError:
        config = str(variant.config)
    return {"variant": variant.name, "config": config, "overrides": variant.overrides,
            "folder": folder.name, metric: summary.get(metric), "train/loss": summary.get("train/loss"),
            "steps": summary.get("step"), "wall_s": summary.get("wall_s")}


def write_outputs(comparison: Comparison, run_dir: Path, title: str) -> list[Path]:
    """comparison.json (every number), comparison.md (the table) and comparison.png (the curves)."""
    metric = comparison.metric
    (run_dir / "comparison.json").write_text(json.dumps({"recipe": comparison.recipe.name, "metric": metric,
                                                         "variants": comparison.results}, indent=2) + "\n")
    values = [r[metric] for r in comparison.results if isinstance(r[metric], (int, float))]
    best = (min if comparison.lower_is_better else max)(values) if values else None
    with_loss = any(isinstance(r["train/loss"], (int, float)) for r in comparison.results)
    header = f"| variant | {metric} |" + (" final train loss |" if with_loss else "") + " steps | wall time |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in comparison.results:
        value = r[metric]
        shown = f"{value:.4g}" if isinstance(value, (int, float)) else "-"
        if value == best:
            shown = f"**{shown}**"
        train = f"{r['train/loss']:.4f}" if isinstance(r["train/loss"], (int, float)) else "-"
        wall = (("-" if not isinstance(r["wall_s"], (int, float)) else f"{r['wall_s']:.0f} s" if r["wall_s"] < 60
                 else f"{r['wall_s'] / 60:.1f} min"))
        lines.append(f"| {r['variant']} | {shown} |" + (f" {train} |" if with_loss else "") + f" {r['steps']} | {wall} |")
    (run_dir / "comparison.md").write_text("\n".join(lines) + "\n")
    _plot(comparison, run_dir, title)
    return [run_dir / name for name in OUTPUTS]


def _plot(comparison: Comparison, run_dir: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from papertrain.metrics import read_metrics, smooth, window_centres

    metric = comparison.metric
    curves = [read_metrics(run_dir / r["folder"] / "metrics.jsonl") for r in comparison.results]
    with_loss = any(isinstance(e.get("train/loss"), (int, float)) for events in curves for e in events)
    if with_loss:
        figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    else:  # a solver: nothing but the metric to show
        figure, right = plt.subplots(figsize=(7.5, 4.5))
        left = None
    for index, (result, events) in enumerate(zip(comparison.results, curves)):
        color = f"C{index % 10}"
        train = [(e["step"], e["train/loss"]) for e in events if isinstance(e.get("train/loss"), (int, float))]
        measured = [(e["step"], e[metric]) for e in events if isinstance(e.get(metric), (int, float))]
        if train and left is not None:
            steps, losses = zip(*window_centres(train))
            left.plot(steps, smooth(losses), color=color, linewidth=1.6, label=result["variant"])
        if measured:
            steps, values = zip(*measured)
            right.plot(steps, values, "o-", color=color, linewidth=1.6, markersize=4, label=result["variant"])
    figure.suptitle(title, fontsize=11)  # above both panels: a long title does not run off the left one
    right.set_title(metric + (" (log-log)" if comparison.log_scale else ""))
    if comparison.log_scale:
        right.set_xscale("log")
        right.set_yscale("log")
    if left is not None:
        left.set_title("training loss (smoothed)")
        left.set_ylabel("loss")
    for axis in (a for a in (left, right) if a is not None):
        axis.set_xlabel("step")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(run_dir / "comparison.png", dpi=110)
    plt.close(figure)


def record(comparison: Comparison, run_dir: Path) -> list[Path]:
    """Copy the comparison's outputs into the recipe folder (what its README links). A variant that is the
    recipe's own tiny config without overrides is exactly `papertrain run NAME`: it becomes results.json."""
    from papertrain.catalog import record_result
    from papertrain.metrics import last_values, read_metrics

    copied = []
    for name in OUTPUTS:
        target = comparison.recipe.folder / name
        shutil.copyfile(run_dir / name, target)
        copied.append(target)
    shipped = comparison.recipe.config_path(DEFAULT_CONFIG).resolve()
    for variant, result in zip(comparison.variants, comparison.results):
        if variant.config.resolve() == shipped and not variant.overrides:
            metrics = last_values(read_metrics(run_dir / variant.folder / "metrics.jsonl"))
            copied.append(record_result(comparison.recipe, DEFAULT_CONFIG, run_dir / variant.folder,
                                        result["wall_s"] or 0.0, metrics, result["steps"] or 0))
            break
    return copied
