"""
# ZeRO stage 3, from torch.distributed primitives (Rajbhandari et al., 2020; ZeRO-Infinity, 2021)

Data parallelism copies everything to every rank. With mixed-precision Adam, a model of Ψ parameters
holds (2 + 2 + 12)Ψ bytes of *model states* per rank: fp16 weights, fp16 gradients, and K = 12 bytes of
optimizer state (fp32 master weights, momentum, variance) (ZeRO §3.1). On N ranks, N - 1 of those
copies are redundant. ZeRO removes the redundancy in three stages (§5):

    stage 1   partition the optimizer states               (2 + 2 + K/N) Ψ
    stage 2   ... and the gradients                         (2 + (2 + K)/N) Ψ
    stage 3   ... and the parameters themselves             (2 + 2 + K) Ψ / N

Stage 3 means no rank ever holds a whole layer for longer than it takes to compute with it:

1. **Flatten and shard.** Each block's parameters are flattened into one vector, padded to a multiple
   of N, and cut into N equal shards; rank r keeps shard r only. The optimizer is built over the shards,
   so each rank updates 1/N of the model with 1/N of the optimizer state.
2. **Gather just before use, free right after.** Before a block's forward pass, `all_gather` rebuilds
   its full flat vector from the N shards; the block's parameters are views into it. After the block
   has run, the memory is released. The gather for the *next* block is started asynchronously while
   this one computes (prefetch), so communication hides behind computation.
3. **Gather again for backward.** The backward pass needs the weights again (∂L/∂x = ∂L/∂y · Wᵀ), so
   a backward pre-hook re-gathers each block just before its gradients are computed, prefetching the
   block that comes before it.
4. **Reduce-scatter the gradients.** Once every parameter of a block has its gradient, the full
   gradient vector is summed over ranks and scattered in one collective, `reduce_scatter`: rank r
   receives exactly the summed gradient of its own shard (divided by N: data parallelism averages).
   The full gradients are freed; the optimizer steps shard by shard.

Per rank the model states shrink to 1/N; the price is communication: one all-gather per block in the
forward pass, one more in the backward pass, and a reduce-scatter instead of an all-reduce (1.5x the
traffic of plain data parallelism, §7.2.3).

The mechanism that lets a parameter exist without memory: each parameter's tensor is a *view* into a
flat buffer; releasing the block resizes the buffer's storage to zero bytes (the views, and any tensors
autograd saved for backward, stay valid objects), and gathering resizes it back and fills it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

# torch 2.13 renamed the tensor collectives; older releases (the project supports torch >= 2.4) have the old names
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# The root module's inputs are token ids, which need no gradient, so its backward pre-hook fires on the
# gradient of its *outputs*: exactly the moment it is wanted for (re-gathering before backward).
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                                          "to module outputs since no inputs require gradients")


@dataclass
class FlatGroup:
    """Parameters of one block that share an optimizer group (weight decay on or off), flattened."""

    names: list[str]
    params: list[nn.Parameter]
    shapes: list[torch.Size]
    offsets: list[int]  # where each parameter starts in the flat vector
    numel: int  # real elements
    padded: int  # numel rounded up to a multiple of the world size
    shard: nn.Parameter  # this rank's slice: what the optimizer steps
    full: torch.Tensor  # the gathered flat vector; its storage exists only while the block is in use
    aliases: dict[str, str] = field(default_factory=dict)  # tied names -> the name stored


class ShardedUnit:
    """One block (or the root's leftover parameters), flattened, sharded and gathered on demand."""

    def __init__(self, name: str, groups: list[FlatGroup], rank: int, world: int):
        self.name, self.groups, self.rank, self.world = name, groups, rank, world
        self.pending: list[dist.Work] = []  # an in-flight (prefetched) all-gather
        self.gathered = False
        self.grads_waiting = 0  # parameters whose gradient has not arrived yet in this backward pass

    # -- 2. gather before use, free after --------------------------------------------------------------
    def gather(self, asynchronous: bool = False) -> None:
        """Give the full flat vectors their memory back and fill them from every rank's shard."""
        if self.gathered or self.pending:
            return
        for group in self.groups:
            storage = group.full.untyped_storage()
            storage.resize_(group.padded * group.full.element_size())
            work = all_gather(group.full, group.shard.detach(), async_op=asynchronous)
            if asynchronous:
                self.pending.append(work)
        if not asynchronous:
            self.gathered = True

    def wait(self) -> None:
        """Make sure the parameters are whole (finishing a prefetch, or gathering now)."""
        if self.pending:
            for work in self.pending:
                work.wait()
            self.pending.clear()
            self.gathered = True
        elif not self.gathered:
            self.gather()

    def release(self) -> None:
        """Free the full parameters: their views stay, with zero bytes behind them."""
        for group in self.groups:
            group.full.untyped_storage().resize_(0)
        self.gathered = False

    # -- 4. reduce-scatter the gradients ---------------------------------------------------------------
    def reduce_scatter_gradients(self) -> None:
        """Sum every rank's full gradient, keep this rank's shard of the sum (averaged), free the rest."""
        for group in self.groups:
            flat = torch.zeros(group.padded, dtype=group.shard.dtype, device=group.shard.device)
            for param, offset in zip(group.params, group.offsets):
                if param.grad is not None:
                    flat[offset:offset + param.numel()] = param.grad.reshape(-1)
                    param.grad = None
            mine = torch.empty_like(group.shard)
            reduce_scatter(mine, flat, op=dist.ReduceOp.SUM)
            mine /= self.world
            group.shard.grad = mine if group.shard.grad is None else group.shard.grad + mine


class Zero3:
    """Shard a model's blocks across the ranks and install the hooks that gather, free and reduce."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], prefetch: bool = True):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.prefetch = prefetch
        self.holding = False  # while True (evaluation: `held`), forward hooks keep every unit gathered
        self.units: list[ShardedUnit] = []
        in_blocks = {id(p) for block in blocks for p in block.parameters()}
        root_params = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in in_blocks]
        # the root first: it runs first (embeddings) and last (output), around all the blocks
        self.units.append(self._shard("root", root_params))
        names = {id(module): name for name, module in model.named_modules()}
        for block in blocks:
            prefix = names[id(block)]
            self.units.append(self._shard(prefix, [(f"{prefix}.{n}", p)
                                                   for n, p in block.named_parameters(remove_duplicate=False)]))
        self._install(model, self.units[0])
        for block, unit in zip(blocks, self.units[1:]):
            self._install(block, unit)

    # -- 1. flatten and shard ------------------------------------------------------------------------------
    def _shard(self, unit_name: str, named: list[tuple[str, nn.Parameter]]) -> ShardedUnit:
        groups = []
        for decay in (True, False):  # weight decay applies to matrices only (see trainer.weight_decay_groups)
            members = [(n, p) for n, p in named if (p.dim() >= 2) == decay]
            if members:
                groups.append(self._flatten(members, decay))
        return ShardedUnit(unit_name, groups, self.rank, self.world)

    def _flatten(self, named: list[tuple[str, nn.Parameter]], decay: bool) -> FlatGroup:
        unique: list[tuple[str, nn.Parameter]] = []
        aliases: dict[str, str] = {}
        seen: dict[int, str] = {}
        for name, param in named:
            if id(param) in seen:  # a tied weight (GPT's embedding = output layer) is stored once
                aliases[name] = seen[id(param)]
            else:
                seen[id(param)] = name
                unique.append((name, param))
        shapes = [p.shape for _, p in unique]
        offsets, numel = [], 0
        for _, param in unique:
            offsets.append(numel)
            numel += param.numel()
        padded = -(-numel // self.world) * self.world
        reference = unique[0][1]
        flat = torch.zeros(padded, dtype=reference.dtype, device=reference.device)
        for (_, param), offset in zip(unique, offsets):
            flat[offset:offset + param.numel()] = param.detach().reshape(-1)
        size = padded // self.world
        shard = nn.Parameter(flat[self.rank * size:(self.rank + 1) * size].clone())
        shard.apply_weight_decay = decay  # read by trainer.weight_decay_groups
        for (_, param), offset in zip(unique, offsets):  # parameters become views into the flat buffer
            param.data = flat[offset:offset + param.numel()].view(param.shape)
        group = FlatGroup([n for n, _ in unique], [p for _, p in unique], shapes, offsets, numel, padded,
                          shard, flat, aliases)
        flat.untyped_storage().resize_(0)  # from now on only the shard has memory
        return group

    # -- 2-4. the hooks -----------------------------------------------------------------------------------
    def _install(self, module: nn.Module, unit: ShardedUnit) -> None:
        index = self.units.index(unit)
        following = self.units[index + 1] if index + 1 < len(self.units) else None
        preceding = self.units[index - 1] if index > 1 else None  # the root is gathered by its own hook

        def before_forward(module: nn.Module, args: object) -> None:
            unit.wait()
            if self.prefetch and following is not None:
                following.gather(asynchronous=True)  # overlap the next block's all-gather with this block

        def after_forward(module: nn.Module, args: object, output: object) -> None:
            if not self.holding:
                unit.release()

        def before_backward(module: nn.Module, grad_output: object) -> None:
            unit.wait()
            unit.grads_waiting = sum(1 for g in unit.groups for p in g.params if p.requires_grad)
            if self.prefetch and preceding is not None:
                preceding.gather(asynchronous=True)

        def after_gradient(param: torch.Tensor) -> None:
            unit.grads_waiting -= 1
            if unit.grads_waiting == 0:  # the block's backward pass is complete
                unit.reduce_scatter_gradients()
                unit.release()

        module.register_forward_pre_hook(before_forward)
        module.register_forward_hook(after_forward)
        module.register_full_backward_pre_hook(before_backward)
        for group in unit.groups:
            for param in group.params:
                param.register_post_accumulate_grad_hook(after_gradient)

    # -- what the rest of the engine needs --------------------------------------------------------------
    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Every unit gathered for the duration, whatever methods run (evaluation calls `encode` and
        `greedy_decode`, not only forward, and forward hooks alone would leave the root sharded)."""
        for unit in self.units:
            unit.wait()
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            for unit in self.units:
                unit.release()

    def finish_backward(self) -> None:
        """Reduce-scatter any block whose gradients did not all arrive (a parameter unused this step)."""
        for unit in self.units:
            if unit.grads_waiting > 0:
                unit.grads_waiting = 0
                unit.reduce_scatter_gradients()
                unit.release()

    def shards(self) -> list[nn.Parameter]:
        return [group.shard for unit in self.units for group in unit.groups]

    def layout(self) -> dict:
        """How to rebuild full tensors from the shards of every rank (for checkpoints and export)."""
        return {"world_size": self.world, "units": [
            {"name": unit.name, "groups": [
                {"names": g.names, "shapes": [list(s) for s in g.shapes], "offsets": g.offsets, "numel": g.numel,
                 "padded": g.padded, "aliases": g.aliases} for g in unit.groups]}
            for unit in self.units]}
