"""Cluster profiles: a site's Slurm settings in one YAML file, chosen with `--cluster NAME`.

    papertrain submit gpt --cluster mysite --time 2:00:00

A profile is looked up as a path (`--cluster ./site.yaml`), then as NAME.yaml in `$PAPERTRAIN_CLUSTERS`
(a folder), in `~/.config/papertrain/clusters/`, and among the profiles shipped in this folder
(`localhost.yaml`, and `example.yaml` with every key explained). Flags on the command line win over the
profile; the profile wins over the defaults below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from papertrain.config.yamlfile import load_yaml, origin_of
from papertrain.errors import ConfigError, ConfigIssue, PapertrainError, did_you_mean

SHIPPED = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ClusterProfile:
    """What `sbatch` needs to know about a job, besides the recipe."""

    partition: str | None = None      # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None     # node features, e.g. "a100|h100"
    nodes: int = 1
    gpus_per_node: int = 0            # one task (process) per GPU; 0 for CPU-only jobs
    tasks_per_node: int = 1           # processes per node when gpus_per_node is 0
    cpus_per_task: int | None = None
    mem: str | None = None            # per node, Slurm syntax: "64G", "500M", "0" (all)
    time: str = "01:00:00"            # Slurm syntax: "MM", "HH:MM:SS", "D-HH:MM"
    sbatch: list[str] = field(default_factory=list)   # extra options, e.g. ["--exclusive", "--reservation=x"]
    setup: list[str] = field(default_factory=list)    # shell lines before the job starts (module load, ...)
    env: dict[str, str] = field(default_factory=dict)  # environment variables of every task
    python: str | None = None         # interpreter on the nodes (default: the one running `submit`)
    signal_delay_s: int = 90          # Slurm sends USR2 this long before the time limit: time to checkpoint
    max_parallel: int | None = None   # array jobs: at most this many elements at once
    max_timeouts: int = 3             # requeues after hitting the time limit before the job gives up
    source: str = "defaults"          # where this profile came from (not a key of the file)

    @property
    def tasks_per_node_effective(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node_effective

    @property
    def time_minutes(self) -> int:
        return slurm_minutes(self.time)


KEYS = {f.name: f for f in fields(ClusterProfile) if f.name != "source"}
_TYPES: dict[str, tuple[type, ...]] = {
    "partition": (str,), "account": (str,), "qos": (str,), "constraint": (str,), "nodes": (int,),
    "gpus_per_node": (int,), "tasks_per_node": (int,), "cpus_per_task": (int,), "mem": (str, int),
    "time": (str, int), "sbatch": (list,), "setup": (list,), "env": (dict,), "python": (str,),
    "signal_delay_s": (int,), "max_parallel": (int,), "max_timeouts": (int,),
}


def slurm_minutes(text: str | int) -> int:
    """Minutes in a Slurm time limit: "90", "1:30:00", "2-00:00:00", "2-12" (days-hours)..."""
    if isinstance(text, int):
        return text
    raw = str(text).strip()
    try:
        days, _, rest = raw.rpartition("-")
        day_minutes = int(days) * 24 * 60 if days else 0
        parts = [int(p) for p in rest.split(":")]
        if days:  # D-HH, D-HH:MM, D-HH:MM:SS
            hours, minutes, seconds = (parts + [0, 0])[:3]
        elif len(parts) == 1:  # MM
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:  # MM:SS
            hours, minutes, seconds = 0, parts[0], parts[1]
        elif len(parts) == 3:  # HH:MM:SS
            hours, minutes, seconds = parts
        else:
            raise ValueError(raw)
    except ValueError:
        raise PapertrainError(f"time limit {raw!r} is not in Slurm's format",
                              "write MINUTES, HH:MM:SS or DAYS-HH:MM:SS, e.g. --time 4:00:00") from None
    total = day_minutes + hours * 60 + minutes + (1 if seconds else 0)
    if total < 1:
        raise PapertrainError(f"time limit {raw!r} is under one minute", "give at least --time 1")
    return total


def search_path() -> list[Path]:
    folders = []
    if os.environ.get("PAPERTRAIN_CLUSTERS"):
        folders.append(Path(os.environ["PAPERTRAIN_CLUSTERS"]))
    folders.append(Path.home() / ".config" / "papertrain" / "clusters")
    folders.append(SHIPPED)
    return folders


def available_profiles() -> dict[str, Path]:
    """Profile name -> file, the first found along the search path."""
    found: dict[str, Path] = {}
    for folder in search_path():
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            found.setdefault(path.stem, path)
    return found


def find_profile(name: str) -> Path:
    as_path = Path(name).expanduser()
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        if as_path.is_file():
            return as_path
        raise PapertrainError(f"cluster profile file not found: {name}",
                              "check the path, or give a profile name (see `papertrain submit --help`)")
    profiles = available_profiles()
    if name in profiles:
        return profiles[name]
    guess = did_you_mean(name, profiles)
    folders = ", ".join(str(f) for f in search_path())
    raise PapertrainError(
        f"unknown cluster profile {name!r}" + (f"; did you mean {guess!r}?" if guess else "")
        + f" (profiles: {', '.join(sorted(profiles)) or 'none'})",
        f"write {name}.yaml into one of: {folders} (start from `cluster/example.yaml`)")


def load_profile(name: str | None) -> ClusterProfile:
    """The profile `name` (a name or a path), validated; every problem reported at once."""
    if name is None:
        return ClusterProfile()
    path = find_profile(name)
    tree, origins = load_yaml(path)
    issues = []
    values: dict[str, Any] = {}
    for key, value in tree.items():
        where = origin_of(key, origins) or str(path)
        if key not in KEYS:
            guess = did_you_mean(key, KEYS)
            issues.append(ConfigIssue(where, key, "unknown key" + (f"; did you mean {guess!r}?" if guess
                                                                   else f" (keys: {', '.join(KEYS)})")))
            continue
        if value is None:
            continue
        expected = _TYPES[key]
        if isinstance(value, bool) or not isinstance(value, expected):
            names = " or ".join(t.__name__ for t in expected)
            issues.append(ConfigIssue(where, key, f"expected {names}, got {value!r} ({type(value).__name__})"))
            continue
        if key in ("sbatch", "setup") and not all(isinstance(line, str) for line in value):
            issues.append(ConfigIssue(where, key, "expected a list of strings"))
            continue
        values[key] = {k: str(v) for k, v in value.items()} if key == "env" else value
    if issues:
        raise ConfigError(str(path), issues)
    profile = replace(ClusterProfile(), source=str(path), **values)
    validate(profile)
    return profile


def validate(profile: ClusterProfile) -> None:
    for key in ("nodes", "tasks_per_node"):
        if getattr(profile, key) < 1:
            raise PapertrainError(f"{key} must be at least 1, got {getattr(profile, key)} ({profile.source})")
    if profile.gpus_per_node < 0:
        raise PapertrainError(f"gpus_per_node must be 0 or more, got {profile.gpus_per_node} ({profile.source})")
    for line in profile.sbatch:
        if not line.startswith("-"):
            raise PapertrainError(f"sbatch option {line!r} ({profile.source}) must start with '-'",
                                  "write options as on sbatch's command line, e.g. --exclusive or --reservation=x")
    slurm_minutes(profile.time)
