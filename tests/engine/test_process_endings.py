"""Processes end cleanly: a launched job stops as one process does, and never outlives its launcher.

- Ctrl-C (or SIGTERM) on `papertrain launch`: every rank saves at the same step, exit 130, no traceback,
  and the next run resumes there; under ddp, fsdp2 and deepspeed.
- A second Ctrl-C that lands inside a save (DCP wraps it in its own exception): exit 130, one line saying
  which checkpoint is complete.
- kill -9 of the launcher: the workers get SIGTERM from the kernel, save and exit; nothing trains on.
- The run directory's lock refuses a second run while any rank of the first still lives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SMALL_GPT
from papertrain.errors import PapertrainError
from papertrain.metrics import read_metrics

BIN = Path(sys.executable).parent
LONG = [*SMALL_GPT, "trainer.max_steps=100000", "trainer.log_every=1"]


def logged_steps(run_dir: Path) -> list[int]:
    return [e["step"] for e in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in e]


def wait_for_training(run_dir: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and len(logged_steps(run_dir)) < 3:
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    assert len(logged_steps(run_dir)) >= 3, "training did not start"


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


def launch(run_dir: Path, *strategy: str) -> subprocess.Popen:
    """`papertrain launch --nproc 2` in a session of its own, as a terminal would start it."""
    return subprocess.Popen([str(BIN / "papertrain"), "launch", "--nproc", "2", "gpt", *strategy, *LONG,
                             "--run-dir", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"},
                            start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [["strategy=ddp"], ["strategy=fsdp2"], ["strategy=deepspeed", "strategy.stage=2"]],
                         ids=["ddp", "fsdp2", "deepspeed"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_launch_saves_every_rank_and_exits_130(tmp_path: Path, strategy: list[str], signum: int) -> None:
    if "strategy=deepspeed" in strategy:
        pytest.importorskip("deepspeed")
    job = launch(tmp_path, *strategy)
    wait_for_training(tmp_path, job)
    job.send_signal(signum)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert "checkpoint saved" in err and err.count("interrupted at step") == 1, err[-2000:]
    stopped = checkpoints(tmp_path)[-1]
    assert stopped == logged_steps(tmp_path)[-1]  # every rank stopped at the step the checkpoint holds


@pytest.mark.slow
def test_kill_9_of_the_launcher_stops_its_workers_with_a_checkpoint(tmp_path: Path) -> None:
    job = launch(tmp_path, "strategy=ddp")
    wait_for_training(tmp_path, job)
    workers = children(job.pid)
    assert len(workers) == 2
    os.killpg(os.getpgid(job.pid), signal.SIGKILL)  # the launcher's whole process group, as `kill -9 -PGID`
    job.wait()
    deadline = time.time() + 120
    while time.time() < deadline and any(alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(alive(w) for w in workers), "workers outlived their launcher"
    assert checkpoints(tmp_path), "the workers saved before exiting"
    resumed = subprocess.run([sys.executable, "-m", "papertrain", "run", "gpt", *SMALL_GPT,
                              f"trainer.max_steps={checkpoints(tmp_path)[-1] + 2}", "scheduler.total_steps=100000",
                              "--run-dir", str(tmp_path)], capture_output=True, text=True)
    assert "resumed: from" in resumed.stdout, resumed.stderr[-2000:]


def test_the_lock_refuses_a_second_run_while_any_rank_of_the_first_lives(tmp_path: Path) -> None:
    """Rank 1 of a job still holds its shared lock (its rank 0 is gone): a new rank 0 is refused."""
    from papertrain.rundir import RunDirLock

    (tmp_path / ".lock").write_text("pid 1 on somewhere")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_SH); print('held', flush=True); time.sleep(60)",
                               str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PapertrainError, match="is in use by"):
            RunDirLock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    RunDirLock(tmp_path).release()  # free again once the last rank is gone


def test_a_second_ctrl_c_inside_a_save_is_one_line_and_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    """DCP runs the writer inside its own error handling, which wraps a KeyboardInterrupt in a
    CheckpointException; papertrain turns it back into an interruption that says what is safe."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from papertrain.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    common = ["run", "gpt", *SMALL_GPT, "trainer.checkpoint_every=2", "scheduler.total_steps=4", "--run-dir",
              str(tmp_path)]
    assert main([*common, "trainer.max_steps=2"]) == 0
    monkeypatch.setattr(HuggingFaceStorageWriter, "write_data", interrupted)
    status = main([*common, "trainer.max_steps=4"])
    printed = capsys.readouterr().err
    assert status == 130, printed
    assert "interrupted while writing checkpoint step 4; the newest complete checkpoint is step 2" in printed
    assert "Traceback" not in printed and "CheckpointException" not in printed
    assert checkpoints(tmp_path) == [2] and not list((tmp_path / "checkpoints").glob(".tmp-*"))
