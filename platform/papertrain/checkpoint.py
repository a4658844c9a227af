"""Checkpoints: written atomically, pruned, found again on resume.

    RUN_DIR/checkpoints/step_00001000/
        model.safetensors     the weights (safetensors: no pickle, loadable by anything)
        train_state.pt        optimizer, scheduler, RNG and data position; loaded with weights_only=True
        meta.json             step, time, world size, strategy

A checkpoint is first written to a hidden temporary folder and then renamed into place. A rename is
atomic, so a kill mid-save leaves at worst a stale temporary folder (removed on the next start) and the
previous checkpoint untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from papertrain.errors import PapertrainError

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TEMPORARY_PREFIX = ".tmp-"


class CheckpointDir:
    def __init__(self, root: Path, keep_last: int):
        self.root = root
        self.keep_last = max(1, keep_last)

    def remove_partial(self) -> list[Path]:
        """Delete temporary folders left by a save that was killed."""
        removed = []
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith(_TEMPORARY_PREFIX):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed

    def all(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, write: Callable[[Path], None], meta: dict[str, Any]) -> Path:
        """Create the checkpoint of `step`: `write(folder)` fills a temporary folder, then it is renamed."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step:08d}"
        temporary = self.root / f"{_TEMPORARY_PREFIX}{final.name}-{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        write(temporary)
        (temporary / "meta.json").write_text(json.dumps({"step": step, "time": time.time(), **meta}, indent=2))
        _fsync_tree(temporary)
        if final.exists():  # the same step saved again (e.g. interrupted right after a resume)
            displaced = self.root / f"{_TEMPORARY_PREFIX}old-{final.name}-{os.getpid()}"
            os.rename(final, displaced)
            os.rename(temporary, final)
            shutil.rmtree(displaced, ignore_errors=True)
        else:
            os.rename(temporary, final)
        self.prune()
        return final

    def prune(self) -> None:
        for _, path in self.all()[:-self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


# --- one process's full state ---------------------------------------------------------------------------

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"


def save_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Weights as safetensors; tied tensors (e.g. GPT's shared embedding) are stored once."""
    save_model(model, str(folder / MODEL_FILE))


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    path = folder / MODEL_FILE
    check_shapes(model, path)
    load_model(model, str(path), strict=True)


def check_shapes(model: torch.nn.Module, path: Path) -> None:
    """Compare the checkpoint's tensors with the model before loading, to say clearly what differs."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(path), framework="pt") as handle:
        stored = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    problems = [f"{k}: checkpoint {stored[k]} vs model {expected[k]}"
                for k in stored if k in expected and stored[k] != expected[k]]
    # safetensors drops tied duplicates, so a key only the model has is fine if its storage is shared
    unexpected = [k for k in stored if k not in expected]
    problems += [f"{k}: in the checkpoint but not in the model" for k in unexpected]
    if problems:
        listed = "\n    ".join(problems[:8]) + (f"\n    ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise PapertrainError(f"checkpoint {path} does not fit the model this config builds:\n    {listed}",
                              "use the config the checkpoint was trained with, or a new --run-dir")


def save_train_state(state: dict[str, Any], folder: Path) -> None:
    torch.save(state, folder / STATE_FILE)


def load_train_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
