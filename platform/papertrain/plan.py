"""`papertrain plan`: will it fit? Per-GPU memory of a config under each strategy, before buying GPUs.

The model is built on PyTorch's meta device (shapes only, no memory), so the parameter count is exact
for any size. Model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020, §3.1, §5):

    Ψ parameters; N GPUs; p = 2 bytes (bf16/fp16) or 4 (fp32); K = optimizer bytes per parameter
    (Adam: 8, two fp32 moments; SGD with momentum: 4; plain SGD: 0), plus Adam's step counters

    one process / DDP       4Ψ weights (fp32, autocast)  + 4Ψ gradients       + KΨ
    FSDP2, zero3_reference  (4 + 4 + K)Ψ / N   + two gathered blocks in p bytes while they compute
    DeepSpeed stage 1       pΨ weights + pΨ gradients + (4 + K)Ψ / N (fp32 master + optimizer)
    DeepSpeed stage 2       pΨ + (p + 4 + K)Ψ / N
    DeepSpeed stage 3       (p + p + 4 + K)Ψ / N     (the fp32 master copy is kept even in fp32 runs)
    pipeline, biases only   2Ψ / N frozen fp16 weights (layers split over the GPUs) + (4 + 4 + K)·Ψ_bias / N

Activations of a transformer layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models", §4.1) for micro-batch b, sequence s, width h, in 2-byte precision:
s·b·h·34 bytes with a fused attention kernel (no s×s score matrix), ×2 in fp32; with activation
checkpointing only each layer's input, 2·s·b·h. Generation holds the weights and a KV cache of
2 (K and V) × layers × h × context × batch values. Estimates, not measurements: allow for the CUDA
context and fragmentation (the `fits` column keeps a 1 GiB + 5% reserve).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from papertrain.config import LoadedConfig
from papertrain.errors import PapertrainError
from papertrain.metrics import format_count

GIB = 2**30
OPTIMIZER_BYTES = {"Adam": 8, "AdamW": 8, "RAdam": 8, "NAdam": 8, "Adamax": 8, "SGD": 4, "RMSprop": 4, "Adagrad": 4}


def parse_bytes(text: str) -> int:
    """'48GB', '80 GiB', '512MB' -> bytes (GB is read as GiB, as nvidia-smi reports GPU memory)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text.upper().replace("IB", "iB"))
    if not match:
        raise PapertrainError(f"cannot read a memory size from '{text}'", "write it like 48GB or 80GiB")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2)]
    return int(float(match.group(1)) * scale)


@dataclass
class ModelFacts:
    parameters: int
    vectors: int  # parameters in 1-D tensors: biases and norm gains (what "train biases only" trains)
    tensors: int  # parameter tensors (Adam keeps one step counter per tensor)
    largest_block: int  # parameters of the biggest repeated block (gathered whole under ZeRO-3)
    linear_weights: int  # weights of the blocks' Linear layers (what int8 quantisation converts)
    linear_rows: int  # their output rows (one fp32 scale each under LLM.int8())
    layers: int | None
    width: int | None
    context: int | None


