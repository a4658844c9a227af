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

from pathlib import Path
from typing import Any

import yaml

from papertrain.errors import PapertrainError

# Keys that may differ between the run on disk and a resuming command: when to log, evaluate, sample
# and save, how long to train, where to show progress. Everything else must match.
RESUMABLE_CHANGES = {
    "run_dir", "trainer.max_steps", "trainer.eval_every", "trainer.eval_batches", "trainer.sample_every",
    "trainer.log_every", "trainer.checkpoint_every", "trainer.keep_last", "trainer.progress",
    "trainer.tensorboard", "trainer.plot", "trainer.threads",
}


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
                       if saved.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if differing:
        lines = [f"{k}: {saved.get(k, '<unset>')!r} in the run, {new.get(k, '<unset>')!r} now" for k in differing[:10]]
        raise PapertrainError(
            f"{run_dir} holds a run with a different config; resuming it would train something else:\n    "
            + "\n    ".join(lines),
            f"start a new run with --run-dir {run_dir}-2 (or delete {run_dir} to start over)")
