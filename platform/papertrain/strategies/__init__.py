"""Strategies: how one training loop runs on one process or many.

    single            one process, one device
    ddp               data parallel: whole model per rank, gradients all-reduced
    fsdp2             PyTorch's fully sharded data parallel (ZeRO-3 style), DCP checkpoints
    deepspeed         DeepSpeed ZeRO stage 1, 2 or 3 (strategy.stage), optional CPU offload
    zero3_reference   ZeRO-3 written from torch.distributed primitives (provided by recipes/scaling/zero3)
    pipeline          GPipe: the model's layers split into one stage per rank, micro-batches flowing through
"""

from __future__ import annotations

from papertrain.config.components import locate
from papertrain.distributed import ProcessInfo, connect, process_info
from papertrain.errors import PapertrainError
from papertrain.strategies.base import SingleDevice, Strategy, local_bytes, pick_device, pick_precision

ENGINE_STRATEGIES = {
    "single": "papertrain.strategies.base.SingleDevice",
    "ddp": "papertrain.strategies.ddp.DDP",
    "fsdp2": "papertrain.strategies.fsdp2.FSDP2",
    "deepspeed": "papertrain.strategies.deepspeed_zero.DeepSpeed",
    "pipeline": "papertrain.strategies.pipeline.Pipeline",
}


def strategy_table() -> dict[str, str]:
    """Every strategy by name: the engine's own, then those recipes provide (their meta.yaml `provides:`)."""
    from papertrain.registry import provided

    return {**ENGINE_STRATEGIES, **provided("strategies")}


def build_strategy(options, trainer, info: ProcessInfo | None = None, custom_step: bool = False) -> Strategy:
    """Join this job's processes and build the strategy `options.name` for this rank."""
    info = info or process_info()
    device = pick_device(trainer.device, info.local_rank)
    if options.name != "single" and not info.distributed and options.world_size is None:
        raise PapertrainError(
            f"strategy={options.name} spreads training over several processes, but this process is alone "
            f"(no launcher environment: RANK/WORLD_SIZE or an srun step)",
            f"start N processes with `papertrain launch --nproc N ...` (or torchrun, deepspeed, srun); for one "
            f"process use strategy=single, or strategy.world_size=1 to run {options.name} on a single rank")
    if options.async_checkpoint and options.name in ("deepspeed", "zero3_reference"):
        raise PapertrainError(f"strategy.async_checkpoint is implemented for single, ddp and fsdp2, not "
                              f"strategy={options.name} (which writes its checkpoints its own way)",
                              "drop strategy.async_checkpoint, or use strategy=fsdp2")
    connect(info, device.type, expected_world_size=options.world_size,
            single_rank_group=options.name != "single")
    precision = pick_precision(trainer.precision, device)
    cls = strategy_class(options.name)
    strategy = cls(info, device, precision, options)
    strategy.configure(trainer.batch_size, trainer.grad_accum_steps, trainer.grad_clip, custom_step)
    return strategy


def strategy_class(name: str) -> type[Strategy]:
    """The class of strategy `name` (a name in the table; never a path read from a file)."""
    table = strategy_table()
    if name not in table:
        raise PapertrainError(f"unknown strategy '{name}'", f"one of: {', '.join(table)}")
    return locate(table[name])


def checkpoint_formats() -> dict[str, str]:
    """Every checkpoint format a strategy writes -> the (first) strategy that reads it."""
    formats: dict[str, str] = {}
    for name in strategy_table():
        formats.setdefault(strategy_class(name).checkpoint_format, name)
    return formats


__all__ = ["ENGINE_STRATEGIES", "SingleDevice", "Strategy", "build_strategy", "checkpoint_formats", "local_bytes",
           "pick_device", "strategy_class", "strategy_table",
           "pick_precision"]
