"""Saved weights loaded into a model one tensor at a time (the `pretrained` section; modelbuild.py calls it).

Loading never holds a second copy of the model. The model is built on the `meta` device (shapes only),
each safetensors file is memory-mapped, and each tensor is read, cast and moved to its target device on
its own before it becomes that parameter: peak host memory is the largest tensor, not the model. When a
block (a layer of `blocks_of(model)`) has all its tensors, `on_block_loaded` runs on it: int8 conversion
happens there, so a 16-bit copy of the whole model never exists either.

Checkpoint names are matched to the model's by dropping leading components (`gpt_neox.layers.0...` is
`layers.0...`), so Hugging Face folders load into models that mirror HF's module names. Tensors a
checkpoint stores but a model derives (attention masks, rotary frequencies) are skipped by suffix.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from papertrain.errors import PapertrainError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INDEX_FILE = "model.safetensors.index.json"
DERIVED_SUFFIXES = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


def tensor_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file that holds it (a folder, sharded or not, or a file)."""
    from safetensors import safe_open

    if not path.exists():
        raise PapertrainError(f"pretrained weights not found: {path}",
                              "point pretrained.path at a safetensors file or a Hugging Face model folder")
    if path.is_file():
        single = path
    elif (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    elif (path / "model.safetensors").is_file():
        single = path / "model.safetensors"
    else:
        raise PapertrainError(f"{path} holds neither {INDEX_FILE} nor model.safetensors",
                              "point pretrained.path at a safetensors file or a Hugging Face model folder "
                              "(.bin checkpoints must be converted: papertrain never unpickles weights)")
    if single.suffix != ".safetensors":
        raise PapertrainError(f"{single} is not a .safetensors file", "papertrain loads safetensors only")
    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}


def match_names(ours: list[str], theirs: list[str], where: Path, partial: bool = False) -> dict[str, str]:
    """Our parameter name -> the checkpoint's, dropping leading components of theirs until one matches.
    `partial`: the model is one part of the checkpoint's (a pipeline stage), so extra tensors are fine."""
    wanted = set(ours)
    mapping: dict[str, str] = {}
    unexpected = []
    for name in theirs:
        parts = name.split(".")
        found = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in wanted), None)
        if found is not None and found not in mapping:
            mapping[found] = name
        elif found is None and not partial and not name.endswith(DERIVED_SUFFIXES):
            unexpected.append(name)
    missing = [name for name in ours if name not in mapping]
    if missing or unexpected:
        raise PapertrainError(
            f"{where} does not fit the model: {len(missing)} of its parameters are missing "
            f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}) and {len(unexpected)} tensors are "
            f"unexpected ({', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''})",
            "check that the model section (sizes, layers) describes these weights")
    return mapping


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) that holds each parameter: a tied weight has several."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules(remove_duplicate=False):
        for leaf, parameter in module._parameters.items():
            if parameter is not None:
                owners.setdefault(id(parameter), []).append((module, leaf))
    return owners


def _replace_parameter(owners: list[tuple[nn.Module, str]], name: str, tensor: torch.Tensor) -> None:
    module, leaf = owners[0]
    current = module._parameters[leaf]
    if tuple(current.shape) != tuple(tensor.shape):
        raise PapertrainError(f"{name}: the checkpoint's shape {tuple(tensor.shape)} differs from the model's "
                              f"{tuple(current.shape)}", "check that the model section describes these weights")
    replacement = nn.Parameter(tensor, requires_grad=current.requires_grad)
    for module, leaf in owners:
        module._parameters[leaf] = replacement


def load_weights(model: nn.Module, path: Path, device: torch.device, dtype: torch.dtype,
                 on_block_loaded: Callable[[nn.Module], None] | None = None, partial: bool = False) -> None:
    """Fill `model` (usually built on meta) from safetensors, tensor by tensor, in module order.
    Floating-point tensors are cast to `dtype`; tied parameters (one tensor, two names) load once."""
    from safetensors import safe_open

    from papertrain.strategies.base import blocks_of

    files = tensor_files(path)
    named = dict(model.named_parameters())  # tied parameters appear once
    mapping = match_names(list(named), list(files), path, partial)
    blocks = blocks_of(model)
    block_of = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    remaining = [sum(1 for _ in block.parameters()) for block in blocks]
    owners = _owners(model)
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for name, parameter in named.items():
            block = block_of.get(id(parameter))
            file = files[mapping[name]]
            if file not in handles:  # memory-mapped once per shard
                handles[file] = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            tensor = handles[file].get_tensor(mapping[name])
            cast = dtype if tensor.is_floating_point() else tensor.dtype
            _replace_parameter(owners[id(parameter)], name, tensor.to(device=device, dtype=cast))
            del tensor
            if block is not None:
                remaining[block] -= 1
                if remaining[block] == 0 and on_block_loaded is not None:
                    on_block_loaded(blocks[block])
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            raise PapertrainError(f"buffer {name} has no value after loading",
                                  "the model must compute its buffers, or the checkpoint must hold them")
