"""Real launchers start real processes: papertrain launch, the deepspeed launcher and
accelerate give the same losses as one process; the invocations that do NOT connect processes are
refused before any training."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SMALL_GPT
from papertrain.metrics import read_metrics

FIVE = [*SMALL_GPT, "trainer.max_steps=5"]
BIN = Path(sys.executable).parent


def command(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def losses(run_dir: Path) -> list[float]:
    return [e["train/loss"] for e in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in e]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("one")
    result = command(sys.executable, "-m", "papertrain", "run", "gpt", *FIVE, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    return losses(run_dir)


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) == 5 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5


@pytest.mark.slow
def test_papertrain_launch_runs_two_connected_ranks(tmp_path: Path, reference: list[float]) -> None:
    result = command(str(BIN / "papertrain"), "launch", "--nproc", "2", "gpt", "strategy=fsdp2", *FIVE,
                     "--run-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fsdp2 on cpu (fp32, 2 ranks)" in result.stdout
    assert result.stdout.count("done: 5 steps") == 1, "only rank 0 reports"
    assert close(reference, losses(tmp_path))


@pytest.mark.slow
def test_deepspeed_launcher(tmp_path: Path, reference: list[float]) -> None:
    pytest.importorskip("deepspeed")
    result = command(str(BIN / "deepspeed"), "--num_gpus", "2", "--module", "papertrain.launch", "gpt",
                     "strategy=deepspeed", "strategy.stage=2", "strategy.world_size=2", *FIVE,
                     "--run-dir", str(tmp_path), env={"DS_ACCELERATOR": "cpu"}, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert close(reference, losses(tmp_path))


@pytest.mark.slow
def test_accelerate_multi_gpu_on_cpu_connects_two_processes(tmp_path: Path, reference: list[float]) -> None:
    pytest.importorskip("accelerate")
    result = command(str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "-m",
                     "papertrain.launch", "gpt", "strategy=ddp", "strategy.world_size=2", *FIVE,
                     "--run-dir", str(tmp_path), env={"ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ddp on cpu (fp32, 2 ranks)" in result.stdout
    assert close(reference, losses(tmp_path))


@pytest.mark.slow
def test_accelerate_cpu_mode_runs_one_process_and_is_refused(tmp_path: Path) -> None:
    """`accelerate launch --cpu --num_processes 2` starts ONE process; strategy.world_size catches it."""
    pytest.importorskip("accelerate")
    result = command(str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "2", "-m", "papertrain.launch",
                     "gpt", "strategy=ddp", "strategy.world_size=2", *FIVE, "--run-dir", str(tmp_path))
    assert result.returncode != 0
    assert "strategy.world_size=2, but this process was started as one of 1" in result.stderr
    assert not tmp_path.joinpath("metrics.jsonl").exists()


def test_a_multi_process_strategy_alone_is_refused(tmp_path: Path) -> None:
    result = command(sys.executable, "-m", "papertrain", "run", "gpt", "strategy=fsdp2", *FIVE,
                     "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "this process is alone" in result.stderr and "papertrain launch" in result.stderr
    alone = command(sys.executable, "-m", "papertrain", "run", "gpt", "strategy=fsdp2", "strategy.world_size=1",
                    *FIVE, "--run-dir", str(tmp_path / "one"))
    assert alone.returncode == 0, alone.stderr


def test_launch_checks_the_config_before_starting_processes() -> None:
    result = command(str(BIN / "papertrain"), "launch", "--nproc", "2", "gpt", "model.n_layr=3")
    assert result.returncode == 2 and "did you mean 'n_layers'" in result.stderr
    single = command(str(BIN / "papertrain"), "launch", "--nproc", "2", "gpt")
    assert single.returncode == 2 and "strategy=single trains one process, not 2" in single.stderr


def test_two_unconnected_jobs_cannot_share_a_run_dir(tmp_path: Path) -> None:
    """What N copies of an unconnected job look like from the inside: the second finds the directory held."""
    args = [sys.executable, "-m", "papertrain", "run", "gpt", *SMALL_GPT, "trainer.max_steps=100000",
            "--run-dir", str(tmp_path)]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not losses(tmp_path):
            time.sleep(0.2)
        second = command(*args)
        assert second.returncode == 2
        assert f"{tmp_path} is in use by pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()


def test_deepspeed_launcher_argument_is_ignored() -> None:
    from papertrain.launch.__main__ import strip_launcher_arguments

    assert strip_launcher_arguments(["--local_rank=1", "gpt", "--local-rank", "0", "a=1"]) == ["gpt", "a=1"]
