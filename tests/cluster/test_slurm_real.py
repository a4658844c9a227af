"""Against a REAL Slurm: munge, MariaDB, slurmdbd, slurmctld and slurmd on localhost
(scripts/slurm-localhost/up.sh), started for these tests and stopped after them.

A single job; a 2-task FSDP2 job whose losses equal one process's; a 2-element sweep as a job array;
a job preempted with submitit's `job._interrupt()` and one that reaches its time limit, each of which
saves, requeues itself and resumes from its checkpoint to the same losses as an uninterrupted run; a task
killed with SIGKILL and a job sent SIGTERM alone, each ending the job with its checkpoints intact and
resuming exactly when submitted again; and bad input refused before anything reaches the queue.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, SMALL_GPT, gpt_config_path
from papertrain.cli import main
from papertrain.config import load_config
from papertrain.metrics import read_metrics
from papertrain.trainer import Trainer

pytestmark = pytest.mark.slow
SCRIPTS = REPO / "scripts" / "slurm-localhost"
STATE = Path(os.environ.get("SLURM_LOCAL_DIR", "/tmp/papertrain-slurm"))


def _running(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """A live one-node Slurm; SLURM_CONF for its clients. Skipped, with the reason printed, only where
    the daemons cannot run here (not root, or no Debian packages)."""
    if os.geteuid() != 0:
        pytest.skip("real-Slurm tests need root (to start munge and the Slurm daemons)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("real-Slurm tests need Debian's slurm packages (no apt-get and no slurmctld here)")
    already = _running(STATE / "slurmctld.pid")
    done = subprocess.run(["bash", str(SCRIPTS / "up.sh")], capture_output=True, text=True, timeout=600)
    if done.returncode == 4:
        pytest.skip(f"Slurm cannot be installed here: {done.stderr.strip().splitlines()[-1]}")
    if done.returncode != 0:
        pytest.fail(f"could not start the localhost Slurm:\n{done.stdout}\n{done.stderr}")
    conf = re.search(r"SLURM_CONF=(\S+)", done.stdout).group(1)
    yield {"SLURM_CONF": conf}
    if not already:
        subprocess.run(["bash", str(SCRIPTS / "down.sh")], capture_output=True, text=True, timeout=120)


@pytest.fixture
def cluster(slurm: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PAPERTRAIN_JOBS", str(tmp_path / "jobs.jsonl"))
    return tmp_path


# a GPT of the recipe's shape with a small batch; one thread per task so that a job's float sums run in
# the same order as the in-process reference (bit-identical where the math is the same)
QUICK = [*SMALL_GPT, "trainer.threads=1", "trainer.log_every=2"]


def submit(*args: str) -> list[str]:
    """`papertrain submit` as a user types it; the job ids it printed."""
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["submit", "gpt", "--cluster", "localhost", *args])
    assert code == 0, out.getvalue()
    return re.search(r"submitted [a-zA-Z ]+ ([0-9_, ]+) \(", out.getvalue()).group(1).replace(" ", "").split(",")


def wait(job_ids: list[str], timeout_s: float = 400) -> dict[str, str]:
    from papertrain.cluster.commands import FINAL_STATES
    from papertrain.cluster.registry import find_job, states

    records = [find_job(j) for j in job_ids]
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        current = states(records)
        if all(s.split()[0] in FINAL_STATES for s in current.values()):
            return current
        time.sleep(2)
    subprocess.run(["scancel", *[j.split("_")[0] for j in job_ids]])
    raise AssertionError(f"jobs {job_ids} did not finish in {timeout_s} s: {states(records)}")


def log_of(job_id: str) -> str:
    from papertrain.cluster.registry import find_job

    return find_job(job_id).log().read_text()


def losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["train/loss"] for e in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in e}


def reference(run_dir: Path, overrides: list[str]) -> dict[int, float]:
    """The same training in this process, uninterrupted, on one rank."""
    Trainer(load_config(gpt_config_path(), overrides), run_dir).run()
    return losses(run_dir)


def test_a_single_job_runs_and_is_listed(cluster: Path, capsys: pytest.CaptureFixture[str]) -> None:
    [job] = submit(*QUICK, "trainer.max_steps=8", "--run-dir", str(cluster / "one"))
    assert wait([job]) == {job: "COMPLETED"}
    assert json.loads((cluster / "one" / "summary.json").read_text())["step"] == 8
    assert losses(cluster / "one") == reference(cluster / "ref", [*QUICK, "trainer.max_steps=8"])
    capsys.readouterr()
    assert main(["jobs"]) == 0
    listing = capsys.readouterr().out
    assert re.search(rf"^{job}\s+COMPLETED\s+gpt", listing, re.M), listing
    assert main(["logs", job]) == 0
    assert f"papertrain: job {job}, task 0 of 1" in capsys.readouterr().out
    # sacct is real accounting (slurmdbd), not a shim
    sacct = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,NTasks,JobName", "-j", job],
                           capture_output=True, text=True, check=True).stdout
    assert sacct.startswith(f"{job}|COMPLETED|") and "papertrain-gpt" in sacct


def test_two_task_fsdp2_job_matches_one_process(cluster: Path) -> None:
    steps = ["trainer.max_steps=6"]
    [job] = submit(*QUICK, *steps, "strategy=fsdp2", "--tasks-per-node", "2", "--run-dir", str(cluster / "fsdp2"))
    assert wait([job]) == {job: "COMPLETED"}, log_of(job)
    assert "fsdp2 on cpu (fp32, 2 ranks)" in log_of(job)
    two, one = losses(cluster / "fsdp2"), reference(cluster / "ref", [*QUICK, *steps])
    assert two.keys() == one.keys() and len(one) == 3
    assert max(abs(two[k] - one[k]) for k in one) <= 1e-5, (two, one)


def test_a_sweep_is_a_job_array(cluster: Path) -> None:
    jobs = submit(*QUICK, "trainer.max_steps=4", "--sweep", "optimizer.lr=1e-3,3e-3", "--max-parallel", "1",
                  "--run-dir", str(cluster / "sweep"))
    assert len(jobs) == 2 and jobs[0].endswith("_0") and jobs[1].endswith("_1")
    assert jobs[0].split("_")[0] == jobs[1].split("_")[0], "one array"
    assert wait(jobs) == {jobs[0]: "COMPLETED", jobs[1]: "COMPLETED"}
    for label, lr in (("lr=1e-3", 1e-3), ("lr=3e-3", 3e-3)):
        config = (cluster / "sweep" / label / "config.yaml").read_text()
        assert f"lr: {lr}" in config
        assert json.loads((cluster / "sweep" / label / "summary.json").read_text())["step"] == 4


def wait_for_step(job: str, step: int, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if any(e.get("step", 0) >= step for e in read_metrics_of(job)):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not reach step {step}: {log_of(job)}")


def read_metrics_of(job: str) -> list[dict]:
    from papertrain.cluster.registry import find_job

    return read_metrics(Path(find_job(job).run_dir) / "metrics.jsonl")


def resumed_step(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"resumed: from \S+ \(step (\d+)\)", log)]


# long enough (~60 s on 2 cores) that Slurm's time-limit signal (checked every ~30 s) lands mid-training
LONG = [*QUICK, "trainer.max_steps=12000", "trainer.log_every=400"]
_uninterrupted: dict[str, dict[int, float]] = {}


def uninterrupted(tmp_path: Path) -> dict[int, float]:
    if "losses" not in _uninterrupted:
        _uninterrupted["losses"] = reference(tmp_path / "uninterrupted", LONG)
    return _uninterrupted["losses"]


def test_preempted_job_requeues_and_resumes_exactly(cluster: Path) -> None:
    import submitit

    [job] = submit(*LONG, "--run-dir", str(cluster / "preempted"))
    wait_for_step(job, 400)
    submitit.SlurmJob(folder=cluster / "preempted" / "slurm", job_id=job)._interrupt()  # SIGTERM, then USR2
    assert wait([job]) == {job: "COMPLETED"}
    log = log_of(job)
    assert "checkpoint saved, requeueing" in log and "requeued 1 time(s)" in log, log
    [step] = resumed_step(log)
    assert 400 <= step < 12000
    assert losses(cluster / "preempted") == uninterrupted(cluster)


def test_time_limit_saves_requeues_and_resumes_exactly(cluster: Path) -> None:
    """--time 1 with USR2 40 s before it: Slurm signals the job ~20 s in, and again after each requeue.
    How many ~20 s allocations the 12,000 steps need depends on the machine's speed (4 or 5 on 2 cores), so
    the profile allows more requeues than the default 3."""
    profile = cluster / "localhost-patient.yaml"
    profile.write_text((REPO / "cluster" / "localhost.yaml").read_text() + "max_timeouts: 10\n")
    [job] = submit(*LONG, "--cluster", str(profile), "--time", "1", "--signal-delay", "40",
                   "--run-dir", str(cluster / "timed"))
    assert wait([job], timeout_s=500) == {job: "COMPLETED"}, log_of(job)
    log = log_of(job)
    assert "this job is timed-out" in log and "requeued 1 time(s)" in log, log
    steps = resumed_step(log)
    assert steps and all(0 < s < 12000 for s in steps) and steps == sorted(steps)
    assert losses(cluster / "timed") == uninterrupted(cluster)


def test_bad_input_never_reaches_the_queue(cluster: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def refused(*args: str) -> str:
        assert main(["submit", "gpt", *args]) == 2
        return capsys.readouterr().err

    err = refused("--partition", "debg")
    assert "partition 'debg' does not exist on this cluster; did you mean 'debug'?" in err
    err = refused("--cluster", "localhost", "trainer.max_stepz=3")
    assert "trainer.max_stepz: unknown key; did you mean 'max_steps'?" in err
    err = refused("--cluster", "no-such-site")
    assert "unknown cluster profile 'no-such-site'" in err
    assert not (cluster / "jobs.jsonl").exists()
    queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True, check=True).stdout
    assert queue.strip() == "", queue


# -- a task killed outright, or sent SIGTERM alone ----------------------------------------------------------
# 2 DDP tasks that checkpoint every 500 steps: long enough (~30 s) to be interrupted mid-run
KILLABLE = [*QUICK, "trainer.max_steps=3000", "trainer.log_every=100", "trainer.checkpoint_every=500",
            "strategy=ddp", "--tasks-per-node", "2"]
_killable_reference: dict[str, dict[int, float]] = {}


def killable_reference(tmp_path: Path) -> dict[int, float]:
    if "losses" not in _killable_reference:
        _killable_reference["losses"] = reference(tmp_path / "ref", [*QUICK, "trainer.max_steps=3000",
                                                                     "trainer.log_every=100"])
    return _killable_reference["losses"]


def error_log_of(job_id: str) -> str:
    from papertrain.cluster.registry import find_job

    return find_job(job_id).log(stream="err").read_text()


def task_pids(job: str, task: int) -> list[int]:
    """The processes of one task of a job's first step (from `scontrol listpids`)."""
    listing = subprocess.run(["scontrol", "listpids", job], capture_output=True, text=True).stdout
    pids = []
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 5 and fields[2] == "0" and fields[4] == str(task):
            pids.append(int(fields[0]))
    return pids


