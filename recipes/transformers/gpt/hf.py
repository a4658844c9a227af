"""Our GPT's weights in the Hugging Face layouts of GPT-1 (`openai-gpt`) and GPT-2 (`gpt2`), and back.

Plumbing, not the paper: names map one to one, and HF's `Conv1D` stores each weight transposed
relative to `nn.Linear` (it computes x W + b with W: [in, out]). Post-norm models map to GPT-1's layout
(its blocks normalise after each residual add), pre-norm models to GPT-2's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from papertrain.recipes.transformers.gpt.model import GPT

Flavour = Literal["gpt2", "openai-gpt"]

_EMBEDDINGS = {
    "gpt2": ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h"),
    "openai-gpt": ("transformer.tokens_embed.weight", "transformer.positions_embed.weight", "transformer.h"),
}
# ours -> theirs within a block; True where the weight is transposed (Conv1D)
_BLOCK = {
    "attention.qkv_proj.weight": ("attn.c_attn.weight", True),
    "attention.qkv_proj.bias": ("attn.c_attn.bias", False),
    "attention.out_proj.weight": ("attn.c_proj.weight", True),
    "attention.out_proj.bias": ("attn.c_proj.bias", False),
    "ffn.linear1.weight": ("mlp.c_fc.weight", True),
    "ffn.linear1.bias": ("mlp.c_fc.bias", False),
    "ffn.linear2.weight": ("mlp.c_proj.weight", True),
    "ffn.linear2.bias": ("mlp.c_proj.bias", False),
    "norm1.weight": ("ln_1.weight", False),
    "norm1.bias": ("ln_1.bias", False),
    "norm2.weight": ("ln_2.weight", False),
    "norm2.bias": ("ln_2.bias", False),
}
_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def flavour_of(model: GPT) -> Flavour:
    return "gpt2" if isinstance(model.final_norm, torch.nn.LayerNorm) else "openai-gpt"


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    flavour = flavour_of(model)
    tokens, positions, blocks = _EMBEDDINGS[flavour]
    ours = model.state_dict()
    theirs = {tokens: ours["token_embedding.weight"], positions: ours["positions.embedding.weight"]}
    for i in range(model.n_layers):
        for name, (hf_name, transposed) in _BLOCK.items():
            tensor = ours[f"layers.{i}.{name}"]
            theirs[f"{blocks}.{i}.{hf_name}"] = tensor.t() if transposed else tensor
    if flavour == "gpt2":
        theirs["transformer.ln_f.weight"] = ours["final_norm.weight"]
        theirs["transformer.ln_f.bias"] = ours["final_norm.bias"]
    theirs["lm_head.weight"] = ours["lm_head.weight"]
    return {k: v.detach().contiguous() for k, v in theirs.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], n_layers: int, flavour: Flavour) -> dict[str, torch.Tensor]:
    tokens, positions, blocks = _EMBEDDINGS[flavour]
    ours = {"token_embedding.weight": state[tokens], "positions.embedding.weight": state[positions]}
    for i in range(n_layers):
        for name, (hf_name, transposed) in _BLOCK.items():
            tensor = state[f"{blocks}.{i}.{hf_name}"]
            ours[f"layers.{i}.{name}"] = tensor.t() if transposed else tensor
    if flavour == "gpt2":
        ours["final_norm.weight"] = state["transformer.ln_f.weight"]
        ours["final_norm.bias"] = state["transformer.ln_f.bias"]
    ours["lm_head.weight"] = state.get("lm_head.weight", ours["token_embedding.weight"])
    return {k: v.contiguous() for k, v in ours.items()}


def hf_config(model: GPT, dropout: float = 0.0) -> dict:
    """The config.json HF needs to rebuild the same network (`GPT2Config` / `OpenAIGPTConfig` keys)."""
    layer = model.layers[0]
    activation = layer.ffn.activation
    common = {"vocab_size": model.vocab_size, "n_positions": model.block_size, "n_embd": model.d_model,
              "n_layer": model.n_layers, "n_head": layer.attention.n_heads,
              "layer_norm_epsilon": layer.norm1.eps, "resid_pdrop": dropout, "embd_pdrop": dropout,
              "attn_pdrop": dropout, "tie_word_embeddings": True,
              # GPT-2's <|endoftext|> is id 50256; a smaller vocabulary (characters) has no such token
              "bos_token_id": 50256 if model.vocab_size > 50256 else None,
              "eos_token_id": 50256 if model.vocab_size > 50256 else None}
    if flavour_of(model) == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_inner": layer.ffn.linear1.out_features,
                "activation_function": _HF_ACTIVATION[activation], **common}
    if layer.ffn.linear1.out_features != 4 * model.d_model:
        raise ValueError("HF's OpenAI GPT fixes the FFN width at 4·d_model; this model differs")
    return {"model_type": "openai-gpt", "architectures": ["OpenAIGPTLMHeadModel"], "afn": _HF_ACTIVATION[activation],
            **common}


def save_hf_directory(model: GPT, folder: str | Path) -> Path:
    """model.safetensors + config.json that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict(model)
    state.pop("lm_head.weight")  # tied: HF re-ties it from the token embedding
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(model), indent=2))
    return folder
