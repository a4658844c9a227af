"""`strategy=zero3_reference`: the ZeRO-3 of model.py as a strategy of the engine.

Plumbing around the idea: the optimizer is built over the shards, clipping uses the global norm over
every rank's shards, and a checkpoint is each rank's shards and optimizer state as safetensors plus a
layout that says how to put them back together (`consolidate`, used by `papertrain export`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from papertrain.checkpoint import load_rng, load_train_state, read_meta, save_rng
from papertrain.errors import PapertrainError
from papertrain.recipes.scaling.zero3.model import Zero3
from papertrain.strategies.base import (REPEATED_BACKWARD, ModelBuilder, Optimizers, OptimizersBuilder, Strategy,
                                        blocks_of, local_bytes, optimizer_bytes)

FORMAT = "zero3-reference"
FOLDER = "zero3"


class Zero3Reference(Strategy):
    name = "zero3_reference"
    checkpoint_format = FORMAT
    # the default step, and an extra backward pass (gathered by the same hooks); one optimizer over the shards.
    # Not frozen parameters: a unit's parameters are flattened into one shard that trains as a whole.
    capabilities = frozenset({REPEATED_BACKWARD})
    limits = ("a reference implementation of the sharding: the default step, one optimizer over the shards, "
              "every parameter trained")

    def build_model(self, build: ModelBuilder) -> nn.Module:
        for option in ("meta_init", "activation_checkpointing", "offload_params", "offload_optimizer"):
            if getattr(self.options, option, False):
                raise PapertrainError(f"strategy.{option} is not implemented by strategy=zero3_reference "
                                      "(a reference implementation of the sharding itself)",
                                      "use strategy=fsdp2 or strategy=deepspeed for it")
        model = build().to(self.device)
        self.zero = Zero3(model, blocks_of(model))
        return model

    def prepare(self, build_model: ModelBuilder, build_optimizers: OptimizersBuilder
                ) -> tuple[nn.Module, Optimizers]:
        model = self.build_model(build_model)
        self.shard_holder = nn.Module()  # what the optimizer sees: this rank's shards, and only them
        self.shard_holder.shards = nn.ParameterList(self.zero.shards())
        return model, build_optimizers(self.shard_holder)

    def whole_model(self, model: nn.Module) -> Any:
        return self.zero.held()

    def clip_and_step(self, model: nn.Module, optimizer: Any, max_norm: float | None,
                      parameters: Any = None) -> torch.Tensor | float | None:
        self.zero.finish_backward()
        shards = [p for p in self.zero.shards() if p.grad is not None]
        squares = torch.stack([p.grad.float().pow(2).sum() for p in shards]).sum() if shards else torch.zeros(())
        dist.all_reduce(squares)  # the norm of the whole gradient, from every rank's pieces
        norm = math.sqrt(float(squares))
        if max_norm is not None and norm > max_norm:
            for p in shards:
                p.grad.mul_(max_norm / (norm + 1e-6))
        optimizer.step()
        return norm

    def memory_by_kind(self, model: nn.Module, optimizers: Optimizers) -> dict[str, int]:
        (optimizer,) = optimizers.values()
        shards = self.zero.shards()  # the model's own parameters hold no memory between uses
        return {"memory/params_bytes": sum(local_bytes(p) for p in shards),
                "memory/grads_bytes": sum(local_bytes(p.grad) for p in shards if p.grad is not None),
                "memory/optimizer_bytes": optimizer_bytes(optimizer, self.shard_holder)}

    @classmethod
    def full_weights(cls, folder: Path) -> dict[str, torch.Tensor]:
        return consolidate(folder)

    # -- checkpoints: every rank's shards, and how they fit together ---------------------------------------
    def save(self, folder: Path, model: nn.Module, optimizers: Optimizers, train_state: dict[str, Any]) -> list[Any]:
        (optimizer,) = optimizers.values()
        tensors, scalars = {}, {}
        for index, shard in enumerate(self.zero.shards()):
            tensors[f"{index}.shard"] = shard.detach()
            for key, value in optimizer.state.get(shard, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{index}.{key}"] = value
                else:
                    scalars[f"{index}.{key}"] = value
        (folder / FOLDER).mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / FOLDER / f"rank_{self.rank:05d}.safetensors"))
        if self.is_main:
            (folder / FOLDER / "layout.json").write_text(json.dumps(self.zero.layout()))
            hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            torch.save({**train_state, "optimizer_groups": hyper, "optimizer_scalars": scalars}, folder / "train_state.pt")
        save_rng(folder, self.rank)
        return []

    def load(self, folder: Path, model: nn.Module, optimizers: Optimizers) -> dict[str, Any]:
        (optimizer,) = optimizers.values()
        meta = read_meta(folder)
        if meta.get("format") != FORMAT or meta.get("world_size") != self.world_size:
            raise PapertrainError(f"{folder} was written by strategy '{meta.get('strategy')}' on "
                                  f"{meta.get('world_size')} ranks; zero3_reference resumes only its own "
                                  f"checkpoints on the same number of ranks ({self.world_size})",
                                  "resume with the strategy and process count that wrote it, or `papertrain export`")
        tensors = load_file(str(folder / FOLDER / f"rank_{self.rank:05d}.safetensors"))
        state = load_train_state(folder)
        for index, shard in enumerate(self.zero.shards()):
            with torch.no_grad():
                shard.copy_(tensors[f"{index}.shard"])
            entries = {key.split(".", 1)[1]: value for key, value in tensors.items()
                       if key.startswith(f"{index}.") and key != f"{index}.shard"}
            entries.update({key.split(".", 1)[1]: value for key, value in state["optimizer_scalars"].items()
                            if key.startswith(f"{index}.")})
            if entries:
                optimizer.state[shard] = entries
        for group, hyper in zip(optimizer.param_groups, state["optimizer_groups"]):
            group.update(hyper)
        load_rng(folder, self.rank)
        return state


def consolidate(folder: Path) -> dict[str, torch.Tensor]:
    """Full tensors from every rank's shards (for `papertrain export`); tied names share one tensor."""
    layout = json.loads((folder / FOLDER / "layout.json").read_text())
    ranks = [load_file(str(folder / FOLDER / f"rank_{r:05d}.safetensors")) for r in range(layout["world_size"])]
    weights: dict[str, torch.Tensor] = {}
    index = 0
    for unit in layout["units"]:
        for group in unit["groups"]:
            flat = torch.cat([rank[f"{index}.shard"] for rank in ranks])
            for name, shape, offset in zip(group["names"], group["shapes"], group["offsets"]):
                size = math.prod(shape)
                weights[name] = flat[offset:offset + size].view(shape).clone()
            for alias, original in group["aliases"].items():
                weights[alias] = weights[original]
            index += 1
    return weights
