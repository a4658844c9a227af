"""Hyperparameter sweeps: `--sweep optimizer.lr=1e-3,3e-4 model.n_layers=4,6` is a grid of 4 runs.

Each key lists its values separated by commas (commas inside [...] or {...} belong to the value); the
grid is every combination, in the order written, with the last key varying fastest. Every element is
one element of a Slurm job array, with a run directory of its own named after the values it sets.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from papertrain.errors import PapertrainError


@dataclass(frozen=True)
class SweepPoint:
    overrides: tuple[str, ...]  # "key=value" for each swept key
    label: str  # the run directory's name for this point, e.g. "lr=0.001,n_layers=4"


def split_values(text: str) -> list[str]:
    """`1e-3,3e-4` -> ["1e-3", "3e-4"]; `[1,2],[3,4]` -> ["[1,2]", "[3,4]"]."""
    values, depth, current = [], 0, ""
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    return values


def parse_sweep(specs: list[str]) -> list[tuple[str, list[str]]]:
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        if not sep or not key or not text:
            raise PapertrainError(f"--sweep {spec!r}: expected KEY=VALUE1,VALUE2,...",
                                  "e.g. --sweep optimizer.lr=1e-3,3e-4 model.n_layers=4,6")
        values = split_values(text)
        if any(v.strip() == "" for v in values):
            raise PapertrainError(f"--sweep {spec!r}: an empty value", "remove the stray comma")
        if len(set(values)) != len(values):
            raise PapertrainError(f"--sweep {spec!r}: a value is listed twice")
        if key in (k for k, _ in axes):
            raise PapertrainError(f"--sweep lists {key} twice", f"give all its values once: {key}=A,B,C")
        axes.append((key, values))
    return axes


def grid(specs: list[str]) -> list[SweepPoint]:
    """Every combination of the swept values (one point, with no overrides, when nothing is swept)."""
    axes = parse_sweep(specs)
    if not axes:
        return [SweepPoint((), "")]
    varying = [key for key, values in axes if len(values) > 1]
    shorts = _short_names(varying)
    points = []
    for combination in itertools.product(*(values for _, values in axes)):
        overrides = tuple(f"{key}={value}" for (key, _), value in zip(axes, combination))
        label = ",".join(f"{shorts[key]}={_safe(value)}" for (key, _), value in zip(axes, combination)
                         if key in shorts)
        points.append(SweepPoint(overrides, label))
    return points


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last component of each key (`lr`), or more of it where two keys would clash."""
    for depth in range(1, 1 + max((k.count(".") + 1 for k in keys), default=1)):
        names = {key: ".".join(key.split(".")[-depth:]) for key in keys}
        if len(set(names.values())) == len(names):
            return names
    return {key: key for key in keys}


def _safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", value.strip("'\""))
