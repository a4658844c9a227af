"""A run's life in its directory: extended to more steps, started over, refused with the commands the user
meant, timed over every segment; and the config it saves holds every setting it used, defaults included."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

from conftest import SMALL_GPT, gpt_config_path
from papertrain.cli import main
from papertrain.config import dump_yaml, load_config
from papertrain.metrics import format_count, read_metrics, smooth, window_centres
from papertrain.rundir import check_resumable
from papertrain.trainer import Trainer

QUICK = [*SMALL_GPT, "scheduler.warmup_steps=2", "trainer.checkpoint_every=5"]


def train(run_dir: Path, *overrides: str, restart: bool = False):
    return Trainer(load_config(gpt_config_path(), [*QUICK, *overrides]), run_dir, restart=restart).run()


def rates(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["train/lr"] for e in read_metrics(run_dir / "metrics.jsonl") if "train/lr" in e}


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_training_longer_stretches_the_schedule_to_the_new_length(tmp_path: Path) -> None:
    """The README's rule: extending a run to N steps, the steps still to come follow the schedule of a
    run planned for N steps (total_steps follows ${trainer.max_steps}), recorded in the run's segments."""
    first = train(tmp_path / "run", "trainer.max_steps=10")
    assert first.status == "completed"
    second = train(tmp_path / "run", "trainer.max_steps=20")
    assert second.status == "completed" and second.step == 20 and second.segments == 2
    base = load_config(gpt_config_path()).tree["optimizer"]["lr"]

    def planned(step: int, total: int) -> float:  # WarmupCosine's rate after `step` steps (what is logged)
        t, warmup, r = step, 2, 0.1
        if t < warmup:
            return base * (t + 1) / warmup
        progress = (t - warmup) / (total - warmup)
        return base * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))

    logged = rates(tmp_path / "run")
    assert [logged[s] for s in range(2, 11)] == pytest.approx([planned(s, 10) for s in range(2, 11)], rel=1e-9)
    assert [logged[s] for s in range(11, 21)] == pytest.approx([planned(s, 20) for s in range(11, 21)], rel=1e-9)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    first_segment, second_segment = summary["segments"]
    assert (first_segment["from_step"], first_segment["to_step"], second_segment["to_step"]) == (0, 10, 20)
    assert second_segment["extended"] == {"from": 10, "to": 20, "scheduler.total_steps": [10, 20]}
    assert summary["wall_s"] == pytest.approx(first_segment["wall_s"] + second_segment["wall_s"], abs=0.2)
    assert summary["wall_s"] > second_segment["wall_s"]  # the whole run's time, not the last segment's
    # the config on disk now says 20 everywhere, so the same command resumes (nothing to do) without question
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["scheduler"]["total_steps"] == saved["trainer"]["max_steps"] == 20
    assert train(tmp_path / "run", "trainer.max_steps=20").status == "already complete"


def test_a_schedule_set_apart_from_the_length_is_not_stretched(tmp_path: Path) -> None:
    """Only settings that follow ${trainer.max_steps} move with it: a fixed total_steps is a real change."""
    train(tmp_path / "run", "trainer.max_steps=6", "scheduler.total_steps=6")
    code, _, err = cli("run", "gpt", *QUICK, "trainer.max_steps=8", "scheduler.total_steps=8", "--run-dir",
                       str(tmp_path / "run"))
    assert code == 2 and "scheduler.total_steps: 6 in the run, 8 now" in err


