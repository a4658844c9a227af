"""Distributed data parallel: every rank holds the whole model and optimizer, computes gradients on its
share of the batch, and the gradients are averaged before every rank takes the same optimizer step.

Two ways to average, one result:
- the default step: torch's DistributedDataParallel wraps the model and all-reduces gradients in buckets
  while the backward pass is still running (overlapping communication with compute);
- a task that owns its step (a GAN calling its generator and discriminator separately, PPO taking many
  minibatch steps per rollout) calls submodules DDP's wrapper never sees, so the model stays unwrapped and
  each optimizer's gradients are all-reduced, in one flattened message, just before that optimizer steps.
Every rank starts from the same weights (the model is built from the same seed everywhere), so the ranks
stay identical either way.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from papertrain.strategies.base import Strategy


class DDP(Strategy):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.custom_step:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def micro_step_context(self, model: nn.Module, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        # accumulate locally; all-reduce once, in the last micro-batch's backward pass
        if is_last_micro_step or not isinstance(model, DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def synchronize_gradients(self, optimizer: Any) -> None:
        if not self.custom_step:
            return  # DistributedDataParallel averaged them during the backward pass
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        for grad, piece in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(piece.view_as(grad))
