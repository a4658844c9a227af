"""GPT-NeoX checkpoints in the Hugging Face layout: the architecture from `config.json`, the weights
loaded one tensor at a time.

Plumbing, not the paper. A released checkpoint is a folder with `config.json` and either one
`model.safetensors` or shards `model-0000k-of-0000n.safetensors` listed in `model.safetensors.index.json`
(tensor name -> shard). NeoX-20B in fp16 is 41 GB, so it must never be held twice: the model is built on
the `meta` device and `papertrain.pretrained.load_weights` memory-maps each shard and moves one tensor at
a time to its device and dtype (peak host memory: the 50,432 x 6,144 embedding, 620 MB in fp16), and with
`quant` converts each layer to int8 as soon as it is complete.

Names are HF's minus the `gpt_neox.` prefix (the model mirrors HF's module names on purpose). Old
checkpoints also store attention masks and rotary frequencies (`attention.bias`, `attention.masked_bias`,
`rotary_emb.inv_freq`): derived values, skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from papertrain.errors import PapertrainError
from papertrain.pretrained import DTYPES, load_weights
from papertrain.recipes.transformers.neox.model import GPTNeoX


def config_from_hf(directory: Path) -> dict[str, Any]:
    """GPTNeoX's constructor arguments from a HF `config.json` (old and new key names)."""
    path = directory / "config.json"
    if not path.is_file():
        raise PapertrainError(f"{directory} has no config.json", "point at a Hugging Face GPT-NeoX model folder")
    hf = json.loads(path.read_text())
    if hf.get("model_type", "gpt_neox") != "gpt_neox":
        raise PapertrainError(f"{path}: model_type is '{hf.get('model_type')}', not gpt_neox",
                              "this loader reads GPT-NeoX checkpoints (NeoX-20B, Pythia, ...)")
    if hf.get("tie_word_embeddings"):
        raise PapertrainError(f"{path}: tie_word_embeddings=true, but GPT-NeoX's embeddings are untied",
                              "check that this is a GPT-NeoX checkpoint")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise PapertrainError(f"{path}: rope type '{rope.get('rope_type')}' is not implemented",
                              "use a checkpoint with plain rotary embeddings")
    return {
        "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_attention_heads"], "d_ff": hf.get("intermediate_size"),
        "block_size": hf.get("max_position_embeddings", 2048),
        "rotary_pct": rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
        "rotary_base": rope.get("rope_theta", hf.get("rotary_emb_base", 10_000.0)),
        "norm_eps": hf.get("layer_norm_eps", 1e-5), "activation": hf.get("hidden_act", "gelu"),
        "parallel_residual": hf.get("use_parallel_residual", True),
        "attention_bias": hf.get("attention_bias", True),
    }


def from_pretrained(path: str, dtype: str = "fp32", device: str = "cpu", **overrides: Any) -> GPTNeoX:
    """A GPTNeoX from a HF GPT-NeoX folder, loaded tensor by tensor onto `device` in `dtype`. (In a config,
    the `pretrained` section does the same for any model, and `quant: int8` converts layers as they load.)"""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise PapertrainError(f"model folder not found: {directory}",
                              "download a GPT-NeoX checkpoint (config.json + *.safetensors) and point path at it")
    if dtype not in DTYPES:
        raise PapertrainError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}", "use fp16 on GPUs, fp32 on CPU")
    with torch.device("meta"):
        model = GPTNeoX(**{**config_from_hf(directory), **overrides})
    load_weights(model, directory, torch.device(device), DTYPES[dtype])
    return model
