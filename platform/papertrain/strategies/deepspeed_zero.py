"""DeepSpeed ZeRO, stages 1, 2 and 3 (Rajbhandari et al., 2020), with optional CPU offload.

ZeRO removes the redundancy of data parallelism stage by stage: stage 1 partitions the optimizer state
across the ranks, stage 2 also the gradients, stage 3 also the parameters (each rank then holds 1/N of
all model state and gathers a layer's parameters only while it runs). The DeepSpeed engine does the
work; this strategy maps the recipe's settings onto its config and keeps the trainer's loop unchanged:

- `trainer.batch_size` (global), `trainer.grad_accum_steps` and `trainer.grad_clip` become DeepSpeed's
  batch sizes and `gradient_clipping` (always passed: DeepSpeed 0.19 clips at 1.0 when it is unset);
- the recipe's torch optimizer is handed to the engine (`zero_allow_untested_optimizer`), the recipe's
  LR schedule keeps driving it;
- `strategy.meta_init` builds the model inside `deepspeed.zero.Init`, so stage 3 partitions every layer
  as soon as it is constructed;
- checkpoints go through the engine, into `deepspeed/`, and are read back with `torch.load(weights_only=True)`:
  DeepSpeed's own loader unpickles arbitrary objects, so every load it does runs inside
  `weights_only_loads()`, which allows only the three DeepSpeed types its files contain.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from papertrain.checkpoint import load_rng, load_train_state, save_rng
from papertrain.errors import PapertrainError
from papertrain.strategies.base import (FROZEN_PARAMETERS, ModelBuilder, Optimizers, OptimizersBuilder, Strategy,
                                        checkpoint_activations, initialise, local_bytes, refuse_frozen_base_on_meta)

DEEPSPEED_FOLDER = "deepspeed"
FORMAT = "deepspeed"


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside this block reads tensors and plain data only, never arbitrary objects."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    original = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
            return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


STALE_LOCK_S = 600  # DeepSpeed's first build of its CPU communication op takes ~1 minute


def remove_stale_build_lock(name: str = "deepspeed_shm_comm") -> None:
    """A first DeepSpeed run compiles a C++ op under torch's file lock; killed meanwhile (Ctrl-C twice, a job
    cancelled), it leaves the lock behind, and every later run waits on it forever. A lock older than any
    build takes is such a leftover: remove it, and say so."""
    import time

    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    except Exception:
        return
    if not lock.is_file():
        return
    age = time.time() - lock.stat().st_mtime
    if age > STALE_LOCK_S:
        lock.unlink(missing_ok=True)
        print(f"warning: removed {lock}, left {age / 60:.0f} minutes ago by a DeepSpeed build that was interrupted "
              "(every later run would have waited on it forever)", flush=True)


class DeepSpeed(Strategy):
    name = "deepspeed"
    checkpoint_format = FORMAT
    # its engine holds one optimizer, steps it inside backward() and keeps gradients in its own partitions:
    # nothing but the default step (one loss, one optimizer, one backward pass per micro-batch)
    capabilities = frozenset({FROZEN_PARAMETERS})  # (the biases-only NeoX finetune runs under ZeRO-3)
    limits = "its engine holds one optimizer, steps it inside backward and keeps the gradients in its own partitions"

    def deepspeed_config(self, batch_size: int, accumulation: int, grad_clip: float | None) -> dict[str, Any]:
        options = self.options
        zero: dict[str, Any] = {"stage": options.stage}
        if options.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if options.offload_params:
            if options.stage != 3:
                raise PapertrainError(f"strategy.offload_params needs ZeRO stage 3 (got strategy.stage={options.stage})",
                                      "set strategy.stage=3, or drop strategy.offload_params")
            zero["offload_param"] = {"device": "cpu"}
        config = {
            "train_batch_size": batch_size,
            "train_micro_batch_size_per_gpu": batch_size // (self.world_size * accumulation),
            "gradient_accumulation_steps": accumulation,
            "gradient_clipping": float(grad_clip or 0.0),
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16"},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        config.update(options.deepspeed or {})
        return config

    def configure(self, batch_size: int, accumulation: int, grad_clip: float | None, custom_step: bool = False) -> None:
        super().configure(batch_size, accumulation, grad_clip, custom_step)
        self.ds_config = self.deepspeed_config(batch_size, accumulation, grad_clip)

    def build_model(self, build: ModelBuilder) -> nn.Module:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.device.type == "cuda" else "cpu")
        if self.is_main:
            remove_stale_build_lock()
        self.barrier()
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        if self.options.meta_init:
            # every layer is partitioned as soon as it is constructed; a model's own initialisation after
            # construction would write into empty partitions, so it is redone one gathered module at a time
            with deepspeed.zero.Init(config_dict_or_path=self.ds_config, enabled=self.options.stage == 3):
                model = build()
            refuse_frozen_base_on_meta(model)
            if self.options.stage == 3:
                initialise(model, gather=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
        else:
            model = build()
        if self.activation_checkpointing:
            checkpoint_activations(model)
        return model

    def prepare(self, build_model: ModelBuilder, build_optimizers: OptimizersBuilder
                ) -> tuple[nn.Module, Optimizers]:
        import deepspeed

        model = self.build_model(build_model)
        optimizers = build_optimizers(model)
        (optimizer,) = optimizers.values()  # one optimizer: papertrain validate refuses more
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.engine = engine
        return engine, optimizers

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine keeps bf16/fp16 weights itself

    def backward(self, loss: torch.Tensor) -> None:
        # the trainer already divided the loss by the accumulation steps; the engine must not again
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # applies the optimizer only at the accumulation boundary

    def clip_and_step(self, model: nn.Module, optimizer: Any, max_norm: float | None,
                      parameters: Any = None) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        pass  # the engine clears gradients in step()

    def save(self, folder: Path, model: nn.Module, optimizers: Optimizers, train_state: dict[str, Any]) -> list[Any]:
        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_FOLDER, save_latest=False)
        if self.is_main:
            torch.save(train_state, folder / "train_state.pt")
        save_rng(folder, self.rank)
        return []

    def load(self, folder: Path, model: nn.Module, optimizers: Optimizers) -> dict[str, Any]:
        from papertrain.checkpoint import read_meta

        meta = read_meta(folder)
        if meta.get("format") != FORMAT:
            raise PapertrainError(f"{folder} was written by strategy '{meta.get('strategy')}', not deepspeed",
                                  f"resume with strategy={meta.get('strategy')}")
        if meta.get("world_size") != self.world_size:
            raise PapertrainError(f"{folder} was written by {meta.get('world_size')} DeepSpeed ranks; this job has "
                                  f"{self.world_size}", "resume with the same number of processes (DeepSpeed "
                                  "checkpoints are partitioned per rank), or `papertrain export` it")
        with weights_only_loads():
            path, _ = self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_FOLDER, load_lr_scheduler_states=False)
        if path is None:
            raise PapertrainError(f"DeepSpeed found no checkpoint in {folder / DEEPSPEED_FOLDER}")
        load_rng(folder, self.rank)
        return load_train_state(folder)

    @classmethod
    def full_weights(cls, folder: Path) -> dict[str, torch.Tensor]:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loads():
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED_FOLDER))

    def parameter_bytes(self, parameter: torch.Tensor) -> int:
        """Under stage 3 a parameter's own storage is an empty placeholder; its shard is `ds_tensor`."""
        return local_bytes(parameter.ds_tensor) if hasattr(parameter, "ds_tensor") else local_bytes(parameter)

    def memory_by_kind(self, model: nn.Module, optimizers: Optimizers) -> dict[str, int]:
        """ZeRO's fp32 master partitions live in its own buffers (stage 3 also swaps them out of the
        optimizer's param_groups between steps), so they are counted from there."""
        memory = super().memory_by_kind(model, optimizers)
        (optimizer,) = optimizers.values()
        zero = self.engine.optimizer
        masters = (getattr(zero, "fp32_partitioned_groups_flat", None)
                   or getattr(zero, "single_partition_of_fp32_groups", None) or [])
        listed = {id(p) for group in optimizer.param_groups for p in group["params"]}
        memory["memory/optimizer_bytes"] += sum(local_bytes(t) for t in masters if id(t) not in listed)
        return memory
