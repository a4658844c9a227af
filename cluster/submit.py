"""`papertrain submit`: check everything, then hand the job to Slurm through submitit.

    papertrain submit gpt --cluster mysite --nodes 2 --gpus-per-node 8 --time 4:00:00 strategy=fsdp2
    papertrain submit gpt --sweep optimizer.lr=1e-3,3e-4 model.n_layers=4,6 --max-parallel 2
    papertrain submit gpt --dry-run          # print the sbatch script, submit nothing
    papertrain submit gpt --local            # the same job through submitit's local executor

Nothing reaches the scheduler until every config of the job (every sweep element) has validated, the
profile has loaded and the partition exists: a typo costs seconds, not a place in the queue.
The job runs `papertrain.cluster.job.TrainingJob` on each task; see there for ranks and requeueing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from papertrain.cluster.job import TrainingJob
from papertrain.cluster.profiles import ClusterProfile, validate
from papertrain.cluster.registry import JobRecord, record_jobs
from papertrain.cluster.sweep import SweepPoint, grid
from papertrain.errors import PapertrainError, did_you_mean


@dataclass
class Plan:
    """Everything a submission will do, decided and checked before anything is submitted."""

    name: str
    config_path: Path
    overrides: list[str]   # shared by every element
    points: list[SweepPoint]
    run_dirs: list[Path]   # one per point
    folder: Path           # submitit's folder: pickles and logs
    profile: ClusterProfile
    local: bool
    trust: list[str] = field(default_factory=list)

    def job_for(self, index: int) -> TrainingJob:
        return TrainingJob(str(self.config_path), [*self.overrides, *self.points[index].overrides],
                           str(self.run_dirs[index]), os.getcwd(), dict(self.profile.env), list(self.trust))


def apply_flags(profile: ClusterProfile, flags: dict[str, Any]) -> ClusterProfile:
    """Command-line flags (those given) over the profile's values."""
    given = {k: v for k, v in flags.items() if v is not None}
    if "sbatch" in given:
        given["sbatch"] = [*profile.sbatch, *given["sbatch"]]
    combined = replace(profile, **given)
    validate(combined)
    return combined


def make_plan(target: str, overrides: list[str], sweep: list[str], profile: ClusterProfile,
              run_dir: Path | None, local: bool, trust: list[str] = ()) -> Plan:
    """Resolve the recipe, validate the config of every sweep element, and pick the run directories."""
    from papertrain.catalog import resolve_target
    from papertrain.config import load_config
    from papertrain.rundir import default_run_dir

    config_path, _ = resolve_target(target)
    world = profile.world_size
    overrides = list(overrides)
    if not any(o.startswith("strategy.world_size=") for o in overrides):
        overrides.append(f"strategy.world_size={world}")  # each rank checks the job really has them all
    points = grid(sweep)
    configs = []
    for point in points:
        try:
            configs.append(load_config(config_path, [*overrides, *point.overrides], trust=list(trust)))
        except PapertrainError as err:
            if point.label:
                err.message = f"sweep element {point.label}: {err.message}"
            raise
    config = configs[0]
    if world > 1 and config.run.strategy.name == "single":
        raise PapertrainError(f"this job has {world} tasks ({profile.nodes} node(s) x "
                              f"{profile.tasks_per_node_effective}), but strategy=single trains one process",
                              "add strategy=ddp, strategy=fsdp2 or strategy=deepspeed (or ask for one task)")
    name = config.run.name or config.source.stem
    default = Path(config.run.run_dir) if config.run.run_dir else default_run_dir(name)
    if len(points) > 1 and run_dir is None:
        default = default.with_name(default.name + "-sweep")  # one sub-folder per element
    root = (run_dir or default).resolve()
    run_dirs = [root / point.label if point.label else root for point in points]
    return Plan(name, config_path.resolve(), overrides, points, run_dirs, root / "slurm", profile, local, list(trust))


def slurm_parameters(plan: Plan) -> dict[str, Any]:
    """The keyword arguments of submitit's SlurmExecutor (its names for sbatch's options)."""
    p = plan.profile
    params: dict[str, Any] = {
        "job_name": f"papertrain-{plan.name}", "nodes": p.nodes, "ntasks_per_node": p.tasks_per_node_effective,
        "time": p.time_minutes, "signal_delay_s": p.signal_delay_s, "stderr_to_stdout": False,
        "additional_parameters": {"requeue": True, **sbatch_options(p.sbatch)},
    }
    optional = {"partition": p.partition, "account": p.account, "qos": p.qos, "constraint": p.constraint,
                "cpus_per_task": p.cpus_per_task, "mem": str(p.mem) if p.mem is not None else None,
                "gpus_per_node": p.gpus_per_node or None, "setup": list(p.setup) or None,
                "array_parallelism": p.max_parallel}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def sbatch_options(lines: list[str]) -> dict[str, Any]:
    """["--exclusive", "--reservation=big"] -> {"exclusive": True, "reservation": "big"}."""
    options: dict[str, Any] = {}
    for line in lines:
        key, sep, value = line.lstrip("-").partition("=")
        options[key.replace("-", "_")] = value if sep else True
    return options


