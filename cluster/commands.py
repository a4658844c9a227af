"""The Slurm commands of the CLI: `papertrain submit`, `papertrain jobs`, `papertrain logs`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from papertrain.errors import PapertrainError

# states after which a job will not run again by itself
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "ENDED"}


def add_commands(commands: Any, add_target: Any) -> None:
    submit = commands.add_parser(
        "submit", help="submit a recipe to Slurm (sweeps as job arrays; requeues itself when preempted)",
        description="Validate the config (every sweep element), then submit it through submitit: one task per GPU "
                    "(or --tasks-per-node processes on CPU nodes), torch.distributed set up from Slurm's "
                    "environment. When preempted or near its time limit, the job saves a checkpoint and requeues "
                    "itself, then resumes from it. Flags override the --cluster profile.",
        epilog="examples:\n  papertrain submit gpt --cluster mysite --nodes 2 --gpus-per-node 8 --time 4:00:00 "
               "strategy=fsdp2\n  papertrain submit gpt --sweep optimizer.lr=1e-3,3e-4 model.n_layers=4,6 "
               "--max-parallel 2\n  papertrain submit gpt --dry-run",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target(submit)
    where = submit.add_argument_group("where and how big (override the profile)")
    where.add_argument("--cluster", help="a profile: NAME (cluster/NAME.yaml, ~/.config/papertrain/clusters/) or a path")
    where.add_argument("--partition", help="sbatch --partition")
    where.add_argument("--nodes", type=int, help="nodes (default 1)")
    where.add_argument("--gpus-per-node", type=int, help="GPUs per node; one task (process) per GPU")
    where.add_argument("--tasks-per-node", type=int, help="processes per node on CPU-only nodes")
    where.add_argument("--cpus-per-task", type=int, help="sbatch --cpus-per-task")
    where.add_argument("--mem", help="memory per node, e.g. 64G")
    where.add_argument("--time", help="time limit: MINUTES, HH:MM:SS or DAYS-HH:MM:SS")
    where.add_argument("--account", help="sbatch --account")
    where.add_argument("--qos", help="sbatch --qos")
    where.add_argument("--constraint", help="sbatch --constraint (node features)")
    where.add_argument("--sbatch", action="append", metavar="OPTION",
                       help="any other sbatch option, e.g. --sbatch=--exclusive (repeatable)")
    where.add_argument("--signal-delay", type=int, dest="signal_delay_s", metavar="SECONDS",
                       help="seconds before the time limit at which the job saves and requeues (default 90)")
    what = submit.add_argument_group("what to run")
    what.add_argument("--sweep", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                      help="a grid of runs as one job array, e.g. --sweep optimizer.lr=1e-3,3e-4 model.n_layers=4,6")
    what.add_argument("--max-parallel", type=int, dest="max_parallel", help="array elements running at once")
    what.add_argument("--run-dir", type=Path, help="run directory (sweeps: one sub-folder per element)")
    mode = submit.add_argument_group("mode")
    mode.add_argument("--dry-run", action="store_true", help="print the sbatch script and the runs; submit nothing")
    mode.add_argument("--local", action="store_true", help="run the same job on this machine, without Slurm")
    mode.add_argument("--wait", action="store_true", help="wait until the job(s) end; exit 1 unless all completed")
    submit.set_defaults(handler=cmd_submit)

    jobs = commands.add_parser("jobs", help="the jobs you submitted, with state and log paths",
                               description="Jobs submitted with `papertrain submit` from this account, newest last, "
                                           "with their state from Slurm (sacct/squeue) and their log files.")
    jobs.add_argument("--last", type=int, default=20, help="show the last N (default 20; 0 for all)")
    jobs.add_argument("--json", action="store_true", help="machine-readable output")
    jobs.set_defaults(handler=cmd_jobs)

    logs = commands.add_parser("logs", help="print a job's log",
                               description="Print the output of JOB (an id from `papertrain jobs`; an array "
                                           "element is ID_INDEX).")
    logs.add_argument("job", help="job id")
    logs.add_argument("--task", type=int, default=0, help="which task (rank) of the job (default 0)")
    logs.add_argument("--err", action="store_true", help="standard error instead of standard output")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing as the log grows, until the job ends")
    logs.set_defaults(handler=cmd_logs)


def require_submitit() -> None:
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise PapertrainError("the Slurm commands need submitit, which is not installed",
                              "pip install 'papertrain[cluster]' (or: pip install submitit)") from None


def cmd_submit(args: argparse.Namespace) -> int:
    require_submitit()
    from papertrain.cluster.profiles import load_profile
    from papertrain.cluster.submit import apply_flags, make_plan, sbatch_script, submit

    flags = {k: getattr(args, k) for k in ("partition", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task",
                                          "mem", "time", "account", "qos", "constraint", "sbatch",
                                          "signal_delay_s", "max_parallel")}
    profile = apply_flags(load_profile(args.cluster), flags)
    plan = make_plan(args.target, args.overrides, args.sweep, profile, args.run_dir, args.local, args.trust)
    runs = "\n".join(f"  {run_dir}" + (f"   ({' '.join(point.overrides)})" if point.overrides else "")
                     for point, run_dir in zip(plan.points, plan.run_dirs))
    if args.dry_run:
        if not args.local:
            print(sbatch_script(plan))
        print(f"# {len(plan.points)} run(s), {profile.world_size} task(s) each, config {plan.config_path}:\n{runs}")
        return 0
    records = submit(plan)
    kind = "local job" if args.local else ("job array" if len(records) > 1 else "Slurm job")
    ids = ", ".join(r.job_id for r in records)
    print(f"submitted {kind} {ids} ({profile.world_size} task(s){', ' + profile.source if args.cluster else ''})")
    print(runs)
    print(f"  log:  {records[0].log()}\n  see:  papertrain jobs   |   papertrain logs {records[0].job_id}", flush=True)
    if not args.wait:
        return 0
    return 0 if wait_for([r.job_id for r in records]) else 1


def wait_for(job_ids: list[str], poll_s: float = 3.0) -> bool:
    """Print state changes until every job is in a final state; True if all completed."""
    from papertrain.cluster.registry import find_job, states

    records = [find_job(job_id) for job_id in job_ids]
    seen: dict[str, str] = {}
    while True:
        current = states(records)
        for job_id, state in current.items():
            if seen.get(job_id) != state:
                print(f"{datetime.now():%H:%M:%S}  job {job_id}: {state}", flush=True)
        seen = current
        if all(state.split()[0] in FINAL_STATES for state in current.values()):
            return all(state == "COMPLETED" for state in current.values())
        time.sleep(poll_s)


def cmd_jobs(args: argparse.Namespace) -> int:
    require_submitit()
    from papertrain.cluster.registry import load_jobs, registry_path, states

    records = load_jobs()
    if args.last > 0:
        records = records[-args.last:]
    if not records:
        print(f"no jobs yet (none recorded in {registry_path()}); submit one with `papertrain submit RECIPE`")
        return 0
    current = states(records)
    rows = [{"job": r.job_id, "state": current[r.job_id], "name": r.name + (f" [{r.label}]" if r.label else ""),
             "submitted": datetime.fromtimestamp(r.submitted).strftime("%m-%d %H:%M"), "tasks": r.tasks,
             "run_dir": r.run_dir, "log": str(r.log()), "executor": r.executor} for r in records]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = {"job": "job", "state": "state", "name": "name", "submitted": "submitted", "tasks": "tasks",
              "run_dir": "run dir", "log": "log"}
    columns = list(header)
    widths = {c: max(len(str(row[c])) for row in [header, *rows]) for c in columns}
    for row in [header, *rows]:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    require_submitit()
    from papertrain.cluster.registry import find_job, states

    record = find_job(args.job)
    if not 0 <= args.task < record.tasks:
        raise PapertrainError(f"job {record.job_id} has tasks 0..{record.tasks - 1}, not {args.task}")
    path = record.log(args.task, "err" if args.err else "out")
    if not path.exists() and not args.follow:
        state = states([record])[record.job_id]
        raise PapertrainError(f"no log yet at {path} (job {record.job_id} is {state})",
                              f"a pending job has no log; `papertrain logs {record.job_id} --follow` waits for it")
    position = 0
    while True:
        # the state first: a job seen ended has written its last line, which the read below then prints
        finished = not args.follow or states([record])[record.job_id].split()[0] in FINAL_STATES
        if path.exists():
            with path.open() as log:
                log.seek(position)
                sys.stdout.write(log.read())
                position = log.tell()
            sys.stdout.flush()
        if finished:
            return 0
        time.sleep(1.0)