def model_facts(config: LoadedConfig) -> ModelFacts:
    from papertrain.strategies.base import blocks_of

    with torch.device("meta"):
        model = config.build("model")
    unique = {id(p): p for p in model.parameters()}
    blocks = blocks_of(model)
    linears = [m for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
    return ModelFacts(
        linear_weights=sum(m.weight.numel() for m in linears), linear_rows=sum(m.out_features for m in linears),
        parameters=sum(p.numel() for p in unique.values()), tensors=len(unique),
        vectors=sum(p.numel() for p in unique.values() if p.dim() < 2),
        largest_block=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
        layers=getattr(model, "n_layers", None) or (len(blocks) or None),
        width=getattr(model, "d_model", None), context=getattr(model, "block_size", None))


@dataclass
class Estimate:
    name: str
    weights: float
    grads: float
    optimizer: float
    activations: float
    note: str = ""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def optimizer_bytes_per_parameter(config: LoadedConfig) -> tuple[int, str]:
    """Bytes of optimizer state per parameter: of the one optimizer, the largest of named ones, 0 for none."""
    sections = ([config.run.optimizer] if config.run.optimizer is not None
                else list((config.run.optimizers or {}).values()))
    if not sections:
        return 0, "none (a solver)"
    sized = [_state_bytes(section) for section in sections]
    k = max(bytes_ for bytes_, _ in sized)
    return k, ", ".join(name for _, name in sized)


def _state_bytes(section: dict) -> tuple[int, str]:
    name = section["_component_"].rsplit(".", 1)[-1]
    if name == "SGD" and not section.get("momentum"):
        return 0, name
    if name in OPTIMIZER_BYTES:
        return OPTIMIZER_BYTES[name], name
    return 8, f"{name} (assumed Adam-like: 8 bytes/parameter)"


def activation_bytes(facts: ModelFacts, micro_batch: int, precision_bytes: int, checkpointed: bool) -> float:
    if not (facts.layers and facts.width and facts.context):
        return 0.0
    per_layer = facts.context * micro_batch * facts.width * (2 if checkpointed else 34 * precision_bytes / 2)
    return facts.layers * per_layer


def training_estimates(config: LoadedConfig, facts: ModelFacts, gpus: int) -> list[Estimate]:
    """Per-GPU bytes of every strategy for this config's precision, batch and optimizer."""
    tc = config.run.trainer
    k, _ = optimizer_bytes_per_parameter(config)
    steps = 4 * facts.tensors if k == 8 else 0  # Adam's per-tensor step counters (fp32 scalars)
    psi, n = facts.parameters, gpus
    low = tc.precision in ("bf16", "fp16", "auto")  # auto is bf16 on the GPUs being planned for
    p = 2 if low else 4
    micro = max(1, tc.batch_size // (gpus * tc.grad_accum_steps))
    act = activation_bytes(facts, micro, p, config.run.strategy.activation_checkpointing)
    gathered = 2 * facts.largest_block * p  # FSDP/ZeRO-3 hold the running block and the prefetched one
    estimates = [
        Estimate("single / ddp", 4 * psi, 4 * psi, k * psi + steps, act, "every GPU holds everything"),
        # FSDP2 keeps one (unsharded) step counter per parameter tensor on every rank
        Estimate("fsdp2", 4 * psi / n, 4 * psi / n, k * psi / n + steps, act + gathered,
                 "sharded fp32 weights; gathered blocks in compute precision"),
        Estimate("zero3_reference", 4 * psi / n, 4 * psi / n, k * psi / n, act + gathered, "as fsdp2"),
    ]
    master = 4 * psi / n
    for stage in (1, 2, 3):
        weights = p * psi / (n if stage == 3 else 1)
        grads = p * psi / (n if stage >= 2 else 1)
        estimates.append(Estimate(f"deepspeed zero-{stage}", weights, grads, master + k * psi / n + 8,
                                  act + (gathered if stage == 3 else 0),
                                  "fp32 master copy of each shard" + (" (gradients whole during backward)"
                                                                      if stage == 1 else "")))
    # the seed's "finetune on two GPUs": a frozen fp16 base split by layers (a pipeline), training only
    # the biases and norm gains (fp32 copies, gradients and Adam state for those alone)
    trainable = facts.vectors
    estimates.append(Estimate(f"pipeline x{n}, biases", 2 * psi / n, 4 * trainable / n,
                              (4 + k) * trainable / n, act / n + gathered / 2,
                              f"frozen fp16 base split over {n} GPU(s); trains {trainable:,} parameters"))
    return estimates


def generation_estimates(facts: ModelFacts, batch: int = 1, context: int | None = None) -> list[Estimate]:
    """fp16 weights, or LLM.int8(): the blocks' Linear weights at 1 byte plus an fp32 scale per row, the
    rest (embeddings, output head, biases, norms) kept in fp16; plus the KV cache in fp16."""
    context = context or facts.context or 0
    cache = 2 * (facts.layers or 0) * (facts.width or 0) * context * batch * 2  # K and V, fp16
    psi = facts.parameters
    int8 = facts.linear_weights + 4 * facts.linear_rows + 2 * (psi - facts.linear_weights)
    return [Estimate("generate fp16", 2 * psi, 0, 0, cache, f"weights + KV cache ({context} tokens x {batch})"),
            Estimate("generate int8", int8, 0, 0, cache,
                     "LLM.int8() blocks: 1 byte/weight + an fp32 scale per row; embeddings fp16")]


def human(size: float) -> str:  # bytes
    for unit, scale in (("G", GIB), ("M", 2**20), ("K", 2**10)):
        if size >= 0.1 * scale:
            return f"{size / scale:.2f}{unit}"
    return f"{size:.0f}B"


def fits(total: float, gpu_bytes: int) -> bool:
    return total <= gpu_bytes * 0.95 - GIB


def render(config: LoadedConfig, gpus: int, gpu_bytes: int) -> str:
    facts = model_facts(config)
    _, optimizer = optimizer_bytes_per_parameter(config)
    lines = [f"{config.source}: {facts.parameters:,} parameters ({format_count(facts.parameters)}), "
             f"{gpus} GPU(s) of {gpu_bytes / GIB:.0f} GiB, optimizer {optimizer}, precision "
             f"{config.run.trainer.precision}, global batch {config.run.trainer.batch_size}",
             "", f"{'per GPU (GiB=G)':<20}{'weights':>10}{'grads':>10}{'optimizer':>11}{'activations':>13}"
             f"{'total':>10}  fits"]
    def row(estimate: Estimate) -> str:
        sizes = [human(v) for v in (estimate.weights, estimate.grads, estimate.optimizer, estimate.activations,
                                    estimate.total)]
        return (f"{estimate.name:<20}{sizes[0]:>10}{sizes[1]:>10}{sizes[2]:>11}{sizes[3]:>13}{sizes[4]:>10}  "
                f"{'yes' if fits(estimate.total, gpu_bytes) else 'NO '}  {estimate.note}")

    lines += [row(e) for e in training_estimates(config, facts, gpus)]
    lines += [""] + [row(e) for e in generation_estimates(facts)]
    lines.append("\ngeneration holds one copy of the weights per GPU; split a model over several GPUs with a "
                 "pipeline (each holds 1/N of the layers).")
    return "\n".join(lines)