# a setup line that makes a Python environment the one to run: the job must then run *its* python
_ACTIVATES = re.compile(r"\b(activate|conda|mamba|micromamba|pyenv|virtualenv|venv|module\s+load\s+\S*python)\b", re.I)


def interpreter(profile: ClusterProfile) -> str:
    """The interpreter the job runs: the profile's `python`; else, where `setup` activates an environment
    (a venv, conda, a python module), the `python` that environment puts first on PATH, resolved on the
    node after setup has run; else the interpreter running `papertrain submit` (a shared filesystem)."""
    if profile.python:
        return profile.python
    if any(_ACTIVATES.search(line) for line in profile.setup or []):
        return "python"
    return sys.executable


def sbatch_script(plan: Plan) -> str:
    """The script `sbatch` would receive (what --dry-run prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{interpreter(plan.profile)} -u -m submitit.core._submit {plan.folder}"
    count = len(plan.points) if len(plan.points) > 1 else None
    return _make_sbatch_string(command=command, folder=plan.folder, map_count=count, **slurm_parameters(plan))


# -- checks against the live cluster --------------------------------------------------------------------

def require_slurm() -> None:
    if shutil.which("sbatch") is None:
        raise PapertrainError("no Slurm on this machine (`sbatch` not found)",
                              "run this on a cluster's login node; or --dry-run to see the script, "
                              "or --local to run the same job here without Slurm")


def check_partition(profile: ClusterProfile) -> None:
    """The partition must exist (or, with none given, the cluster must have a default one)."""
    try:
        listed = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PapertrainError(f"cannot ask Slurm for its partitions: {err}",
                              "check that the Slurm controller is reachable (`sinfo`)") from None
    if listed.returncode != 0:
        raise PapertrainError(f"`sinfo` failed: {listed.stderr.strip() or listed.stdout.strip()}",
                              "check that the Slurm controller is reachable (`sinfo`)")
    partitions = [p.strip() for p in listed.stdout.split()]
    names = [p.rstrip("*") for p in partitions]
    if profile.partition is None:
        if not any(p.endswith("*") for p in partitions):
            raise PapertrainError("no --partition given and this cluster has no default partition",
                                  f"add --partition NAME (partitions: {', '.join(names)}) or set partition: "
                                  "in your --cluster profile")
        return
    if profile.partition not in names:
        guess = did_you_mean(profile.partition, names)
        raise PapertrainError(
            f"partition {profile.partition!r} does not exist on this cluster"
            + (f"; did you mean {guess!r}?" if guess else "") + f" (partitions: {', '.join(names)})",
            f"use --partition {guess or names[0]}, or fix partition: in {profile.source}")


# -- submission -----------------------------------------------------------------------------------------

def executor_for(plan: Plan) -> Any:
    import submitit

    plan.folder.mkdir(parents=True, exist_ok=True)
    python = interpreter(plan.profile)
    if plan.local:
        executor = submitit.LocalExecutor(folder=plan.folder, max_num_timeout=plan.profile.max_timeouts,
                                          python=python)
        executor.update_parameters(timeout_min=plan.profile.time_minutes,
                                   tasks_per_node=plan.profile.tasks_per_node_effective,
                                   gpus_per_node=plan.profile.gpus_per_node,
                                   signal_delay_s=plan.profile.signal_delay_s)
        return executor
    executor = submitit.SlurmExecutor(folder=plan.folder, max_num_timeout=plan.profile.max_timeouts, python=python)
    executor.update_parameters(**slurm_parameters(plan))
    return executor


def submit(plan: Plan) -> list[JobRecord]:
    """Submit the plan: one job, or a job array with one element per sweep point. Returns the records."""
    if plan.local and plan.profile.nodes > 1:
        raise PapertrainError("--local runs on this machine only: --nodes must be 1")
    if not plan.local:
        require_slurm()
        check_partition(plan.profile)
    executor = executor_for(plan)
    if len(plan.points) == 1 or plan.local:
        jobs = [executor.submit(plan.job_for(i)) for i in range(len(plan.points))]
    else:
        with executor.batch():
            jobs = [executor.submit(plan.job_for(i)) for i in range(len(plan.points))]
    now = time.time()
    records = [JobRecord(job_id=str(job.job_id), name=plan.name, executor="local" if plan.local else "slurm",
                         folder=str(plan.folder), run_dir=str(run_dir), tasks=plan.profile.world_size,
                         submitted=now, label=point.label,
                         command=" ".join([plan.config_path.name, *plan.overrides, *point.overrides]))
               for job, point, run_dir in zip(jobs, plan.points, plan.run_dirs)]
    record_jobs(records)
    return records
