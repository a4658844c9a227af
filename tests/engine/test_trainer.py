"""The training loop: exact resume, atomic checkpoints, accumulation, metrics, schedules, interruption."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SMALL_GPT, gpt_config_path
from papertrain.checkpoint import CheckpointDir, load_model_weights, save_model_weights
from papertrain.config import load_config
from papertrain.errors import PapertrainError
from papertrain.metrics import read_metrics
from papertrain.schedules import Noam, WarmupCosine
from papertrain.trainer import Trainer


def train(run_dir: Path, *overrides: str):
    config = load_config(gpt_config_path(), [*SMALL_GPT, *overrides])
    return Trainer(config, run_dir).run()


def losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["train/loss"] for e in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in e}


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    """20 straight steps == 10 steps, a fresh process state, then 10 more (dropout on, so RNG matters)."""
    common = ["model.dropout=0.1", "trainer.checkpoint_every=5", "scheduler.total_steps=20"]  # one schedule
    train(tmp_path / "straight", "trainer.max_steps=20", *common)
    first = train(tmp_path / "resumed", "trainer.max_steps=10", *common)
    assert first.status == "completed" and first.step == 10
    torch.manual_seed(12345)  # disturb the global RNG: the checkpoint must restore it
    second = train(tmp_path / "resumed", "trainer.max_steps=20", *common)
    assert second.status == "completed" and second.step == 20
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 21))
    assert [straight[s] for s in range(1, 21)] == [resumed[s] for s in range(1, 21)]  # exact, not approx
    for part in ("model", "optimizer"):  # the final weights and Adam moments, bit for bit
        straight_state = load_file(tmp_path / f"straight/checkpoints/step_00000020/{part}/model-00001-of-00001.safetensors")
        resumed_state = load_file(tmp_path / f"resumed/checkpoints/step_00000020/{part}/model-00001-of-00001.safetensors")
        assert straight_state.keys() == resumed_state.keys()
        assert all(torch.equal(straight_state[k], resumed_state[k]) for k in straight_state)


def test_a_stop_between_logged_lines_loses_nothing(tmp_path: Path) -> None:
    """A stop (Ctrl-C, a cluster's preemption signal) at step 6 with a line every 4 steps: the line at
    step 8 must still average steps 5-8, so the checkpoint carries the steps since the last line."""
    common = ["model.dropout=0.1", "trainer.log_every=4", "trainer.max_steps=12"]
    train(tmp_path / "straight", *common)
    trainer = Trainer(load_config(gpt_config_path(), [*SMALL_GPT, *common]), tmp_path / "stopped")
    step = trainer.train_step

    def step_then_stop():
        out = step()
        if trainer.step == 6:
            trainer.stop.request("a test's stop")
        return out

    trainer.train_step = step_then_stop
    assert trainer.run().status == "interrupted" and trainer.step == 6
    assert sorted(losses(tmp_path / "stopped")) == [4]
    assert train(tmp_path / "stopped", *common).status == "completed"
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")  # exact, steps 4, 8 and 12


def test_a_finished_run_is_not_trained_again(tmp_path: Path) -> None:
    train(tmp_path / "run", "trainer.max_steps=3")
    again = train(tmp_path / "run", "trainer.max_steps=3")
    assert again.status == "already complete" and again.step == 3


def test_resuming_with_a_different_model_is_refused(tmp_path: Path) -> None:
    train(tmp_path / "run", "trainer.max_steps=2")
    with pytest.raises(PapertrainError, match="model.n_layers: 2 in the run, 3 now") as caught:
        train(tmp_path / "run", "trainer.max_steps=4", "model.n_layers=3")
    assert "--run-dir" in caught.value.hint


def test_kill_during_save_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    folder = CheckpointDir(tmp_path / "checkpoints", keep_last=2)
    folder.save(10, lambda d: save_model_weights(model, d / "weights.safetensors"), {})

    def dies_halfway(directory: Path) -> None:
        (directory / "weights.safetensors").write_bytes(b"half a fi")
        raise KeyboardInterrupt  # the process is killed mid-write

    with pytest.raises(KeyboardInterrupt):
        folder.save(20, dies_halfway, {})
    step, latest = folder.latest()
    assert step == 10
    restored = torch.nn.Linear(3, 2)
    load_model_weights(restored, latest / "weights.safetensors")
    assert torch.equal(restored.weight, model.weight)
    assert folder.remove_partial(), "the half-written folder is found and removed on the next start"
    assert [s for s, _ in folder.all()] == [10]


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    folder = CheckpointDir(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        folder.save(step, lambda d: (d / "x").write_text("x"), {})
    assert [s for s, _ in folder.all()] == [3, 4]


def test_weights_of_another_shape_are_a_clear_error(tmp_path: Path) -> None:
    save_model_weights(torch.nn.Linear(3, 2), tmp_path / "w.safetensors")
    with pytest.raises(PapertrainError, match=r"weight: file \(2, 3\) vs model \(4, 3\)"):
        load_model_weights(torch.nn.Linear(3, 4), tmp_path / "w.safetensors")


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path: Path) -> None:
    train(tmp_path / "run", "trainer.max_steps=2")
    import shutil
    shutil.copy(tmp_path / "run/config.yaml", tmp_path / "saved.yaml")
    # same run dir, different width: refused before loading by the config check; bypass it to reach the loader
    (tmp_path / "run/config.yaml").unlink()
    with pytest.raises(PapertrainError, match="does not fit the model and optimizer this config builds"):
        train(tmp_path / "run", "trainer.max_steps=4", "model.d_model=48")


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    train(tmp_path / "one", "trainer.max_steps=6")
    train(tmp_path / "four", "trainer.max_steps=6", "trainer.grad_accum_steps=4")
    one, four = losses(tmp_path / "one"), losses(tmp_path / "four")
    for step in range(1, 7):
        assert one[step] == pytest.approx(four[step], abs=2e-6)


def test_batch_size_must_split_into_micro_batches(tmp_path: Path) -> None:
    with pytest.raises(PapertrainError, match="must split evenly"):
        train(tmp_path / "x", "trainer.max_steps=2", "trainer.grad_accum_steps=3")


def test_run_directory_holds_metrics_samples_plot_and_summary(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(run, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.sample_every=2",
                   "trainer.plot=true", "trainer.tensorboard=true", "trainer.log_every=2")
    events = read_metrics(run / "metrics.jsonl")
    keys = set().union(*events)
    for key in ("step", "time", "train/loss", "train/lr", "train/grad_norm", "val/loss",
                "throughput/tokens_per_s", "memory/peak_bytes", "memory/params_bytes",
                "memory/grads_bytes", "memory/optimizer_bytes", "sample/text"):
        assert key in keys, key
    assert [e["step"] for e in events if "val/loss" in e] == [0, 2, 4]  # 0: the untrained model, where the curve starts
    assert (run / "samples/step_00000002.txt").is_file() and (run / "samples/step_00000004.txt").is_file()
    assert (run / "plots/loss.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 4 and summary["val/loss"] == result.metrics["val/loss"]
    assert json.loads((run / "papertrain-tokenizer.json").read_text())["type"] == "char"
    # model state bytes: AdamW keeps two moments per parameter
    memory = next(e for e in events if "memory/params_bytes" in e)
    assert memory["memory/optimizer_bytes"] >= 2 * memory["memory/params_bytes"]


def test_non_finite_loss_stops_with_advice(tmp_path: Path) -> None:
    with pytest.raises(PapertrainError, match="training loss became"):
        train(tmp_path / "x", "trainer.max_steps=5", "optimizer.lr=1e12", "trainer.grad_clip=null", "~scheduler")


def test_warmup_cosine_follows_its_formula() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = WarmupCosine(opt, warmup_steps=4, total_steps=12, min_lr_ratio=0.1)
    rates = []
    for _ in range(14):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert rates[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert rates[8] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert rates[12:] == pytest.approx([0.2, 0.2])


def test_noam_is_the_papers_equation_3() -> None:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = Noam(opt, d_model=512, warmup_steps=4000)
    seen = {}
    for t in range(1, 8001):
        seen[t] = opt.param_groups[0]["lr"]
        opt.step()
        schedule.step()
    for step_num in (1, 100, 4000, 8000):
        assert seen[step_num] == pytest.approx(512 ** -0.5 * min(step_num ** -0.5, step_num * 4000 ** -1.5))
    assert max(seen, key=seen.get) == 4000  # the peak is at the end of warmup


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_rerun_finishes_identically(tmp_path: Path) -> None:
    """SIGINT mid-run: the step finishes, a checkpoint is written, exit 130; re-running resumes exactly."""
    args = [sys.executable, "-m", "papertrain", "run", str(gpt_config_path()), *SMALL_GPT,
            "trainer.max_steps=400", "model.dropout=0.1", "trainer.progress=plain"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([*args, "--run-dir", str(interrupted)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(losses(interrupted)) < 30:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "checkpoint saved" in output
    stopped_at = int(CheckpointDir(interrupted / "checkpoints", 2).latest()[0])
    assert 30 <= stopped_at < 400

    finish = subprocess.run([*args, "--run-dir", str(interrupted)], env=env, capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    assert f"resumed: from {interrupted / 'checkpoints' / f'step_{stopped_at:08d}'}" in finish.stdout
    straight = tmp_path / "straight"
    subprocess.run([*args, "--run-dir", str(straight)], env=env, check=True, capture_output=True)
    assert losses(interrupted) == losses(straight)


def test_bf16_and_fp16_autocast_run_on_cpu(tmp_path: Path) -> None:
    """bf16 autocast, and fp16 with its loss scaler (slow on CPU, but the same code path as a GPU's)."""
    from papertrain.distributed import ProcessInfo
    from papertrain.strategies import SingleDevice

    with SingleDevice(ProcessInfo(0, 1, 0, 1, "none"), torch.device("cpu"), "bf16").autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    for precision in ("bf16", "fp16"):
        result = train(tmp_path / precision, "trainer.max_steps=3", f"trainer.precision={precision}")
        assert math.isfinite(result.metrics["train/loss"]) and math.isfinite(result.metrics["val/loss"])
    checkpoint = torch.load(tmp_path / "fp16" / "checkpoints" / "step_00000003" / "train_state.pt", weights_only=True)
    assert "grad_scaler" in checkpoint  # the loss scale is part of the resumable state
