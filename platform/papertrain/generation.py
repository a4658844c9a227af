"""`papertrain generate`: a model, a tokenizer and a prompt -> streamed text.

The target is a run directory (its config.yaml, its latest checkpoint and tokenizer.json), or a recipe /
config whose model is complete without training (`pretrained` weights, e.g. neox:20b). The model is built
exactly as for training (pretrained weights, int8, LoRA), on the chosen device and dtype, and the tokens
are printed as they are drawn. Models with a key/value cache (`new_cache`) decode in O(T) per token.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from papertrain.config import LoadedConfig, load_config
from papertrain.errors import PapertrainError


@dataclass
class Generator:
    model: nn.Module
    tokenizer: object
    device: torch.device
    source: str


def load_for_generation(target: str, overrides: list[str], device: str = "auto", step: int | None = None,
                        trust: list[str] = ()) -> Generator:
    from papertrain.modelbuild import model_builder
    from papertrain.seeding import seed_everything
    from papertrain.strategies.base import pick_device

    run_dir = Path(target)
    chosen = pick_device(device)
    from_run = (run_dir / "config.yaml").is_file()
    if from_run:
        from papertrain.rundir import load_run_config

        config = load_run_config(run_dir, overrides, trust=trust)  # validated: a run directory is data
    else:
        from papertrain.catalog import resolve_target

        config = load_config(resolve_target(target)[0], overrides, trust=trust)
        if config.run.pretrained is None:
            raise PapertrainError(f"{target}: its model has no pretrained weights, so it would generate from "
                                  "random initialisation", f"train it first (papertrain run {target}) and pass the "
                                  "run directory, or set pretrained.path=...")
    seed_everything(config.run.seed)  # a frozen random base (no pretrained weights) is rebuilt from the seed
    model = model_builder(config, chosen, "single", "fp32", training=False)()
    if from_run:
        folder = load_checkpoint_into(model, run_dir, step)
        tokenizer = run_tokenizer(run_dir, config)
        if tokenizer is None:
            tokenizer = _tokenizer_of(config)  # raises the clear error
        source = f"{run_dir} (step {folder.name.split('_')[-1].lstrip('0') or '0'})"
    else:
        tokenizer = _tokenizer_of(config)
        source = f"{config.source} with weights from {config.run.pretrained.path}"
    return Generator(model.to(chosen).eval(), tokenizer, chosen, source)


TOKENIZER_FILE = "papertrain-tokenizer.json"  # our own description (not HF's tokenizer.json format)


def run_tokenizer(run_dir: Path, config: LoadedConfig):
    """The tokenizer a run trained with: its papertrain-tokenizer.json (or the `tokenizer.json` of run
    directories written before the rename), else rebuilt from its data section; None if it has none."""
    for name in (TOKENIZER_FILE, "tokenizer.json"):
        path = Path(run_dir) / name
        if path.is_file() and (name == TOKENIZER_FILE or _is_ours(path)):
            return _saved_tokenizer(path)
    try:
        return _tokenizer_of(config)
    except PapertrainError:
        return None


def _is_ours(path: Path) -> bool:
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return True  # damaged: _saved_tokenizer says so
    return not isinstance(state, dict) or "model" not in state  # HF's format has a "model"


def _saved_tokenizer(path: Path):
    """A run's tokenizer.json (data: a vocabulary, or the names of tokenizer files), with one clear error."""
    from papertrain.data.tokenizers import tokenizer_from_json

    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not an object")
        return tokenizer_from_json(state)
    except PapertrainError:
        raise
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, OSError) as err:
        raise PapertrainError(f"{path} is damaged: {type(err).__name__}: {err}",
                              "restore it, or delete it to rebuild the tokenizer from the run's data section") from None


def _tokenizer_of(config: LoadedConfig):
    data = config.run.data
    if isinstance(data, dict) and data.get("tokenizer") not in (None, "char"):
        from papertrain.data.tokenizers import build_tokenizer

        return build_tokenizer(data["tokenizer"], path=data.get("tokenizer_path"))
    built = config.build("data")  # a character vocabulary is read from the corpus itself
    tokenizer = getattr(built, "tokenizer", None)
    if tokenizer is None:
        raise PapertrainError(f"{config.source}: the data section has no tokenizer to encode the prompt with",
                              "generate from a language-model recipe")
    return tokenizer


def load_checkpoint_into(model: nn.Module, run_dir: Path, step: int | None) -> Path:
    """The checkpoint's weights into the freshly built model (a finetune's checkpoint holds only what
    training changed; the frozen base came from the config). Returns the checkpoint's folder."""
    from papertrain.checkpoint import has_frozen_base
    from papertrain.export import find_checkpoint, full_weights

    folder = find_checkpoint(run_dir, step)
    weights = full_weights(folder)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or (missing and not has_frozen_base(model)):
        raise PapertrainError(f"{run_dir}'s checkpoint does not fit the model its config builds "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                              "generate with the config the run was trained with")
    return folder


def generate_text(generator: Generator, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
                  top_p: float | None, seed: int, out: TextIO | None = None) -> dict[str, float]:
    """Print the prompt, then each new token's text as soon as it is drawn; return timing figures."""
    from papertrain.registry import lookup

    Sampler, stream = lookup("generation", "sampler"), lookup("generation", "stream")  # the sampling recipe

    out = out or sys.stdout  # (looked up now: the default stream may have been replaced since import)

    tokenizer = generator.tokenizer
    ids = tokenizer.encode(prompt)
    if not ids:
        raise PapertrainError("the prompt encodes to no tokens", "give a non-empty --prompt")
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p)
    rng = torch.Generator(device=generator.device).manual_seed(seed)
    prompt_ids = torch.tensor([ids], device=generator.device)
    stop = [tokenizer.eot_id] if getattr(tokenizer, "eot_id", None) is not None else []
    out.write(prompt)
    out.flush()
    produced: list[int] = []
    shown = ""
    started = time.perf_counter()
    first = None
    for token in stream(generator.model, prompt_ids, max_new_tokens, sampler, rng, stop):
        first = first or time.perf_counter()
        produced.append(token)
        text = tokenizer.decode(produced)  # decode the whole continuation: a character may span tokens
        if not text.endswith("\ufffd"):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    out.write(tokenizer.decode(produced)[len(shown):] + "\n")
    elapsed = time.perf_counter() - started
    after_first = time.perf_counter() - (first or started)
    return {"tokens": len(produced), "seconds": elapsed,
            "tokens_per_s": (len(produced) - 1) / after_first if len(produced) > 1 and after_first > 0 else 0.0}
