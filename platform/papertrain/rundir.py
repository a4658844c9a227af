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

from papertrain.errors import PapertrainError

# Keys that may differ between the run on disk and a resuming command: when to log, evaluate, sample
# and save, how long to train, where to show progress, and how the work is spread over processes
# (any `strategy.*`: the same global batch gives the same math on 1 or N ranks). Everything else must match.
RESUMABLE_CHANGES = {
    "run_dir", "trainer.max_steps", "trainer.eval_every", "trainer.eval_batches", "trainer.sample_every",
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


def check_resumable(run_dir: Path, tree: dict[str, Any]) -> None:
    """Refuse to resume a run whose saved config differs from `tree` in keys that change the math."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = flatten(yaml.safe_load(saved_path.read_text()) or {})
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


class RunDirLock:
    """One training job per run directory, held by rank 0 for the job's lifetime (an OS file lock, so
    it is released even when the process is killed).

    Two jobs writing one run directory would corrupt each other's checkpoints. It also catches a launcher
    that started N copies of a job *without* connecting them: each copy believes it is alone, and all
    but the first find the directory taken.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise PapertrainError(
                f"{run_dir} is in use by {holder}",
                "wait for that run, or use another --run-dir. If you started several processes on purpose, "
                "they are not connected to each other: launch them with `papertrain launch --nproc N` "
                "(see the README's launcher section)") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.handle.flush()

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
