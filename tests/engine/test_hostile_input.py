"""Hostile and broken input: a config, a run directory and a checkpoint are data.

Every case below ends in exit status 2 with one message (file, key, fix), prints no traceback, and creates
nothing: not the file a hostile component would have written, not a run directory, not an export.
Damaged checkpoints are set aside and the newest intact one resumes, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import SMALL_GPT, gpt_config_path
from papertrain.cli import main
from papertrain.metrics import read_metrics

ZEN = "Beautiful is better than ugly"


def papertrain(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """`papertrain ARGV` in this process: (exit status, everything it printed)."""
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out + out.err


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# -- 1. `_component_` resolves only inside the allow-list -----------------------------------------------
HOSTILE_COMPONENTS = {
    "os.system": {"data": {"_component_": "os.system", "command": "touch PWNED"}},
    "subprocess, nested": {"model": {"_component_": "papertrain.recipes.finetune.lora.model.LoRAModel", "r": 2,
                                     "alpha": 2, "targets": ["qkv_proj"],
                                     "base": {"_component_": "subprocess.check_call", "args": ["touch", "PWNED"]}}},
    "builtins.exec": {"task": {"_component_": "builtins.exec", "source": "open('PWNED', 'w')"}},
    "shutil.rmtree": {"data": {"_component_": "shutil.rmtree", "path": "."}},
    "importlib": {"data": {"_component_": "importlib.import_module", "name": "this"}},
    "torch.hub.load": {"model": {"_component_": "torch.hub.load", "repo_or_dir": ".", "model": "x"}},
    "torch.load": {"data": {"_component_": "torch.load", "f": "PWNED"}},
    "through a module": {"data": {"_component_": "papertrain.recipes.transformers.gpt.model.torch.load", "f": "x"}},
    "through a stdlib module": {"data": {"_component_": "papertrain.recipes.transformers.gpt.model.math.exp", "x": 1}},
    "the CLI": {"data": {"_component_": "papertrain.cli.main", "argv": ["cp", "gpt", "PWNED.yaml"]}},
    "a private attribute": {"model": {"_component_": "torch.nn.Module.__init__"}},
    "functools.partial": {"data": {"_component_": "functools.partial", "func": "x"}},
    "this (prints on import)": {"data": {"_component_": "this"}},
    "an untrusted package": {"data": {"_component_": "yaml.unsafe_load", "stream": "x"}},
    "trust os": {"trust": ["os"], "data": {"_component_": "os.system", "command": "touch PWNED"}},
    "trust pip": {"trust": ["pip"], "data": {"_component_": "pip.main", "args": ["install", "x"]}},
}


@pytest.mark.parametrize("change", HOSTILE_COMPONENTS.values(), ids=HOSTILE_COMPONENTS.keys())
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_hostile_component_is_refused_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture, change: dict,
                                                             command: str) -> None:
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(gpt_config_path().read_text())
    config.update(change)
    (tmp_path / "hostile.yaml").write_text(yaml.safe_dump(config))
    before = listing(tmp_path)
    extra = ["--run-dir", str(tmp_path / "run")] if command == "run" else []
    status, printed = papertrain(capsys, command, str(tmp_path / "hostile.yaml"), *extra)
    assert status == 2, printed
    assert "not allowed" in printed or "never callable" in printed, printed
    assert "Traceback" not in printed and ZEN not in printed
    assert listing(tmp_path) == before  # no PWNED, no run directory, no copied config


def test_trusting_a_package_lets_its_classes_in(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = yaml.safe_load(gpt_config_path().read_text())
    config["optimizer"] = {"_component_": "conftest.TrustedSGD", "lr": 0.1}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(config))
    status, printed = papertrain(capsys, "validate", str(tmp_path / "mine.yaml"))
    assert status == 2 and "--trust conftest" in printed  # the fix is named
    status, printed = papertrain(capsys, "validate", str(tmp_path / "mine.yaml"), "--trust", "conftest")
    assert status == 0, printed
    config["trust"] = ["conftest"]  # or in the config itself
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(config))
    assert papertrain(capsys, "validate", str(tmp_path / "mine.yaml"))[0] == 0


# -- 2. a run directory and a checkpoint are data --------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    from papertrain.config import load_config
    from papertrain.trainer import Trainer

    os.environ["PAPERTRAIN_OFFLINE"] = "1"
    run_dir = tmp_path_factory.mktemp("trained")
    Trainer(load_config(gpt_config_path(), [*SMALL_GPT, "trainer.max_steps=4", "trainer.checkpoint_every=2",
                                            "scheduler.total_steps=6"]), run_dir).run()
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    (target / ".lock").unlink(missing_ok=True)
    return target


def tamper_config(run_dir: Path, **sections: dict) -> None:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config.update(sections)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("command", ["export", "generate"])
def test_a_run_directory_with_a_hostile_model_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture, trained: Path,
                                                         command: str) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = copy_of(trained, tmp_path)
    tamper_config(run_dir, model={"_component_": "subprocess.check_call", "args": ["touch", "PWNED"]})
    before = listing(tmp_path)
    argv = [command, str(run_dir)] + (["--max-new-tokens", "2"] if command == "generate" else [])
    status, printed = papertrain(capsys, *argv)
    assert status == 2 and "does not validate" in printed and "never callable" in printed, printed
    assert listing(tmp_path) == before and "Traceback" not in printed


def test_a_run_directory_cannot_extend_trust(tmp_path: Path, capsys: pytest.CaptureFixture, trained: Path) -> None:
    run_dir = copy_of(trained, tmp_path)
    tamper_config(run_dir, trust=["conftest"], optimizer={"_component_": "conftest.TrustedSGD", "lr": 0.1})
    status, printed = papertrain(capsys, "export", str(run_dir))
    assert status == 2 and "cannot extend trust" in printed and "--trust conftest" in printed, printed
    assert not (run_dir / "export").exists()
    status, printed = papertrain(capsys, "export", str(run_dir), "--trust", "conftest")
    assert status == 0 and (run_dir / "export" / "config.json").is_file(), printed


META_TAMPERING = {
    "a module to import": {"consolidate": "this", "format": "made-up"},
    "a format of another strategy": {"format": "zero3-reference"},
    "an unknown strategy": {"strategy": "os.system"},
    "a file outside the checkpoint": {"files": {"../../../etc/passwd": 10}},
    "a wrong step": {"step": 3},
    "not JSON": "{not json",
}


@pytest.mark.parametrize("tampering", META_TAMPERING.values(), ids=META_TAMPERING.keys())
def test_meta_json_names_a_format_from_a_fixed_table_never_a_module(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                    trained: Path, tampering) -> None:
    run_dir = copy_of(trained, tmp_path)
    meta_path = run_dir / "checkpoints" / "step_00000004" / "meta.json"
    if isinstance(tampering, str):
        meta_path.write_text(tampering)
    else:
        meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), **tampering}))
    status, printed = papertrain(capsys, "export", str(run_dir))
    assert status == 2 and "is damaged" in printed and "meta.json" in printed, printed
    assert ZEN not in printed and not (run_dir / "export").exists()


# -- 3. every bad value: one message naming the file or command line, the key and a fix -------------------
BAD_VALUES = {
    "trainer.batch_size=0": "trainer.batch_size: must be >= 1",
    "trainer.batch_size=-8": "trainer.batch_size: must be >= 1",
    "trainer.max_steps=0": "trainer.max_steps: must be >= 1",
    "trainer.max_steps=-5": "trainer.max_steps: must be >= 1",
    "optimizer.lr=abc": "optimizer.lr: expected a number",
    "optimizer.lr=nan": "optimizer.lr: expected a number",
    "optimizer.lr=-1": "optimizer.lr: must be >= 0",
    "optimizer.lr=.inf": "optimizer.lr: must be a finite number",
    "trainer.grad_accum_steps=0": "trainer.grad_accum_steps: must be >= 1",
    "trainer.log_every=0": "trainer.log_every: must be >= 1",
    "trainer.eval_batches=0": "trainer.eval_batches: must be >= 1",
    "model.n_heads=3": "model.n_heads: d_model=128 must be divisible by n_heads=3",
    "data.block_size=0": "data.block_size: must be >= 1",
    "model.dropout=1.5": "model.dropout: must be < 1",
}


@pytest.mark.parametrize("override", BAD_VALUES, ids=BAD_VALUES)
def test_validate_catches_every_bad_value_before_any_work(capsys: pytest.CaptureFixture, override: str) -> None:
    status, printed = papertrain(capsys, "validate", "gpt", override)
    assert status == 2 and f"command line ({override}): {BAD_VALUES[override]}" in printed, printed
    assert "Traceback" not in printed


def test_an_error_while_building_names_the_section(tmp_path: Path) -> None:
    from papertrain.config.__init__ import build_section
    from papertrain.errors import PapertrainError

    with pytest.raises(PapertrainError, match=r"here.yaml:3: model: building torch.nn.Linear failed: RuntimeError"):
        build_section({"_component_": "torch.nn.Linear", "in_features": -1, "out_features": 2}, "model", "here.yaml:3")


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01\x02binary\xff" * 100, "is a binary file"),
    (b"caf\xe9 au lait, latin-1 " * 100, "is not UTF-8 text"),
    (b"", "is empty"),
    (None, "is a folder, not a file"),
], ids=["binary", "latin-1", "empty", "folder"])
def test_a_bad_data_path_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture, content, message) -> None:
    path = tmp_path / "corpus"
    path.mkdir() if content is None else path.write_bytes(content)
    status, printed = papertrain(capsys, "run", "gpt", f"data.path={path}", "--run-dir", str(tmp_path / "run"))
    assert status == 2 and str(path) in printed and message in printed, printed
    assert not (tmp_path / "run").exists()


# -- damaged checkpoints: the newest intact one resumes --------------------------------------------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def without_manifest(checkpoint: Path) -> None:
    """As checkpoints were written before they listed their files."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    del meta["files"]
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def pickle_payload(path: Path) -> None:
    """A file that would run `touch PWNED` if unpickled; the manifest updated to match, as an attacker would."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    path.write_bytes(pickle.dumps({"step": 4, "payload": Payload()}))
    checkpoint = next(p for p in path.parents if p.name.startswith("step_"))
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["files"][path.relative_to(checkpoint).as_posix()] = path.stat().st_size
    (checkpoint / "meta.json").write_text(json.dumps(meta))


DAMAGE = {
    "truncated weights": (lambda c: truncate(c / "model" / "model-00001-of-00001.safetensors"),
                          "model/model-00001-of-00001.safetensors"),
    "truncated moments": (lambda c: truncate(c / "optimizer" / "model-00001-of-00001.safetensors"),
                          "242,344 were written"),
    "truncated, in a checkpoint without a manifest": (lambda c: [without_manifest(c), truncate(
        c / "optimizer" / "model-00001-of-00001.safetensors")], "its header describes 242,344 (cut short)"),
    "a pickle in train_state.pt": (lambda c: pickle_payload(c / "train_state.pt"), "holds pickled Python objects"),
    "a pickle in an rng file": (lambda c: pickle_payload(c / "rng" / "rank_00000.pt"), "rng/rank_00000.pt"),
    "bad JSON in meta.json": (lambda c: (c / "meta.json").write_text("{"), "not valid JSON"),
    "an empty folder": (lambda c: [shutil.rmtree(c), c.mkdir()], "meta.json: missing"),
    "a missing rng file": (lambda c: (c / "rng" / "rank_00000.pt").unlink(), "rng/rank_00000.pt: missing"),
}


@pytest.mark.parametrize("damage, reported", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_checkpoint_is_set_aside_and_the_newest_intact_one_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, trained: Path,
        damage, reported: str) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = copy_of(trained, tmp_path)
    damage(run_dir / "checkpoints" / "step_00000004")
    status, printed = papertrain(capsys, "run", str(gpt_config_path()), *SMALL_GPT, "trainer.max_steps=6",
                                 "trainer.checkpoint_every=2", "scheduler.total_steps=6", "--run-dir", str(run_dir))
    assert status == 0, printed
    assert "step_00000004 is damaged" in printed and reported in printed, printed
    assert "resuming from the newest intact checkpoint instead" in printed and "step_00000002" in printed
    assert (run_dir / "checkpoints" / "damaged-step_00000004").is_dir()  # kept for inspection, never resumed
    steps = [e["step"] for e in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in e]
    assert steps == [1, 2, 3, 4, 5, 6] and not (tmp_path / "PWNED").exists()


def test_no_intact_checkpoint_is_a_clear_error_then_a_fresh_start(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                   trained: Path) -> None:
    run_dir = copy_of(trained, tmp_path)
    for step in (2, 4):
        (run_dir / "checkpoints" / f"step_{step:08d}" / "meta.json").write_text("{")
    argv = ["run", str(gpt_config_path()), *SMALL_GPT, "trainer.max_steps=4", "trainer.checkpoint_every=2",
            "scheduler.total_steps=6", "--run-dir", str(run_dir)]
    status, printed = papertrain(capsys, *argv)
    assert status == 2 and "no intact checkpoint is left" in printed and "run the same command again" in printed
    status, printed = papertrain(capsys, *argv)
    assert status == 0 and "done: 4 steps" in printed, printed


def test_invalid_utf8_in_metrics_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture, trained: Path) -> None:
    run_dir = copy_of(trained, tmp_path)
    with open(run_dir / "metrics.jsonl", "ab") as handle:
        handle.write(b"\xff\xfe not a line of JSON \xc3\x28\n")
    status, printed = papertrain(capsys, "run", str(gpt_config_path()), *SMALL_GPT, "trainer.max_steps=6",
                                 "trainer.checkpoint_every=2", "scheduler.total_steps=6", "--run-dir", str(run_dir))
    assert status == 0, printed
    assert [e["step"] for e in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in e] == [1, 2, 3, 4, 5, 6]


def test_a_broken_config_yaml_in_the_run_directory_is_named(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            trained: Path) -> None:
    run_dir = copy_of(trained, tmp_path)
    (run_dir / "config.yaml").write_text("model: [unclosed\n")
    for argv in (["run", str(gpt_config_path()), *SMALL_GPT, "--run-dir", str(run_dir)], ["export", str(run_dir)]):
        status, printed = papertrain(capsys, *argv)
        assert status == 2 and "config.yaml is damaged: not valid YAML" in printed, printed


# -- the disk: read-only, full ----------------------------------------------------------------------------
def mount_tmpfs(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 600 kB tmpfs (room for one checkpoint of the small GPT, ~380 kB, not two), unmounted afterwards."""
    folder = tmp_path / "disk"
    if os.geteuid() != 0 or not mount_tmpfs(folder, "size=600k"):
        pytest.skip("mounting a tmpfs needs root (CI and this machine run as root)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_read_only_run_directory_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "readonly"
    if os.geteuid() != 0 or not mount_tmpfs(folder, "ro,size=1m"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        status, printed = papertrain(capsys, "run", "gpt", *SMALL_GPT, "--run-dir", str(folder / "run"))
        assert status == 2 and "read-only" in printed and "--run-dir" in printed, printed
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_names_the_intact_checkpoint_and_the_rerun_resumes(tmp_path: Path, small_disk: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    argv = ["run", str(gpt_config_path()), *SMALL_GPT, "trainer.max_steps=6", "trainer.checkpoint_every=2",
            "scheduler.total_steps=6", "trainer.keep_last=3", "--run-dir", str(small_disk / "run")]
    status, printed = papertrain(capsys, *argv)
    assert status == 2 and "the disk is full" in printed, printed
    assert "the newest complete checkpoint is step 2" in printed and "Traceback" not in printed
    assert not list((small_disk / "run" / "checkpoints").glob(".tmp-*"))  # the partial folder was freed
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # the user frees space
    status, printed = papertrain(capsys, *argv)
    assert status == 0 and "resumed: from" in printed and "step_00000002" in printed, printed


def test_no_traceback_reaches_the_terminal_from_a_subprocess(tmp_path: Path) -> None:
    """The same refusals from the real command line (one of each kind): exit 2, no traceback."""
    for argv in (["validate", "gpt", "trainer.batch_size=0"], ["validate", "gpt", "data._component_=os.system"],
                 ["export", str(tmp_path)]):
        result = subprocess.run([sys.executable, "-m", "papertrain", *argv], capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr and "error:" in result.stderr, result.stderr
