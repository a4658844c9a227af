"""From a config to the model the strategy trains: build, load pretrained weights, quantise, freeze.

    model:       what to build (a `_component_`)
    pretrained:  weights to load instead of random initialisation      (papertrain/pretrained.py)
    quant:       int8 Linear layers, converted block by block as they load (LLM.int8(), its own recipe)
    finetune:    which parameters train: all, biases (and norm gains), or LoRA adapters (its own recipe)

Combinations that cannot work are refused by `check_combination` before anything is built or loaded:
int8 weights are frozen integer buffers, so they never train (finetune must be biases or lora), and
FSDP2 / ZeRO-3 shard floating-point parameters, which int8 buffers are not (use DDP, where every rank
holds the frozen base and only the adapters' gradients are averaged).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from papertrain.config import LoadedConfig
from papertrain.config.schema import FinetuneConfig, QuantConfig, RunConfig
from papertrain.errors import PapertrainError
from papertrain.pretrained import DTYPES, load_weights

SHARDING = ("fsdp2", "deepspeed", "zero3_reference")


def check_combination(run: RunConfig, strategy_name: str, precision: str, training: bool = True) -> None:
    """Refuse what cannot work, naming the keys and the fix, before any weight is read."""
    train = run.finetune.train if run.finetune else "all"
    if train == "lora" and not (run.finetune and run.finetune.lora):
        raise PapertrainError("finetune.train=lora needs a finetune.lora section",
                              "add finetune.lora: {targets: [query_key_value, dense], r: 8, alpha: 16}")
    if not training:
        return
    if run.quant is not None:
        if train == "all":
            raise PapertrainError("quant: int8 weights are frozen integers and cannot be trained, but finetune.train "
                                  "is 'all'", "set finetune=biases or finetune=lora (adapters over the int8 base)")
        if strategy_name in SHARDING:
            raise PapertrainError(f"quant: int8 with strategy={strategy_name}: {strategy_name} shards floating-point "
                                  "parameters, and int8 weights are integer buffers it cannot shard or gather",
                                  "use strategy=ddp (each rank holds the int8 base; only the trainable parameters' "
                                  "gradients are averaged), or drop quant")
    if run.pretrained is not None:
        if run.strategy.meta_init:
            raise PapertrainError("strategy.meta_init builds an uninitialised sharded model; pretrained weights "
                                  "are loaded into a whole model", "drop strategy.meta_init when loading pretrained")
        half = run.pretrained.dtype != "fp32"
        if half and train == "all":
            raise PapertrainError(f"pretrained.dtype={run.pretrained.dtype} would train 16-bit weights directly "
                                  "(the optimizer's updates are lost to rounding)",
                                  "use pretrained.dtype=fp32 with trainer.precision=bf16, or finetune=biases/lora "
                                  "(trainable parameters are kept in fp32)")
        if half and precision == "fp32":
            raise PapertrainError(f"pretrained.dtype={run.pretrained.dtype} with trainer.precision=fp32: fp32 "
                                  "activations cannot meet 16-bit weights without autocast",
                                  f"set trainer.precision={'bf16' if run.pretrained.dtype == 'bf16' else 'fp16'}")
        if half and strategy_name == "fsdp2":
            raise PapertrainError("fsdp2 needs one dtype per sharded block, but a 16-bit frozen base with fp32 "
                                  "trainable parameters mixes two", "use pretrained.dtype=fp32 (fsdp2 computes in "
                                  "bf16 through its mixed-precision policy), or strategy=ddp")


def quantize(model: nn.Module, quant: QuantConfig) -> Any:
    """The quantizer a recipe provides under `quant.mode` (int8: recipes/quantization/llm_int8)."""
    from papertrain.registry import lookup

    return lookup("quantizers", quant.mode)(model, backend=quant.backend, threshold=quant.threshold, skip=quant.skip)


def freeze(model: nn.Module, finetune: FinetuneConfig | None) -> None:
    """finetune.train=biases: only 1-D parameters (biases, norm gains) train; lora: only the adapters."""
    train = finetune.train if finetune else "all"
    if train == "biases":
        for parameter in model.parameters():
            parameter.requires_grad_(parameter.dim() < 2)
    elif train != "all":  # a method a recipe provides (lora: recipes/finetune/lora)
        from papertrain.registry import lookup

        settings = getattr(finetune, train, None)
        lookup("finetune", train)(model, **(dataclasses.asdict(settings) if settings is not None else {}))
    if train != "all":
        for parameter in model.parameters():  # trainable parameters are kept (and updated) in fp32
            if parameter.requires_grad and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()


def model_builder(config: LoadedConfig, device: torch.device, strategy_name: str, precision: str,
                  training: bool = True, prune: Callable[[nn.Module], None] | None = None
                  ) -> Callable[[], nn.Module]:
    """The function the strategy calls to build this config's model (see the module docstring).
    `prune` (a pipeline's) drops the modules of other stages before any weight is loaded."""
    run = config.run
    if run.pretrained is None and run.quant is None and run.finetune is None and prune is None:
        return lambda: config.build("model")
    check_combination(run, strategy_name, precision, training)

    def build() -> nn.Module:
        if run.pretrained is None:
            model = config.build("model")  # the same seed on every rank: every stage the same weights
            if prune is not None:
                prune(model)
            if run.quant is not None:
                quantize(model, run.quant)
        else:
            # sharding strategies take a whole CPU model and move each shard; the others load in place
            target = device if strategy_name in ("single", "ddp", "pipeline") else torch.device("cpu")
            with torch.device("meta"):
                model = config.build("model")
            if prune is not None:
                prune(model)
            convert = (lambda block: quantize(block, run.quant)) if run.quant is not None else None
            load_weights(model, Path(run.pretrained.path).expanduser(), target, DTYPES[run.pretrained.dtype],
                         convert, partial=prune is not None)
            if run.quant is not None:
                quantize(model, run.quant)  # Linear layers outside the blocks, if any
        freeze(model, run.finetune)
        return model

    return build
