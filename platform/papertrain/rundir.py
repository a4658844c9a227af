"""The run directory: what a run writes, and whether a second run may resume it.

    RUN_DIR/config.yaml       the resolved config of the run
    RUN_DIR/metrics.jsonl     one JSON event per line (see metrics.py)
    RUN_DIR/tokenizer.json    for language models: how to turn ids back into text
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
import socket
import time
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


def check_resumable(run_dir: Path, tree: dict[str, Any]) -> None:
    """Refuse to resume a run whose saved config differs from `tree` in keys that change the math."""
    saved_config = saved_tree(run_dir)
    if saved_config is None:
        return
    saved = flatten(saved_config)
    new = flatten(tree)
    differing = sorted(k for k in saved.keys() | new.keys()
                       if saved.get(k) != new.get(k) and k not in RESUMABLE_CHANGES
                       and not k.startswith(RESUMABLE_SECTIONS))
    if differing:
        lines = [f"{k}: {saved.get(k, '<unset>')!r} in the run, {new.get(k, '<unset>')!r} now" for k in differing[:10]]
        raise PapertrainError(
            f"{run_dir} holds a run with a different config; resuming it would train something else:\n    "
            + "\n    ".join(lines),
            f"start a new run with --run-dir {run_dir}-2 (or delete {run_dir} to start over)")


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