def test_a_task_killed_with_sigkill_ends_the_job_and_a_resubmission_resumes(cluster: Path) -> None:
    """kill -9 of one task: its peer notices in its next collective and the job ends (no 30-minute hang);
    the last checkpoint is intact, and the same command submitted again resumes from it, exactly."""
    run_dir = cluster / "killed"
    [job] = submit(*KILLABLE, "--run-dir", str(run_dir))
    wait_for_step(job, 1100)
    pids = task_pids(job, 1)
    assert pids, subprocess.run(["scontrol", "listpids", job], capture_output=True, text=True).stdout
    for pid in pids:
        os.kill(pid, 9)
    state = wait([job], timeout_s=300)[job]
    assert state.split()[0] in ("FAILED", "CANCELLED", "NODE_FAIL"), (state, log_of(job))
    saved = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert saved and saved[-1] >= 1000
    [again] = submit(*KILLABLE, "--run-dir", str(run_dir))
    assert wait([again]) == {again: "COMPLETED"}, log_of(again)
    assert resumed_step(log_of(again)) == [saved[-1]]
    one = killable_reference(cluster)
    assert max(abs(losses(run_dir)[k] - one[k]) for k in one) <= 1e-5


def test_sigterm_alone_saves_at_that_step_and_a_resubmission_resumes(cluster: Path) -> None:
    """`scancel --signal=TERM` (a cancel, or the first signal of a preempting scheduler): every task stops at
    the same step with a checkpoint and the job ends; the same command submitted again resumes from it."""
    run_dir = cluster / "terminated"
    [job] = submit(*KILLABLE, "trainer.checkpoint_every=0", "--run-dir", str(run_dir))
    wait_for_step(job, 1000)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)  # to the job step's tasks, not the batch shell
    state = wait([job], timeout_s=300)[job]
    errors = error_log_of(job)
    assert state == "COMPLETED" and "SIGTERM: finishing this step" in errors, (state, errors[-3000:])
    [stopped] = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert 1000 <= stopped < 3000 and f"interrupted at step {stopped}" in errors
    [again] = submit(*KILLABLE, "trainer.checkpoint_every=0", "--run-dir", str(run_dir))
    assert wait([again]) == {again: "COMPLETED"}, log_of(again)
    assert resumed_step(log_of(again)) == [stopped]
    one = killable_reference(cluster)
    assert max(abs(losses(run_dir)[k] - one[k]) for k in one) <= 1e-5
