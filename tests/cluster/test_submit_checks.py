"""`papertrain submit` without a scheduler: profiles, sweeps, time limits, the sbatch script, errors that
come before anything is submitted, and a real job through submitit's local executor."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from papertrain.cli import main
from papertrain.cluster.profiles import ClusterProfile, load_profile, slurm_minutes
from papertrain.cluster.sweep import grid, split_values
from papertrain.errors import ConfigError, PapertrainError
from conftest import SMALL_GPT


@pytest.fixture(autouse=True)
def _own_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "jobs.jsonl"
    monkeypatch.setenv("PAPERTRAIN_JOBS", str(path))
    monkeypatch.setenv("PAPERTRAIN_CLUSTERS", str(tmp_path / "profiles"))
    return path


@pytest.mark.parametrize("text,minutes", [("90", 90), ("1:30", 2), ("01:00:00", 60), ("4:00:00", 240),
                                          ("2-00:00:00", 2880), ("1-12", 2160), ("0-00:30", 30), (15, 15)])
def test_slurm_time_formats(text: str | int, minutes: int) -> None:
    assert slurm_minutes(text) == minutes


@pytest.mark.parametrize("text", ["soon", "1:2:3:4", "0", "00:00:00"])
def test_bad_time_limits_are_refused(text: str) -> None:
    with pytest.raises(PapertrainError, match="time limit"):
        slurm_minutes(text)


def test_sweep_is_a_grid_with_one_run_dir_per_element() -> None:
    points = grid(["optimizer.lr=1e-3,3e-4", "model.n_layers=4,6", "trainer.max_steps=50"])
    assert [p.overrides for p in points] == [
        ("optimizer.lr=1e-3", "model.n_layers=4", "trainer.max_steps=50"),
        ("optimizer.lr=1e-3", "model.n_layers=6", "trainer.max_steps=50"),
        ("optimizer.lr=3e-4", "model.n_layers=4", "trainer.max_steps=50"),
        ("optimizer.lr=3e-4", "model.n_layers=6", "trainer.max_steps=50")]
    # only the swept keys name the folder; a one-value key is a plain override
    assert [p.label for p in points] == ["lr=1e-3,n_layers=4", "lr=1e-3,n_layers=6", "lr=3e-4,n_layers=4",
                                         "lr=3e-4,n_layers=6"]
    assert split_values("[1,2],[3,4],5") == ["[1,2]", "[3,4]", "5"]
    clash = grid(["model.dropout=0.0,0.1", "data.dropout=0.2,0.3"])
    assert clash[0].label == "model.dropout=0.0,data.dropout=0.2"


@pytest.mark.parametrize("spec,message", [(["lr"], "expected KEY=VALUE1"), (["a.b=1,,2"], "an empty value"),
                                          (["a.b=1,1"], "listed twice"), (["a.b=1,2", "a.b=3"], "lists a.b twice")])
def test_bad_sweeps_are_refused(spec: list[str], message: str) -> None:
    with pytest.raises(PapertrainError, match=message):
        grid(spec)


def test_profiles_load_and_report_every_mistake(tmp_path: Path) -> None:
    shipped = load_profile("localhost")
    assert shipped.partition == "debug" and shipped.source.endswith("localhost.yaml")
    example = load_profile("example")  # the documented one must stay valid
    assert example.gpus_per_node == 8 and example.world_size == 8 and example.sbatch == ["--exclusive"]

    (tmp_path / "profiles").mkdir()
    bad = tmp_path / "profiles" / "mysite.yaml"
    bad.write_text("partition: gpu\ngpu_per_node: 8\nnodes: two\nsetup: [1]\n")
    with pytest.raises(ConfigError) as caught:
        load_profile("mysite")
    text = str(caught.value)
    assert "mysite.yaml:2: gpu_per_node: unknown key; did you mean 'gpus_per_node'?" in text
    assert "mysite.yaml:3: nodes: expected int, got 'two'" in text
    assert "setup: expected a list of strings" in text

    with pytest.raises(PapertrainError, match="unknown cluster profile 'localhots'; did you mean 'localhost'"):
        load_profile("localhots")
    with pytest.raises(PapertrainError, match="profile file not found"):
        load_profile(str(tmp_path / "nowhere.yaml"))


def test_dry_run_prints_the_sbatch_script(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["submit", "gpt", "--cluster", "localhost", "--nodes", "2", "--gpus-per-node", "4", "--time",
                 "4:00:00", "--account", "lab", "--sbatch=--exclusive", "--sbatch=--reservation=big",
                 "--sweep", "optimizer.lr=1e-3,3e-4", "--max-parallel", "1", "strategy=fsdp2",
                 "--run-dir", str(tmp_path / "sweep"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    for line in ["#SBATCH --partition=debug", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --time=240", "#SBATCH --account=lab",
                 "#SBATCH --exclusive", "#SBATCH --reservation=big", "#SBATCH --array=0-1%1",
                 "#SBATCH --signal=USR2@90", "#SBATCH --requeue", "-m submitit.core._submit"]:
        assert line in out, line
    assert f"{tmp_path / 'sweep' / 'lr=1e-3'}   (optimizer.lr=1e-3)" in out
    assert "2 run(s), 8 task(s) each" in out
    assert not (tmp_path / "sweep").exists(), "a dry run writes nothing"


def test_the_job_runs_the_python_of_the_environment_its_setup_activates(tmp_path: Path) -> None:
    import sys

    from papertrain.cluster.submit import interpreter

    example = load_profile("example")  # its setup sources a venv: that venv's python must run, not ours
    assert any("activate" in line for line in example.setup) and interpreter(example) == "python"
    for setup in (["conda activate train"], ["module load python/3.11"], ["source ~/env/bin/activate"]):
        assert interpreter(ClusterProfile(setup=setup)) == "python", setup
    assert interpreter(ClusterProfile(setup=["module load cuda/12.4"])) == sys.executable  # no environment
    assert interpreter(ClusterProfile(setup=["source x/bin/activate"], python="/opt/py/bin/python3")) == "/opt/py/bin/python3"


def submit_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["submit", *args]) == 2
    return capsys.readouterr().err


def test_bad_input_fails_before_anything_is_submitted(capsys: pytest.CaptureFixture[str],
                                                      _own_registry: Path) -> None:
    err = submit_error(capsys, "gpt", "--cluster", "nosuchsite", "--local")
    assert "unknown cluster profile 'nosuchsite'" in err and "fix: write nosuchsite.yaml into" in err
    err = submit_error(capsys, "gpt", "--local", "model.n_layer=3")
    assert "model.n_layer: unknown key" in err and "did you mean 'n_layers'" in err
    err = submit_error(capsys, "gpt", "--local", "--sweep", "trainer.max_steps=10,lots")
    assert "sweep element max_steps=lots" in err and "trainer.max_steps: expected an integer" in err
    err = submit_error(capsys, "gpt", "--local", "--tasks-per-node", "2")
    assert "strategy=single trains one process" in err
    err = submit_error(capsys, "gpt", "--time", "soon", "--dry-run")
    assert "time limit 'soon' is not in Slurm's format" in err
    assert not _own_registry.exists(), "nothing was submitted"


def test_without_slurm_the_error_names_the_alternatives(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    err = submit_error(capsys, "gpt")
    assert "no Slurm on this machine" in err and "--local" in err and "--dry-run" in err


def job_overrides() -> list[str]:
    return [*SMALL_GPT, "trainer.max_steps=6", "trainer.threads=1"]


@pytest.mark.slow
def test_local_job_runs_through_submitit_and_is_listed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--local: the same pickled TrainingJob, signal handling and rendezvous, started by submitit's local
    executor (2 tasks, FSDP2) instead of Slurm."""
    run_dir = tmp_path / "run"
    assert main(["submit", "gpt", "--local", "--wait", "--tasks-per-node", "2", "strategy=fsdp2",
                 *job_overrides(), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "submitted local job" in out and ": COMPLETED" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 6
    assert main(["jobs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[-1]["state"] == "COMPLETED" and listed[-1]["run_dir"] == str(run_dir) and listed[-1]["tasks"] == 2
    assert main(["logs", listed[-1]["job"]]) == 0
    log = capsys.readouterr().out
    assert "fsdp2 on cpu (fp32, 2 ranks)" in log and "task 0 of 2" in log
    assert main(["logs", listed[-1]["job"], "--task", "5"]) == 2
    assert "has tasks 0..1" in capsys.readouterr().err


def test_jobs_and_logs_explain_themselves_when_empty(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["jobs"]) == 0
    assert "no jobs yet" in capsys.readouterr().out
    assert main(["logs", "12345"]) == 2
    assert "no job 12345" in capsys.readouterr().err


def test_profile_defaults_give_one_task() -> None:
    assert ClusterProfile().world_size == 1 and ClusterProfile(gpus_per_node=4, nodes=2).world_size == 8
    assert ClusterProfile(tasks_per_node=3).world_size == 3


def test_without_submitit_the_error_says_what_to_install(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    assert main(["submit", "gpt", "--dry-run"]) == 2
    assert "pip install 'papertrain[cluster]'" in capsys.readouterr().err


@pytest.mark.parametrize("procid,node,localid", [("0", "0", "0"), ("5", "1", "1"), ("7", "1", "3")])
def test_a_two_node_job_gives_every_task_its_rank_and_one_rendezvous(monkeypatch: pytest.MonkeyPatch,
                                                                      procid: str, node: str, localid: str) -> None:
    """What a task of `--nodes 2 --gpus-per-node 4` sees: Slurm's variables become torch.distributed's,
    with the first node as the rendezvous and the same port on every task (one process per GPU)."""
    import submitit

    from papertrain.cluster.job import export_rendezvous
    from papertrain.distributed import process_info, rendezvous_port

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.setenv(key, "")  # recorded, so that what export_rendezvous sets is undone after the test
        monkeypatch.delenv(key)
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "777", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_JOB_NODELIST": "gpu-[012-013]", "SLURM_PROCID": procid, "SLURM_NODEID": node,
             "SLURM_LOCALID": localid}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    export_rendezvous(submitit.JobEnvironment())
    info = process_info()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (int(procid), 8, int(localid), 4)
    assert os.environ["MASTER_ADDR"] == "gpu-012" and os.environ["MASTER_PORT"] == str(rendezvous_port("777"))
    assert rendezvous_port("777_0") != rendezvous_port("777_1"), "array elements on one node must not collide"


def test_a_finished_job_survives_a_late_time_limit_signal(tmp_path: Path) -> None:
    """Slurm's SIGUSR2 can land while a job that has just finished is exiting. Python resets its own
    handlers to 'terminate' at exit, so the job must ignore the signal once training is over (a CI run
    caught sacct reporting such a job FAILED)."""
    import subprocess
    import sys

    script = f"""
import os, signal
from papertrain.catalog import resolve_target
from papertrain.cluster.job import TrainingJob
job = TrainingJob(str(resolve_target("gpt")[0]), {job_overrides()!r}, {str(tmp_path / 'run')!r}, os.getcwd())
assert job()["status"] == "completed"
assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
import atexit
atexit.register(lambda: os.kill(os.getpid(), signal.SIGUSR2))
"""
    env = {**os.environ, "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "1", "SUBMITIT_LOCAL_NTASKS": "1",
           "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "0",
           "SUBMITIT_LOCAL_LOCALID": "0"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
