"""How the one training loop runs on hardware: the strategy interface.

The trainer never asks "am I distributed?". It calls the strategy to place the model, run the backward
pass, clip, step, average metrics and save or load checkpoints. `SingleDevice` is one process on one
device; the distributed strategies implement the same methods.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from papertrain.checkpoint import (load_model_weights, load_train_state, save_model_weights,
                                   save_train_state)
from papertrain.errors import PapertrainError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PapertrainError(f"trainer.device={name} but this machine has no CUDA GPU",
                              "use trainer.device=cpu (or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PapertrainError(f"trainer.device={name} but MPS is not available", "use trainer.device=cpu")
    return device


def pick_precision(name: str, device: torch.device) -> str:
    """`auto` is bf16 on GPUs that support it and fp32 elsewhere (CPU autocast rarely pays off)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise PapertrainError("trainer.precision=fp16 needs a GPU (fp16 loss scaling on CPU is not supported)",
                              "use trainer.precision=bf16 or fp32 on CPU")
    return name


class Strategy:
    name = "base"
    rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, device: torch.device, precision: str):
        self.device = device
        self.precision = precision
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- building -------------------------------------------------------------------------------------
    def prepare_model(self, build: Callable[[], nn.Module]) -> nn.Module:
        return build().to(self.device)

    def prepare_optimizer(self, model: nn.Module, build: Callable[[nn.Module], torch.optim.Optimizer]
                          ) -> torch.optim.Optimizer:
        return build(model)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    # -- one step -------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def micro_step_context(self, model: nn.Module, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Around forward+backward of one micro-batch (DDP skips the gradient sync until the last)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip_and_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None
                      ) -> torch.Tensor | None:
        """Unscale, clip the global gradient norm, step (gradients are kept); returns the norm before clipping."""
        if self.scaler:
            self.scaler.unscale_(optimizer)
        norm = None
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return norm

    # -- across ranks ---------------------------------------------------------------------------------
    def mean_across_ranks(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def barrier(self) -> None:
        pass

    # -- checkpoints ----------------------------------------------------------------------------------
    def save(self, folder: Path, model: nn.Module, train_state: dict[str, Any]) -> None:
        if self.scaler:
            train_state = {**train_state, "grad_scaler": self.scaler.state_dict()}
        save_model_weights(self.unwrap(model), folder)
        save_train_state(train_state, folder)

    def load(self, folder: Path, model: nn.Module) -> dict[str, Any]:
        load_model_weights(self.unwrap(model), folder)
        state = load_train_state(folder)
        if self.scaler and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        return state

    def teardown(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.name} on {self.device} ({self.precision})"


class SingleDevice(Strategy):
    """One process, one device: a laptop CPU, one GPU, or Apple's MPS."""

    name = "single"


def memory_by_kind(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds in parameters, gradients and optimizer state (model state, per ZeRO)."""
    def local_bytes(t: torch.Tensor) -> int:
        local = t.to_local() if hasattr(t, "to_local") else t  # DTensor shards count only their shard
        return local.numel() * local.element_size()

    params = sum(local_bytes(p) for p in model.parameters())
    grads = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    optim = sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor))
    return {"memory/params_bytes": params, "memory/grads_bytes": grads, "memory/optimizer_bytes": optim}

