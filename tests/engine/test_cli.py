"""The `papertrain` command end to end, as a user types it (subprocesses, real files)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, SMALL_GPT

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def papertrain(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "papertrain", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd)


def test_help_everywhere() -> None:
    for command in ([], ["ls"], ["run"], ["cp"], ["validate"], ["show"]):
        result = papertrain(*command, "--help")
        assert result.returncode == 0 and "usage: papertrain" in result.stdout, command


def test_ls_lists_every_recipe_with_status(tmp_path: Path) -> None:
    listing = json.loads(papertrain("ls", "--json").stdout)
    names = {row["name"] for row in listing}
    assert {"mha", "blocks", "gpt", "sampling"} <= names
    for row in listing:
        assert row["status"] in ("verified", "failing", "measured", "new") and "tiny" in row["configs"]
    table = papertrain("ls").stdout
    assert table.splitlines()[0].split()[:4] == ["recipe", "family", "paper", "status"]


def test_run_writes_a_run_directory_and_rerun_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["run", "gpt", *SMALL_GPT, "trainer.max_steps=4", "trainer.checkpoint_every=2", "--run-dir", str(run_dir)]
    first = papertrain(*args, "trainer.plot=true")
    assert first.returncode == 0, first.stderr
    assert "done: 4 steps" in first.stdout and "sample:" in first.stdout
    for path in ("config.yaml", "metrics.jsonl", "summary.json", "plots/loss.png", "samples/step_00000004.txt",
                 "checkpoints/step_00000004/model/model-00001-of-00001.safetensors",
                 "checkpoints/step_00000004/optimizer/model-00001-of-00001.safetensors",
                 "checkpoints/step_00000004/train_state.pt", "checkpoints/step_00000004/rng/rank_00000.pt"):
        assert (run_dir / path).is_file(), path
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == 4
    again = papertrain(*args, "trainer.plot=true")
    assert again.returncode == 0 and "already holds a finished run" in again.stdout
    # training longer: settings that follow ${trainer.max_steps} (the schedule's length) follow it
    longer = [a.replace("max_steps=4", "max_steps=6") for a in args] + ["trainer.plot=true"]
    extended = papertrain(*longer)
    assert extended.returncode == 0, extended.stderr
    assert "scheduler.total_steps 4 -> 6" in extended.stdout and "(over 2 segments)" in extended.stdout
    assert "resumed: from" in extended.stdout and "done: 6 steps" in extended.stdout


def test_overrides_may_follow_options(tmp_path: Path) -> None:
    result = papertrain("run", "gpt", "--run-dir", str(tmp_path / "r"), *SMALL_GPT, "trainer.max_steps=1")
    assert result.returncode == 0, result.stderr


def test_copy_edit_and_run_a_config(tmp_path: Path) -> None:
    mine = tmp_path / "my_gpt.yaml"
    assert papertrain("cp", "gpt", str(mine)).returncode == 0
    assert yaml.safe_load(mine.read_text())["name"] == "my_gpt"
    assert papertrain("cp", "gpt", str(mine)).returncode == 2, "never overwrite without --force"
    mine.write_text(mine.read_text().replace("n_layers: 4", "n_layers: 1"))
    shown = yaml.safe_load(papertrain("show", str(mine)).stdout)
    assert shown["model"]["n_layers"] == 1 and shown["model"]["block_size"] == 128
    result = papertrain("run", str(mine), *SMALL_GPT, "trainer.max_steps=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "my_gpt" / "metrics.jsonl").is_file(), "default run dir is runs/<name>"


def test_validate_reports_each_bad_input_once_with_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    papertrain("cp", "gpt", str(bad))
    text = re.sub(r"max_steps: \d+", "max_steps: many", bad.read_text().replace("n_layers: 4", "n_layer: 4"))
    assert "max_steps: many" in text and "n_layer: 4" in text
    bad.write_text(text)
    result = papertrain("validate", str(bad), "data.path=???")
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == f"error: {bad}: 4 config problems"
    assert any(f"{bad}:" in l and "model.n_layer: unknown key" in l and "did you mean 'n_layers'" in l for l in lines)
    assert any("trainer.max_steps: expected an integer, got 'many'" in l for l in lines)
    assert any("data.path: required value not set" in l for l in lines)
    assert "Traceback" not in result.stderr
    assert papertrain("validate", "gpt").stdout.startswith("ok: ")


def test_user_errors_are_messages_not_tracebacks(tmp_path: Path) -> None:
    cases = {
        ("run", "gtp"): "did you mean 'gpt'",
        ("run", "gpt:huge"): "has no config 'huge'",
        ("run", str(tmp_path / "missing.yaml")): "config file not found",
        ("run", "gpt", "data.path=/does/not/exist", "--run-dir", str(tmp_path / "r")): "does not exist",
        ("run", "gpt", "trainer.device=cuda", "--run-dir", str(tmp_path / "r2")): "no CUDA GPU",
        ("run", "gpt", "model.vocab_size=10", *SMALL_GPT, "--run-dir", str(tmp_path / "r3")):
            "set model.vocab_size=65",
        ("run", "gpt", "--record", "trainer.max_steps=1"): "--record",
    }
    for args, expected in cases.items():
        result = papertrain(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    assert not (tmp_path / "r").exists(), "a run that fails before training writes nothing"


def test_python_platform_module_still_works_from_the_repo_root() -> None:
    assert not (REPO / "platform" / "__init__.py").exists()
    result = subprocess.run([sys.executable, "-c", "import platform; print(platform.system())"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() in ("Linux", "Darwin", "Windows")


def test_progress_bar_shows_loss_throughput_and_eta(tmp_path: Path) -> None:
    # later overrides win: these replace SMALL_GPT's trainer.progress=none
    result = papertrain("run", "gpt", *SMALL_GPT, "trainer.progress=bar", "trainer.max_steps=30",
                        "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert "loss=" in result.stderr and "tokens/s=" in result.stderr and "30/30 [" in result.stderr
    assert "<00:00" in result.stderr  # tqdm's ETA at the end
    plain = papertrain("run", "gpt", *SMALL_GPT, "trainer.progress=plain", "trainer.max_steps=4",
                       "trainer.log_every=2", "--run-dir", str(tmp_path / "p"))
    assert "step 4/4 | loss " in plain.stdout and "eta" in plain.stdout
