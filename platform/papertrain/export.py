"""`papertrain export RUN_DIR`: any checkpoint, consolidated into one safetensors file.

Sharded checkpoints (FSDP2 on N ranks), plain ones (one process, DDP) and DeepSpeed's partitioned
files all become the full weights, in one `model.safetensors`. Where the recipe knows a Hugging Face
layout (its package has an `hf` module with `save_hf_directory(model, folder)`, as GPT does), the
file uses HF's key names and gets a `config.json`, so `AutoModelForCausalLM.from_pretrained(folder)`
loads it. Nothing is unpickled on the way.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
import yaml

from papertrain.checkpoint import (FORMAT, MODEL_DIR, CheckpointDir, single_process_dcp, load_train_state,
                                   read_meta)
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
    meta = read_meta(folder)
    written_by = meta.get("format", FORMAT)
    if written_by == FORMAT:
        return _from_dcp(folder)
    if written_by == "deepspeed":
        return _from_deepspeed(folder)
    module_name = meta.get("consolidate")
    if module_name:  # a strategy with its own format names the function that reads it
        return importlib.import_module(module_name).consolidate(folder)
    raise PapertrainError(f"cannot read checkpoint format '{written_by}' in {folder}")


def _from_dcp(folder: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(folder / MODEL_DIR))
    metadata = reader.read_metadata()
    weights = {key: torch.empty(info.size, dtype=info.properties.dtype)
               for key, info in metadata.state_dict_metadata.items()}
    with single_process_dcp():
        dcp.load(weights, storage_reader=HuggingFaceStorageReader(str(folder / MODEL_DIR)))
    for alias, original in load_train_state(folder).get("aliases", {}).items():
        weights[alias] = weights[original]
    return weights


def _from_deepspeed(folder: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from papertrain.strategies.deepspeed_zero import DEEPSPEED_FOLDER, weights_only_loads

    with weights_only_loads():
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED_FOLDER))


def export(run_dir: Path, step: int | None = None, out: Path | None = None, layout: str = "auto") -> tuple[Path, str]:
    """Write the consolidated weights; returns (folder written, layout used: "hf" or "papertrain")."""
    from safetensors.torch import save_file

    from papertrain.config import instantiate

    folder = find_checkpoint(run_dir, step)
    weights = full_weights(folder)
    out = out or run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    hf = _hf_module(config["model"]["_component_"]) if layout in ("auto", "hf") else None
    if layout == "hf" and hf is None:
        raise PapertrainError(f"{config['model']['_component_']} has no Hugging Face layout",
                              "use --layout papertrain (our own key names)")
    if hf is not None:
        with torch.device("meta"):
            model = instantiate(config["model"])
        model.load_state_dict(weights, assign=True, strict=True)
        hf.save_hf_directory(model, out)
        return out, "hf"
    save_file(_dedupe(weights), str(out / "model.safetensors"), metadata={"format": "pt", "step": str(read_meta(folder)["step"])})
    return out, "papertrain"


def _hf_module(component: str) -> Any | None:
    package = component.rsplit(".", 2)[0]  # papertrain.recipes.transformers.gpt(.model.GPT)
    try:
        module = importlib.import_module(f"{package}.hf")
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