def test_a_changed_config_is_refused_with_the_commands_the_user_may_have_meant(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert cli("run", "gpt", *QUICK, "trainer.max_steps=4", "--run-dir", str(run_dir))[0] == 0
    code, _, err = cli("run", "gpt", *QUICK, "trainer.max_steps=4", "model.n_layers=3", "--run-dir", str(run_dir))
    assert code == 2 and "model.n_layers: 2 in the run, 3 now" in err and "Traceback" not in err
    assert f"model.n_layers=3 --run-dir {run_dir}-2" in err  # a new run beside it
    assert f"model.n_layers=3 --run-dir {run_dir} --restart" in err  # start over here
    assert "to resume the run on disk as it was:" in err and err.rstrip().endswith(f"model.n_layers=2 --run-dir {run_dir}")
    resumed = err.rstrip().rsplit("as it was:", 1)[1].split()[3:]  # the command it offers, without `papertrain run gpt`
    code, out, _ = cli("run", "gpt", *resumed)
    assert code == 0 and "already holds a finished run" in out and "to train it longer:" in out


def test_restart_starts_over_and_keeps_what_is_not_papertrains(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(run_dir, "trainer.max_steps=6")
    (run_dir / "notes.txt").write_text("mine")
    code, out, _ = cli("run", "gpt", *QUICK, "trainer.max_steps=4", "model.n_layers=1", "--run-dir", str(run_dir),
                       "--restart")
    assert code == 0 and "removed the previous run" in out and "reached step 6" in out and "done: 4 steps" in out
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000004"]
    assert min(e["step"] for e in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in e) == 1
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["n_layers"] == 1


def test_restart_refuses_a_folder_papertrain_did_not_write(tmp_path: Path) -> None:
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("precious")
    code, _, err = cli("run", "gpt", *QUICK, "trainer.max_steps=2", "--run-dir", str(folder), "--restart")
    assert code == 2 and "not a run directory" in err
    assert [p.name for p in folder.iterdir()] == ["chapter1.tex"]


def test_the_saved_config_holds_every_setting_with_its_origin(tmp_path: Path) -> None:
    config = load_config(gpt_config_path(), ["trainer.max_steps=20"])
    tree = config.tree
    # defaults the YAML leaves unsaid: the engine's and each component's
    assert tree["trainer"]["grad_clip"] == 1.0 and tree["trainer"]["precision"] == "auto"
    assert tree["trainer"]["keep_last"] == 2 and tree["strategy"]["stage"] == 3
    assert tree["scheduler"]["last_epoch"] == -1 and tree["optimizer"]["eps"] == 1e-8
    assert config.origin("strategy.stage") == "default of StrategyConfig.stage"
    assert config.origin("scheduler.last_epoch") == "default of papertrain.schedules.WarmupCosine"
    # a value taken through ${...} is credited to where the referred value was set
    assert config.origin("scheduler.total_steps").endswith("through ${trainer.max_steps} = command line "
                                                           "(trainer.max_steps=20)")
    code, out, _ = cli("show", "gpt", "--origins", "trainer.max_steps=20")
    assert code == 0 and "# default of StrategyConfig.stage" in out
    assert any(line.startswith("scheduler.total_steps") and "command line" in line for line in out.splitlines())
    # what a run writes is that whole tree; read back, it adds nothing and changes nothing
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(tree))
    again = load_config(path)
    assert again.tree == tree and not again.defaults


def test_a_changed_default_is_caught_and_a_config_saved_before_defaults_still_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(run_dir, "trainer.max_steps=4")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    config = load_config(gpt_config_path(), [*QUICK, "trainer.max_steps=4"])
    # the code's default changed since the run: the saved value says what the run used
    saved["trainer"]["grad_clip"] = 0.5
    (run_dir / "config.yaml").write_text(dump_yaml(saved))
    with pytest.raises(Exception, match=r"trainer.grad_clip: 0.5 in the run, 1.0 now"):
        check_resumable(run_dir, config)
    # a run directory written before defaults were saved lacks them: not a difference
    del saved["trainer"]["grad_clip"], saved["optimizer"]["eps"], saved["strategy"]
    (run_dir / "config.yaml").write_text(dump_yaml(saved))
    assert check_resumable(run_dir, config) is None


def test_counts_and_the_smoothed_curve_read_true() -> None:
    assert [format_count(n) for n in (818_048, 30_464, 20_554_568_208, 950, 1_500_000)] == \
        ["818K", "30.5K", "20.6B", "950", "1.5M"]
    falling = [10.0 - 0.01 * i for i in range(600)]  # a straight fall: a centred average has no lag
    assert smooth(falling) == pytest.approx(falling, abs=1e-9)
    # a logged train loss is the mean of the steps since the last line: drawn at that window's middle
    assert window_centres([(10, 4.0), (20, 3.0), (25, 2.5)]) == [(5.5, 4.0), (15.5, 3.0), (23.0, 2.5)]
    noisy = [1.0 + (0.5 if i % 2 else -0.5) for i in range(300)]
    assert max(abs(v - 1.0) for v in smooth(noisy)[20:-20]) < 0.1


def test_other_packages_warnings_go_to_the_run_log_and_ours_to_the_console(tmp_path: Path) -> None:
    import warnings

    import papertrain
    from papertrain.warnlog import ThirdPartyWarnings

    caught = ThirdPartyWarnings(rank=1)
    with warnings.catch_warnings(record=True) as shown:  # `shown`: what reaches the usual handler
        warnings.simplefilter("always")
        caught.install()
        try:
            warnings.warn_explicit("`foo` is deprecated", FutureWarning, "/opt/site-packages/deepspeed/x.py", 7)
            caught.attach(tmp_path)  # what came before the run directory existed is written now
            warnings.warn_explicit("and so is `bar`", FutureWarning, "/opt/site-packages/deepspeed/y.py", 9)
            warnings.warn_explicit("a papertrain notice", UserWarning, str(Path(papertrain.__file__)), 1)
        finally:
            caught.uninstall()
    log = (tmp_path / "warnings.log").read_text()
    assert "[rank 1]" in log and "`foo` is deprecated" in log and "and so is `bar`" in log
    assert "papertrain notice" not in log and [str(w.message) for w in shown] == ["a papertrain notice"]
    assert caught.summary() == f"2 warning(s) from other packages went to {tmp_path / 'warnings.log'}"


def test_a_run_keeps_other_packages_warnings_off_the_console(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from papertrain.data.text import TextCorpus

    describe = TextCorpus.describe

    def noisy(self) -> str:  # as if a dependency warned while the run was being set up
        warnings.warn_explicit("a dependency's FutureWarning", FutureWarning, "/opt/site-packages/dep/mod.py", 3)
        return describe(self)

    monkeypatch.setattr(TextCorpus, "describe", noisy)
    train(tmp_path / "run", "trainer.max_steps=2")
    out, err = capsys.readouterr()
    assert "FutureWarning" not in out + err and "1 warning(s) from other packages went to" in out
    assert "a dependency's FutureWarning" in (tmp_path / "run" / "warnings.log").read_text()


def test_eval_measures_a_whole_split_the_run_never_trained_on(tmp_path: Path) -> None:
    """`papertrain eval RUN --split test` over all 10,000 MNIST test images equals the accuracy read
    directly off the checkpoint's model; a split the data lacks, or a recipe that evaluates itself, is
    refused with what to do instead."""
    import torch

    from papertrain.data.images import ImageClassification
    from papertrain.export import find_checkpoint, full_weights
    from papertrain.recipes.vision.evidential.model import EvidentialLeNet

    run_dir = tmp_path / "mnist"
    small = ["trainer.max_steps=6", "trainer.progress=none", "trainer.tensorboard=false", "trainer.plot=false",
             "trainer.sample_every=-1", "trainer.eval_batches=2", "model.channels=[4,8]", "model.hidden=32"]
    assert cli("run", "evidential", *small, "--run-dir", str(run_dir))[0] == 0
    code, out, _ = cli("eval", str(run_dir), "--batch-size", "1000")
    assert code == 0 and "test/examples 10,000" in out
    written = json.loads((run_dir / "eval" / "test-step_00000006.json").read_text())
    model = EvidentialLeNet(num_classes=10, channels=[4, 8], hidden=32).eval()
    model.load_state_dict(full_weights(find_checkpoint(run_dir, None)))
    test = ImageClassification(dataset="mnist").test.tensors
    images, labels = test["image"], test["label"]
    with torch.no_grad():
        right = sum(int((model(images[i:i + 2000]).argmax(-1) == labels[i:i + 2000]).sum())
                    for i in range(0, 10_000, 2000))
    assert written["test/accuracy"] == pytest.approx(right / 10_000, abs=1e-6)

    code, _, err = cli("eval", str(run_dir), "--split", "dev")
    assert code == 2 and "use one of train, val, test" in err
    train(tmp_path / "lm", "trainer.max_steps=2")
    code, _, err = cli("eval", str(tmp_path / "lm"))
    assert code == 2 and "no test split (it has train, val)" in err and "--split val" in err


def test_a_record_goes_stale_when_the_code_it_ran_changes(tmp_path: Path) -> None:
    """A record is stamped with hashes of its recipe, the recipes it imports (transitively) and the engine:
    an edit to an imported recipe makes it stale by name; an edit to a README does not."""
    from papertrain.catalog import discover
    from papertrain.codehash import code_stamp, imported_recipes, stale_parts

    root = tmp_path / "recipes"
    for name, body in {"base": "WIDTH = 4\n", "mid": "from papertrain.recipes.fam.base.model import WIDTH\n",
                       "top": "import papertrain.recipes.fam.mid.model\n"}.items():
        folder = root / "fam" / name
        folder.mkdir(parents=True)
        (folder / "meta.yaml").write_text(f"title: {name}\n")
        (folder / "model.py").write_text(body)
        (folder / "README.md").write_text("notes\n")
    recipes = discover(root)
    top = recipes["top"]
    assert imported_recipes(top.folder, recipes) == ["base", "mid"]  # base through mid
    stamp = code_stamp(top, recipes)
    assert stale_parts(top, stamp, recipes) == [] and stale_parts(top, None, recipes) is None
    (top.folder / "README.md").write_text("more notes\n")
    assert stale_parts(top, stamp, recipes) == []
    (root / "fam" / "base" / "model.py").write_text("WIDTH = 8\n")
    assert stale_parts(top, stamp, recipes) == ["base"]
    (top.folder / "tiny.yaml").write_text("seed: 1\n")
    assert stale_parts(top, stamp, recipes) == ["recipe", "base"]
    assert stale_parts(top, {**stamp, "engine": "0" * 16}, recipes)[-1] == "engine"
