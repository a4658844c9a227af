"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`).

Each block's parameters, gradients and optimizer state are split across the ranks (ZeRO stage 3):
a rank holds 1/N of the model state. Just before a block runs, its full parameters are all-gathered;
right after, they are freed again (`reshard_after_forward`); its gradients are reduce-scattered so
each rank keeps only its shard's, and each rank's optimizer steps only its shard. Sharding is per block
(see `blocks_of`), then the root takes what is left (embeddings, final norm). A model whose parts are
called separately (a GAN's generator and discriminator) names them in `parallel_units()`, and each part
is sharded as a root of its own.

With `meta_init`, the model is built on PyTorch's meta device (shapes, no memory), sharded, and only
then given memory, one shard per rank, and initialised module by module (`initialise`): a model
larger than one rank's memory never exists whole anywhere. (The random initial values then
differ from a one-process run's, since each rank draws its own shard; load weights to compare runs.)
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from papertrain.errors import PapertrainError
from papertrain.strategies.base import (ModelBuilder, Strategy, blocks_of, checkpoint_activations, initialise,
                                        refuse_frozen_base_on_meta)


class FSDP2(Strategy):
    name = "fsdp2"

    def build_model(self, build: ModelBuilder) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        if self.precision == "fp16":
            raise PapertrainError("strategy=fsdp2 runs bf16 or fp32 here (fp16 would need a sharded loss scaler)",
                                  "use trainer.precision=bf16")
        options = self.options
        if options.meta_init:
            with torch.device("meta"):
                model = build()
            refuse_frozen_base_on_meta(model)
        else:
            model = build().to(self.device)
        if self.activation_checkpointing:
            checkpoint_activations(model)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if self.precision == "bf16" else MixedPrecisionPolicy())
        offload = CPUOffloadPolicy() if options.offload_params or options.offload_optimizer else OffloadPolicy()
        shard = dict(mesh=mesh, mp_policy=policy, offload_policy=offload,
                     reshard_after_forward=options.reshard_after_forward)
        self.roots = [model.get_submodule(name) for name in parallel_units(model)]
        for root in self.roots:
            for block in blocks_of(root):
                fully_shard(block, **shard)
            fully_shard(root, **shard)
        if options.meta_init:
            model.to_empty(device="cpu" if options.offload_params or options.offload_optimizer else self.device)
            initialise(model)  # each rank fills only its shards
        for root in self.roots:
            register_methods(root)
        return model

    def micro_step_context(self, model: nn.Module, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        for root in self.roots:
            root.set_requires_gradient_sync(is_last_micro_step)  # reduce-scatter once per optimizer step
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts parameters instead


def parallel_units(model: nn.Module) -> list[str]:
    """The parts of a model that are called on their own (a GAN's generator and discriminator): each is
    sharded as a root of its own, so calling it gathers its parameters. Default: the model is one root."""
    declared = getattr(model, "parallel_units", None)
    return list(declared()) if callable(declared) else [""]


def register_methods(model: nn.Module) -> None:
    """Let public methods other than forward (greedy_decode, generate, ...) gather the root's sharded
    parameters the way forward does."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    for name, member in inspect.getmembers(type(model), inspect.isfunction):
        if not name.startswith("_") and name != "forward" and not hasattr(nn.Module, name):
            register_fsdp_forward_method(model, name)
