"""The run config: the engine's own sections as typed dataclasses.

A recipe YAML has these top-level keys. `model`, `data`, `task`, `optimizer` and `scheduler` name their
class with `_component_` and are checked against that class's signature; `trainer` is checked against
`TrainerConfig` below. Field help texts show up in validation errors and in `papertrain show --help`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from papertrain.config.constraints import NonNegativeInt, OneOf, PositiveFloat, PositiveInt, Range, Seed
from papertrain.config.validate import Component


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainerConfig:
    """How the one training loop runs; the same keys for every recipe."""

    max_steps: PositiveInt = _help("optimizer steps to train for")
    batch_size: PositiveInt = _help("GLOBAL batch per optimizer step: summed over ranks and accumulation "
                            "micro-batches, so the math does not change when you add GPUs")
    grad_accum_steps: PositiveInt = _help("micro-batches per optimizer step on each rank", default=1)
    grad_clip: PositiveFloat | None = _help("clip the global gradient norm to this (null: no clipping)", default=1.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _help(
        "autocast dtype; auto = bf16 on GPUs that support it, fp32 on CPU", default="auto")
    device: str = _help("auto, cpu, cuda, cuda:N or mps", default="auto")
    eval_every: NonNegativeInt = _help("evaluate every N steps (0: only at the end)", default=0)
    eval_batches: PositiveInt = _help("validation batches per evaluation (a fixed subset)", default=10)
    sample_every: Annotated[int, Range(ge=-1)] = _help("write samples every N steps (0: only at the end; -1: never)", default=0)
    log_every: PositiveInt = _help("log training metrics every N steps", default=10)
    checkpoint_every: NonNegativeInt = _help("checkpoint every N steps (0: only at the end and on interrupt)", default=0)
    keep_last: PositiveInt = _help("checkpoints to keep (older ones are deleted)", default=2)
    deterministic: bool = _help("deterministic kernels (slower; bit-reproducible on CPU)", default=False)
    compile: bool = _help("torch.compile the model", default=False)
    threads: PositiveInt | None = _help("CPU threads for torch (null: torch's default)", default=None)
    progress: Literal["auto", "bar", "plain", "none"] = _help(
        "progress bar on a terminal, plain lines otherwise (auto); none: quiet", default="auto")
    tensorboard: bool = _help("also write TensorBoard event files when tensorboard is installed", default=True)
    plot: bool = _help("write a PNG of the loss curves at the end of the run", default=True)


def _strategies() -> list[str]:
    from papertrain.strategies import strategy_table

    return list(strategy_table())


def _quantizers() -> list[str]:
    from papertrain.registry import provided

    return list(provided("quantizers"))


def _finetuning() -> list[str]:
    from papertrain.registry import provided

    return ["all", "biases", *provided("finetune")]


@dataclass
class StrategyConfig:
    """How the loop runs on one process or many. `strategy: fsdp2` is short for `strategy: {name: fsdp2}`."""

    name: Annotated[str, OneOf(_strategies)] = _help(
        "single, ddp, fsdp2, deepspeed, pipeline (layers split into one stage per rank; trainer.grad_accum_steps "
        "micro-batches), or one a recipe provides (zero3_reference)", default="single")
    stage: Literal[1, 2, 3] = _help("DeepSpeed ZeRO stage: 1 optimizer state, 2 + gradients, 3 + parameters",
                                    default=3)
    offload_optimizer: bool = _help("keep optimizer state in CPU memory (deepspeed; fsdp2 offloads all state)",
                                    default=False)
    offload_params: bool = _help("keep parameters in CPU memory (deepspeed stage 3, fsdp2)", default=False)
    activation_checkpointing: bool = _help("recompute each block's activations in the backward pass",
                                           default=False)
    meta_init: bool = _help("build the model without memory (meta device / deepspeed.zero.Init) and give each "
                            "rank only its shard: the whole model never exists on one rank", default=False)
    reshard_after_forward: bool = _help("fsdp2: free gathered parameters after each block's forward",
                                        default=True)
    async_checkpoint: bool = _help("write checkpoints in the background while training goes on (single, ddp, "
                                   "fsdp2); each appears, renamed into place, once complete", default=False)
    world_size: PositiveInt | None = _help("the number of processes this job must have (refuse to train otherwise)",
                                   default=None)
    deepspeed: dict | None = _help("extra DeepSpeed config keys, merged over the ones papertrain derives",
                                   default=None)


@dataclass
class PretrainedConfig:
    """Start from saved weights instead of random initialisation (finetuning, generation)."""

    path: str = _help("a Hugging Face model folder (config.json + model.safetensors or shards with "
                      "model.safetensors.index.json), or one .safetensors file as `papertrain export` writes")
    dtype: Literal["fp32", "fp16", "bf16"] = _help(
        "the dtype the weights are held in; fp16/bf16 halve the memory of a frozen base", default="fp32")


@dataclass
class QuantConfig:
    """Convert Linear layers to int8 as the weights load. `quant: int8` is short for `quant: {mode: int8}`."""

    mode: Annotated[str, OneOf(_quantizers)] = _help(
        "a quantizer a recipe provides; int8: LLM.int8() (Dettmers et al. 2022, recipes/quantization/llm_int8), "
        "vector-wise absmax int8 weights with fp16 outlier features", default="int8")
    backend: Literal["own", "bitsandbytes"] = _help(
        "own: papertrain's annotated implementation (recipes/quantization/llm_int8); bitsandbytes: its "
        "Linear8bitLt", default="own")
    threshold: PositiveFloat = _help("outlier threshold: input features with any |x| >= this stay in 16 bits (§3.3)",
                             default=6.0)
    skip: list[str] = _help("Linear layers kept as they are (name suffixes), e.g. the output projection",
                            default_factory=lambda: ["lm_head", "embed_out"])


@dataclass
class LoRASettings:
    """LoRA adapters (Hu et al. 2021; recipes/finetune/lora): h = W₀x + (alpha/r)·B A x on each target."""

    targets: list[str] = _help("Linear layers to adapt: name suffixes or patterns, e.g. [query_key_value, dense]")
    r: PositiveInt = _help("rank of the update B A", default=8)
    alpha: PositiveFloat = _help("scale: the update is multiplied by alpha / r", default=16.0)
    dropout: Annotated[float, Range(ge=0, lt=1)] = _help("dropout on the adapters' input", default=0.0)
    train_biases: bool = _help("train the model's biases as well (the paper freezes them)", default=False)


@dataclass
class FinetuneConfig:
    """Which parameters train; the rest are frozen (no gradients, no optimizer state)."""

    train: Annotated[str, OneOf(_finetuning)] = _help(
        "all; biases: only biases and norm gains (1-D parameters); or a method a recipe provides, e.g. lora: only "
        "LoRA adapters (section lora)", default="all")
    lora: LoRASettings | None = _help("LoRA settings when train=lora", default=None)


ModelSection = Annotated[dict, Component()]
DataSection = Annotated[dict | None, Component()]
OptimizerSection = Annotated[dict | None, Component(supplied=("params",))]
NamedOptimizerSection = Annotated[dict, Component(supplied=("params",), engine_keys={"parameters": str})]
SchedulerSection = Annotated[dict | None, Component(supplied=("optimizer",))]
NamedSchedulerSection = Annotated[dict, Component(supplied=("optimizer",))]
CallbackSection = Annotated[dict, Component()]


@dataclass
class RunConfig:
    """A whole recipe config: what to build, and how to train it."""

    model: ModelSection = _help("the network: `_component_` plus its constructor arguments")
    data: DataSection = _help("the data: a data set with .train and .val, a stateful source with next_batch(ctx) "
                              "(environments, segment streams), or null (a solver)")
    task: ModelSection = _help("loss, evaluation and sampling for this recipe (or its own train_step)")
    trainer: TrainerConfig = _help("the training loop's settings")
    optimizer: OptimizerSection = _help("`_component_` of a torch optimizer over every parameter (params are "
                                        "supplied); null for a solver, or use `optimizers:` for several", default=None)
    optimizers: dict[str, NamedOptimizerSection] | None = _help(
        "several optimizers by name, each over the model part its `parameters:` key names (e.g. generator)",
        default=None)
    strategy: StrategyConfig = _help("single process, or ddp / fsdp2 / deepspeed across many",
                                     default_factory=StrategyConfig)
    scheduler: SchedulerSection = _help("learning-rate schedule (the optimizer is supplied)", default=None)
    schedulers: dict[str, NamedSchedulerSection] | None = _help(
        "a schedule per named optimizer (keys of `optimizers:`)", default=None)
    callbacks: dict[str, CallbackSection] | None = _help(
        "code run before/after each step or after evaluation, by name (e.g. EMA weights)", default=None)
    pretrained: PretrainedConfig | None = _help("load these weights into the model before training",
                                                default=None)
    quant: QuantConfig | None = _help("int8 weights for the model's Linear layers (frozen)", default=None)
    finetune: FinetuneConfig | None = _help("train only part of the model (biases, LoRA adapters)", default=None)
    name: str | None = _help("the recipe's name; also the default run directory runs/<name>", default=None)
    seed: Seed = _help("seeds python, numpy and torch; data order derives from it", default=0)
    run_dir: str | None = _help("where metrics, checkpoints and samples go (default runs/<name>)",
                                default=None)
    trust: list[str] = _help("packages whose classes `_component_` may name besides papertrain's and torch's "
                             "building blocks, e.g. [timm] (never os, subprocess, builtins, ...)",
                             default_factory=list)


def build_dataclass(cls: type, values: dict[str, Any]) -> Any:
    """Turn a validated mapping into the dataclass, recursing into dataclass-typed fields."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `Section | None`
            kind = next((k for k in typing.get_args(kind) if dataclasses.is_dataclass(k)), kind)
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = build_dataclass(kind, value)
        kwargs[f.name] = value
    return cls(**kwargs)
