"""The jobs this user submitted: `papertrain jobs` and `papertrain logs JOB`.

Every submission appends one JSON line per job (or array element) to `$PAPERTRAIN_JOBS` (default
`~/.cache/papertrain/jobs.jsonl`): its id, recipe, run directory and submitit folder. States come live
from Slurm's accounting (`sacct`; `squeue` where a cluster keeps no accounting), and for `--local` jobs
from the process table and the run directory.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from papertrain.errors import PapertrainError, did_you_mean


@dataclass(frozen=True)
class JobRecord:
    job_id: str       # Slurm's id ("123", "123_4" for an array element), or the local controller's pid
    name: str
    executor: str     # "slurm" or "local"
    folder: str       # submitit's folder: the job's pickles and logs
    run_dir: str
    tasks: int
    submitted: float
    label: str = ""   # the sweep element's values, if any
    command: str = ""

    def log(self, task: int = 0, stream: str = "out") -> Path:
        from submitit.core.utils import JobPaths

        paths = JobPaths(self.folder, job_id=self.job_id, task_id=task)
        return paths.stdout if stream == "out" else paths.stderr


def registry_path() -> Path:
    default = Path.home() / ".cache" / "papertrain" / "jobs.jsonl"
    return Path(os.environ.get("PAPERTRAIN_JOBS", default))


def record_jobs(records: list[JobRecord]) -> None:
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        for record in records:
            out.write(json.dumps(asdict(record)) + "\n")


def load_jobs() -> list[JobRecord]:
    path = registry_path()
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(JobRecord(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue  # a line from another version, or a torn write: skip it
    return records


def find_job(job_id: str) -> JobRecord:
    records = {r.job_id: r for r in load_jobs()}
    if job_id in records:
        return records[job_id]
    elements = [r for r in records.values() if r.job_id.split("_")[0] == job_id]
    if len(elements) == 1:
        return elements[0]
    if elements:
        raise PapertrainError(f"job {job_id} is an array of {len(elements)} elements",
                              f"name one: {', '.join(r.job_id for r in elements)}")
    guess = did_you_mean(job_id, records)
    raise PapertrainError(f"no job {job_id} in {registry_path()}" + (f"; did you mean {guess}?" if guess else ""),
                          "`papertrain jobs` lists the jobs submitted from this account")


def states(records: list[JobRecord]) -> dict[str, str]:
    """job id -> state (PENDING, RUNNING, COMPLETED, FAILED, REQUEUED, TIMEOUT, ...)."""
    found: dict[str, str] = {}
    slurm = [r.job_id for r in records if r.executor == "slurm"]
    if slurm:
        found.update(_sacct_states(slurm) or _squeue_states(slurm))
    for record in records:
        if record.executor == "local":
            found[record.job_id] = _local_state(record)
    return {r.job_id: found.get(r.job_id, "UNKNOWN") for r in records}


def _sacct_states(ids: list[str]) -> dict[str, str]:
    try:
        done = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if done.returncode != 0:
        return {}
    found = {}
    for line in done.stdout.splitlines():
        job_id, _, state = line.partition("|")
        found[job_id.strip()] = state.split()[0] if state.strip() else "UNKNOWN"
    # an array that has not started shows as "123_[0-3]": every element is pending
    for job_id in ids:
        if job_id not in found:
            parent = job_id.split("_")[0]
            pending = [v for k, v in found.items() if k.startswith(f"{parent}_[")]
            if pending:
                found[job_id] = pending[0]
    return found


def _squeue_states(ids: list[str]) -> dict[str, str]:
    """Without accounting, only queued and running jobs are known; the rest are reported as ENDED."""
    try:
        done = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if done.returncode != 0:
        return {}
    queued = dict(line.split("|", 1) for line in done.stdout.splitlines() if "|" in line)
    return {job_id: queued.get(job_id, "ENDED (no accounting: see the log)") for job_id in ids}


def _local_state(record: JobRecord) -> str:
    """A local job is its controller process: running while that lives (a zombie has ended)."""
    if _process_alive(int(record.job_id)):
        return "RUNNING"
    return "COMPLETED" if (Path(record.run_dir) / "summary.json").is_file() else "ENDED"


def _process_alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:  # our own child (submitted from this process), now reaped
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1] != "Z"
    except (OSError, IndexError):
        return True
