"""`papertrain export RUN_DIR`: any checkpoint, consolidated into one safetensors file.

Sharded checkpoints (FSDP2 on N ranks), plain ones (one process, DDP) and DeepSpeed's partitioned
files all become the full weights, in one `model.safetensors`. Where the recipe knows a Hugging Face
layout (its package has an `hf` module with `save_hf_directory(model, folder)`, as GPT does), the
file uses HF's key names and gets a `config.json`, so `AutoModelForCausalLM.from_pretrained(folder)`
loads it.

A run directory is data: its config.yaml is validated like any config (a run directory cannot extend
the components a config may name), its checkpoint is verified, and the format named in meta.json is
looked up in the strategies' fixed table, all before anything is built or written. Nothing is
unpickled on the way.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Sequence

import torch

from papertrain.checkpoint import CheckpointDir, DamagedCheckpoint, verify_checkpoint
from papertrain.errors import PapertrainError


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    checkpoints = CheckpointDir(run_dir / "checkpoints", keep_last=1).all()
    if not checkpoints:
        raise PapertrainError(f"{run_dir} has no checkpoints", "train first: papertrain run ... --run-dir " + str(run_dir))
    if step is None:
        return checkpoints[-1][1]
    for found_step, folder in checkpoints:
        if found_step == step:
            return folder
    raise PapertrainError(f"{run_dir} has no checkpoint of step {step}",
                          f"its checkpoints: {', '.join(str(s) for s, _ in checkpoints)}")


def full_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The complete weights of a checkpoint, whatever wrote it (tied weights under every name)."""
    from papertrain.strategies import checkpoint_formats, strategy_class, strategy_table

    meta = verify_checkpoint(folder, set(checkpoint_formats()))
    if meta["strategy"] not in strategy_table():
        raise DamagedCheckpoint(folder, "meta.json", f"names strategy '{meta['strategy']}', which papertrain does "
                                                     f"not have ({', '.join(strategy_table())})")
    reader = strategy_class(meta["strategy"])
    if reader.checkpoint_format != meta["format"]:
        raise DamagedCheckpoint(folder, "meta.json", f"says format '{meta['format']}', but strategy "
                                                     f"'{meta['strategy']}' writes '{reader.checkpoint_format}'")
    return reader.full_weights(folder)


def export(run_dir: Path, step: int | None = None, out: Path | None = None, layout: str = "auto",
           trust: Sequence[str] = ()) -> tuple[Path, str]:
    """Write the consolidated weights; returns (folder written, layout used: "hf" or "papertrain")."""
    from safetensors.torch import save_file

    from papertrain.rundir import load_run_config

    config = load_run_config(run_dir, trust=trust)  # validated before anything is built
    folder = find_checkpoint(run_dir, step)
    weights = full_weights(folder)
    component = config.tree["model"]["_component_"]
    hf = _hf_module(component) if layout in ("auto", "hf") else None
    if layout == "hf" and hf is None:
        raise PapertrainError(f"{component} has no Hugging Face layout", "use --layout papertrain (our own key names)")
    out = out or run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    if hf is not None:
        with torch.device("meta"):
            model = config.build("model")
        model.load_state_dict(weights, assign=True, strict=True)
        hf.save_hf_directory(model, out)
        _write_tokenizer(run_dir, config, out, getattr(model, "block_size", None))
        layout = "hf"
    else:
        step_of = folder.name.removeprefix("step_").lstrip("0") or "0"
        save_file(_dedupe(weights), str(out / "model.safetensors"), metadata={"format": "pt", "step": step_of})
        layout = "papertrain"
    _as_umask_allows(out)
    return out, layout


def _write_tokenizer(run_dir: Path, config: Any, out: Path, context: int | None) -> None:
    """A language model's tokenizer and sampling settings in HF's format (papertrain/data/hf_tokenizer.py),
    so that AutoTokenizer and `generate` work on the export as on the run."""
    from papertrain.data.hf_tokenizer import write_generation_config, write_hf_tokenizer
    from papertrain.generation import run_tokenizer

    tokenizer = run_tokenizer(run_dir, config)
    if tokenizer is None:
        return
    write_hf_tokenizer(tokenizer, out, context)
    task = config.tree.get("task") or {}
    if "temperature" in task or "sample_tokens" in task:
        write_generation_config(task, out, getattr(tokenizer, "eot_id", None))


def _as_umask_allows(folder: Path) -> None:
    """Exported files get the permissions the user's umask gives new files (safetensors writes 0600)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~mask)


def _hf_module(component: str) -> Any | None:
    """The recipe's `hf` module (papertrain.recipes.<family>.<paper>.hf), if it has one."""
    parts = component.split(".")
    if parts[:2] != ["papertrain", "recipes"] or len(parts) < 5:
        return None
    try:
        module = importlib.import_module(".".join(parts[:4] + ["hf"]))
    except ModuleNotFoundError:
        return None
    return module if hasattr(module, "save_hf_directory") else None


def _dedupe(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores shared tensors once: keep the first name of each."""
    seen: set[int] = set()
    kept = {}
    for key, tensor in weights.items():
        if tensor.data_ptr() in seen and tensor.numel():
            continue
        seen.add(tensor.data_ptr())
        kept[key] = tensor.contiguous()
    return kept
