"""The run directory: what a run writes, and whether a second run may resume it.

    RUN_DIR/config.yaml       the resolved config of the run
    RUN_DIR/metrics.jsonl     one JSON event per line (see metrics.py)
    RUN_DIR/papertrain-tokenizer.json   for language models: how to turn ids back into text
    RUN_DIR/checkpoints/      step_XXXXXXXX folders (see checkpoint.py)
    RUN_DIR/samples/          text and PNG samples, by step
    RUN_DIR/plots/loss.png    loss curves
    RUN_DIR/summary.json      final metrics and wall time
    RUN_DIR/tensorboard/      event files, when tensorboard is installed

Re-running the same command resumes from the last checkpoint. Resuming with a *different* config
would silently train something else, so only settings that do not change the math may differ.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from papertrain.errors import ConfigError, PapertrainError

CONFIG_FILE = "config.yaml"

# Keys that may differ between the run on disk and a resuming command: when to log, evaluate, sample
# and save, how long to train, where to show progress, and how the work is spread over processes
# (any `strategy.*`: the same global batch gives the same math on 1 or N ranks). Everything else must match.
RESUMABLE_CHANGES = {
    "run_dir", "trust", "trainer.max_steps", "trainer.eval_every", "trainer.eval_batches", "trainer.sample_every",
    "trainer.log_every", "trainer.checkpoint_every", "trainer.keep_last", "trainer.progress",
    "trainer.tensorboard", "trainer.plot", "trainer.threads", "trainer.device",
}
RESUMABLE_SECTIONS = ("strategy.",)


def default_run_dir(name: str) -> Path:
    return Path("runs") / name


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def saved_tree(run_dir: Path) -> dict[str, Any] | None:
    """The resolved config a run directory holds (None if it has none); a damaged file is a clear error."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        tree = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PapertrainError(f"{path} is damaged: not valid YAML{where} ({getattr(err, 'problem', None) or err})",
                              f"restore it, or start over: move {run_dir} aside, or train into a new --run-dir") from None
    if not isinstance(tree, dict):
        raise PapertrainError(f"{path} is damaged: it holds a {type(tree).__name__}, not a config",
                              f"restore it, or start over: move {run_dir} aside, or train into a new --run-dir")
    return tree


def load_run_config(run_dir: Path, overrides: list[str] = (), trust: Any = ()) -> Any:
    """A run directory's config.yaml, validated like any config before anything is built from it. It is
    data someone may have handed you, so its own `trust:` key is ignored: only `trust` (--trust) counts."""
    from papertrain.config import load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PapertrainError(f"run directory not found: {run_dir}", "give the folder a `papertrain run` wrote")
    if saved_tree(run_dir) is None:
        raise PapertrainError(f"{run_dir} has no {CONFIG_FILE}, so it is not a run directory",
                              "give the folder a `papertrain run` wrote (it holds config.yaml and checkpoints/)")
    try:
        return load_config(run_dir / CONFIG_FILE, list(overrides), trust=list(trust), trusting_file=False)
    except ConfigError as err:
        raise PapertrainError(f"{run_dir}'s {CONFIG_FILE} does not validate, so nothing is built from it:\n"
                              + err.message.split("\n", 1)[-1],
                              "it was edited or written by another version; use a run directory papertrain wrote "
                              "(or --trust PACKAGE for a package you trust)") from None


class RunConfigChanged(PapertrainError):
    """A run directory holds a run whose config differs from this command's in settings that change the
    math. The CLI adds the commands that do what the user probably meant (papertrain/cli.py)."""

    def __init__(self, run_dir: Path, differing: list[tuple[str, Any, Any]]):
        self.run_dir, self.differing = run_dir, differing
        lines = [f"{key}: {old!r} in the run, {new!r} now" for key, old, new in differing[:10]]
        more = f"\n    ... and {len(differing) - 10} more" if len(differing) > 10 else ""
        super().__init__(f"{run_dir} holds a run with a different config; resuming it would train something "
                         "else:\n    " + "\n    ".join(lines) + more,
                         f"train into a new --run-dir {next_free_run_dir(run_dir)}, or start over here with --restart")


def next_free_run_dir(run_dir: Path) -> Path:
    """runs/gpt -> runs/gpt-2 (or -3, ... whichever does not exist yet)."""
    n = 2
    while Path(f"{run_dir}-{n}").exists():
        n += 1
    return Path(f"{run_dir}-{n}")


@dataclass
class Extension:
    """A resumed run told to train for a different number of steps: what changes with its length."""

    old_max_steps: int
    new_max_steps: int
    following: dict[str, tuple[Any, Any]]  # settings that follow ${trainer.max_steps}: key -> (old, new)

    def describe(self) -> str:
        moved = "; ".join(f"{k} {old} -> {new}" for k, (old, new) in self.following.items())
        return (f"the run's length changes from {self.old_max_steps} to {self.new_max_steps} steps"
                + (f": {moved} (the steps still to come follow the schedule of a run planned for "
                   f"{self.new_max_steps} steps)" if moved else ""))


