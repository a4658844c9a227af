"""Our tokenizers in Hugging Face's format, for an export that `AutoTokenizer.from_pretrained` loads.

`papertrain export` writes three files beside the weights:

    tokenizer.json            the `tokenizers` library's format: the same ids for the same text as ours
    tokenizer_config.json     which transformers class reads it (PreTrainedTokenizerFast), the context length
    generation_config.json    the recipe's sampling settings (temperature, top-k, top-p, new tokens)

A character vocabulary becomes a BPE model with no merges and no pre-tokenizer: the whole text is one
"word", split into its characters, each looked up in the vocabulary, and a `Fuse` decoder joins them
back without spaces. GPT-2's byte-level BPE becomes the same BPE with its byte-level pre-tokenizer and
decoder; a tokenizer that came from a Hugging Face `tokenizer.json` (GPT-NeoX's) is copied as it is.
The run directory keeps its own, smaller description in `papertrain-tokenizer.json`, which is not HF's
format and so does not take HF's file name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from papertrain.errors import PapertrainError


def write_hf_tokenizer(tokenizer: Any, folder: Path, model_max_length: int | None = None) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json for `tokenizer` into `folder`; the names written."""
    folder = Path(folder)
    source = getattr(tokenizer, "source", {}) or {}
    if getattr(tokenizer, "kind", None) == "char":
        spec = _char_spec(tokenizer)
    elif source.get("type") == "tokenizer.json" and Path(source.get("path", "")).is_file():
        shutil.copyfile(source["path"], folder / "tokenizer.json")
        spec = None
    elif hasattr(tokenizer, "encoder") and hasattr(tokenizer, "merge_rank"):
        spec = _byte_level_spec(tokenizer)
    else:
        raise PapertrainError(f"cannot write a {type(tokenizer).__name__} in Hugging Face's format",
                              "export with a character or byte-level BPE tokenizer")
    if spec is not None:
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    eos = getattr(tokenizer, "eot_id", None)
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                              "add_prefix_space": False}
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    if eos is not None:
        config["eos_token"] = _token_of(tokenizer, eos)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return ["tokenizer.json", "tokenizer_config.json"]


def write_generation_config(task: dict[str, Any], folder: Path, eos_token_id: int | None = None) -> str:
    """generation_config.json from the task's sampling settings: what `papertrain generate` uses by default."""
    temperature = float(task.get("temperature", 1.0) or 0.0)
    config: dict[str, Any] = {"max_new_tokens": int(task.get("sample_tokens", 200) or 200)}
    if temperature > 0:
        config.update(do_sample=True, temperature=temperature)
        if task.get("top_k"):
            config["top_k"] = int(task["top_k"])
        else:
            config["top_k"] = 0  # transformers' default is 50: ours is no cut-off
        if task.get("top_p"):
            config["top_p"] = float(task["top_p"])
    else:
        config["do_sample"] = False
    if eos_token_id is not None:
        config["eos_token_id"] = int(eos_token_id)
    (Path(folder) / "generation_config.json").write_text(json.dumps(config, indent=2))
    return "generation_config.json"


def _bpe(vocab: dict[str, int], merges: list[list[str]]) -> dict[str, Any]:
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": merges}


def _document(model: dict[str, Any], pre_tokenizer: Any, decoder: Any, added: list[dict[str, Any]] = ()) -> dict:
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": list(added), "normalizer": None,
            "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": decoder, "model": model}


def _char_spec(tokenizer: Any) -> dict[str, Any]:
    vocab = {ch: i for i, ch in enumerate(tokenizer.alphabet)}
    return _document(_bpe(vocab, []), None, {"type": "Fuse"})


def _byte_level_spec(tokenizer: Any) -> dict[str, Any]:
    merges = [list(pair) for pair, _ in sorted(tokenizer.merge_rank.items(), key=lambda item: item[1])]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for token, i in sorted(tokenizer.added.items(), key=lambda t: t[1])]
    document = _document(_bpe(dict(tokenizer.encoder), merges), byte_level, byte_level, added)
    if tokenizer.normalization:
        document["normalizer"] = {"type": tokenizer.normalization}
    return document


def _token_of(tokenizer: Any, token_id: int) -> str | None:
    for table in (getattr(tokenizer, "added_decoder", {}), getattr(tokenizer, "decoder", {})):
        if token_id in table:
            return table[token_id]
    return None
