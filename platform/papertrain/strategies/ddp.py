"""Distributed data parallel: every rank holds the whole model and optimizer, computes gradients on its
share of the batch, and the gradients are averaged (all-reduced, bucketed and overlapped with the
backward pass) before every rank takes the same optimizer step.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from papertrain.strategies.base import Strategy


class DDP(Strategy):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def micro_step_context(self, model: nn.Module, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        # accumulate locally; all-reduce once, in the last micro-batch's backward pass
        return contextlib.nullcontext() if is_last_micro_step else model.no_sync()