def check_resumable(run_dir: Path, config: Any) -> Extension | None:
    """Refuse to resume a run whose saved config differs from `config` (a LoadedConfig) in settings that
    change the math; say what changes when the run's length does.

    What may differ: RESUMABLE_CHANGES and `strategy.*`; a setting the saved config lacks and this one
    fills with its default (a run directory written before defaults were saved); and any setting that
    follows `${trainer.max_steps}` in this config and equalled the run's length in the saved one (a
    schedule's total_steps): extending a run stretches its schedule, by the rule in the README."""
    saved_config = saved_tree(run_dir)
    if saved_config is None:
        return None
    saved, new = flatten(saved_config), flatten(config.tree)
    length = "trainer.max_steps"
    following: dict[str, tuple[Any, Any]] = {}
    differing = []
    for key in sorted(saved.keys() | new.keys()):
        old, now = saved.get(key, "<unset>"), new.get(key, "<unset>")
        if old == now or key in RESUMABLE_CHANGES or key.startswith(RESUMABLE_SECTIONS):
            continue
        if key not in saved and key in config.defaults:
            continue
        if length in config.follows(key) and old == saved.get(length) and now == new.get(length):
            following[key] = (old, now)
            continue
        differing.append((key, old, now))
    if differing:
        raise RunConfigChanged(run_dir, differing)
    if saved.get(length) != new.get(length):
        return Extension(saved.get(length), new.get(length), following)
    return None


def check_writable(run_dir: Path) -> None:
    """Refuse, before any work, a run directory that cannot be written (a read-only disk or folder, a
    missing mount). Probes the folder itself if it exists, else its nearest existing parent; creates nothing
    that stays."""
    import errno
    import tempfile

    probe_in = Path(run_dir).absolute()
    while not probe_in.exists():
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise PapertrainError(f"cannot create the run directory {run_dir}: {probe_in} is a file",
                              "choose another --run-dir")
    try:
        with tempfile.NamedTemporaryFile(dir=probe_in, prefix=".papertrain-write-test-"):
            pass
    except OSError as err:
        why = {errno.EROFS: "the disk is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "not permitted", errno.ENOSPC: "the disk is full"}.get(err.errno, err.strerror or str(err))
        target = "write to" if probe_in == Path(run_dir).absolute() else f"create {run_dir} in"
        raise PapertrainError(f"cannot {target} {probe_in}: {why}",
                              "choose a writable --run-dir (or free space / fix the permissions)") from None


class RunDirLock:
    """One training job per run directory, held by every rank of the job for its lifetime (an OS file lock,
    so it is released when a process dies, however it dies).

    Two jobs writing one run directory would corrupt each other's checkpoints. Rank 0 takes the lock
    exclusively, which fails while any process of another job still holds it, then shares it with its own
    ranks: so a second job is refused as long as *any* rank of the first lives (e.g. workers still saving
    after their launcher was killed). It also catches a launcher that started N copies of a job *without*
    connecting them: each copy believes it is alone, and all but the first find the directory taken.
    """

    def __init__(self, run_dir: Path, strategy: Any = None):
        self.path = run_dir / ".lock"
        is_main = strategy is None or strategy.is_main
        if is_main:
            self.handle = open(self.path, "a+")
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.handle.seek(0)
                holder = self.handle.read().strip() or "another process"
                self.handle.close()
                if strategy is not None:
                    strategy.broadcast(False)
                raise PapertrainError(
                    f"{run_dir} is in use by {holder}",
                    "wait for that run, or use another --run-dir. If you started several processes on purpose, "
                    "they are not connected to each other: launch them with `papertrain launch --nproc N` "
                    "(see the README's launcher section)") from None
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            self.handle.flush()
            fcntl.flock(self.handle, fcntl.LOCK_SH)  # shared from now on: this job's other ranks join in
            if strategy is not None:
                strategy.broadcast(True)
        else:
            if not strategy.broadcast(None):
                raise PapertrainError(f"{run_dir} is in use by another job (rank 0 says so)", "see rank 0's message")
            self.handle = open(self.path, "r")
            fcntl.flock(self.handle, fcntl.LOCK_SH)

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "papertrain-tokenizer.json", "tokenizer.json", "checkpoints", "samples", "plots",
             "tensorboard", "eval", "warnings.log")


def clear_run_dir(run_dir: Path) -> int | None:
    """`--restart`: remove what a previous run left in `run_dir`, so that this one starts from step 0.
    Returns the step the removed run had reached (None if there was nothing to remove).

    Only a folder papertrain wrote is cleared (it holds config.yaml), and only while no process of
    another run holds its lock; only papertrain's own files go, anything else the user put there stays."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return None
    if saved_tree(run_dir) is None and not (run_dir / "checkpoints").is_dir():
        if any(run_dir.iterdir()):
            raise PapertrainError(f"--restart: {run_dir} is not a run directory (it has no config.yaml), so "
                                  "nothing in it is removed", "give a run directory papertrain wrote, or another --run-dir")
        return None
    lock = RunDirLock(run_dir)  # refuses while another run lives
    try:
        from papertrain.checkpoint import CheckpointDir

        newest = CheckpointDir(run_dir / "checkpoints", keep_last=1).latest() if (run_dir / "checkpoints").is_dir() else None
        reached = newest[0] if newest is not None else 0
        for name in RUN_FILES:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        for stray in run_dir.glob("damaged-step_*"):
            shutil.rmtree(stray, ignore_errors=True)
        return reached
    finally:
        lock.release()
