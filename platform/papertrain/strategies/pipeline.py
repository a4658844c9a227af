"""Pipeline parallelism, GPipe's schedule (Huang et al. 2019): a model too big for one device, split by
layers into consecutive *stages*, one per rank.

    stage 0: embed + blocks[0:k]  ->  stage 1: blocks[k:m]  ->  ...  ->  last stage: blocks[..] + head

Each rank holds only its stage's weights, so N devices hold a model N times the size of one (the seed's
NeoX-20B finetune: 41 GB of fp16 weights over two 48 GB GPUs). The stages are balanced by parameter
count, the embedding counting towards the first and the output head towards the last.

A step splits the batch into M micro-batches (`trainer.grad_accum_steps`). GPipe runs all M forwards,
each stage passing its output activation [b, T, d] to the next as soon as it is computed, so that stage
s works on micro-batch m while stage s+1 works on m-1; then the backwards run, each stage sending the
gradient of its input back to the previous one. Gradients accumulate over the micro-batches and every
stage steps its own optimizer once: the update equals one step on the whole batch (tested against one
process). The idle "bubble" is (N-1)/(M+N-1) of the step, so M >> N keeps the devices busy (§2.2).

Every rank reads the same batch (there is no data parallelism here). Losses and evaluation metrics are
computed on the last stage and broadcast, so every rank logs the same numbers; generation and
evaluation run the stages in turn, without gradients, with the logits broadcast to all ranks.
Activations travel in fp32 for exactness; at 20B scale bf16 would halve the traffic.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from papertrain.checkpoint import load_training_state, save_training_state
from papertrain.distributed import ProcessInfo
from papertrain.errors import PapertrainError
from papertrain.strategies.base import FROZEN_PARAMETERS, ModelBuilder, Strategy, checkpoint_activations


def balanced_split(costs: list[int], first_extra: int, last_extra: int, stages: int) -> list[int]:
    """The stage of each block: contiguous runs that minimise the largest stage's cost, where the first
    stage also carries `first_extra` (the embedding) and the last `last_extra` (the head). Exact, by
    dynamic programming over (blocks placed, stages used)."""
    n = len(costs)
    if stages > n:
        raise PapertrainError(f"a pipeline of {stages} stages needs at least {stages} blocks; the model has {n}",
                              f"use at most {n} ranks")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    INF = float("inf")
    # best[s][i]: the smallest possible largest cost placing blocks[:i] on stages[:s]
    best = [[INF] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):  # stage s-1 (0-based) takes blocks[j:i]
                cost = prefix[i] - prefix[j] + (first_extra if s == 1 else 0) + (last_extra if s == stages else 0)
                value = max(best[s - 1][j], cost)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    owner = [0] * n
    i = n
    for s in range(stages, 0, -1):
        j = cut[s][i]
        for b in range(j, i):
            owner[b] = s - 1
        i = j
    return owner


class _Head:
    """What the task's loss sees on the last stage: a "model" whose forward is the head applied to this
    micro-batch's hidden states (the earlier stages have already run on the input ids)."""

    def __init__(self, model: nn.Module, hidden: torch.Tensor):
        self.model, self.hidden = model, hidden

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.hidden)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


class PipelinedModel(nn.Module):
    """The whole model as evaluation and sampling see it: forward runs every stage in turn (no gradients)
    and returns the last stage's logits on every rank. Every rank must call it the same number of times,
    which holds because all ranks evaluate the same batches and sample the same (broadcast) logits."""

    def __init__(self, stage_model: nn.Module, strategy: Pipeline):
        super().__init__()
        self.module = stage_model
        self._strategy = strategy

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._strategy.forward_only(self.module, input_ids)

    @property
    def display_name(self) -> str:
        return f"{type(self.module).__name__} (stage {self._strategy.stage} of {self._strategy.stages})"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "new_cache":  # a KV cache lives on each stage; pipelined decoding recomputes instead
                raise
            return getattr(self._modules["module"], name)


class Pipeline(Strategy):
    name = "pipeline"
    # one optimizer per stage over its own layers, the default step only (the schedule below is the step)
    capabilities = frozenset({FROZEN_PARAMETERS})
    limits = "its schedule of micro-batches over the stages is the step, with one optimizer per stage"
    requires = "pipeline_layout"  # the model must say how it splits into stages (checked by validate)

    def __init__(self, info: ProcessInfo, device: torch.device, precision: str, options: Any = None):
        super().__init__(info, device, precision, options)
        if precision == "fp16":
            raise PapertrainError("strategy=pipeline runs fp32 or bf16 (fp16's loss scaler would have to agree "
                                  "on overflow across the stages)", "use trainer.precision=bf16")
        self.stage, self.stages = self.rank, self.world_size
        self.first, self.last = self.stage == 0, self.stage == self.stages - 1
        self.owned: list[int] = []

    # every stage reads the same batch
    @property
    def data_rank(self) -> int:
        return 0

    @property
    def data_world_size(self) -> int:
        return 1

    # -- building -------------------------------------------------------------------------------------
    def model_filter(self) -> Any:
        return self.prune

    def prune(self, model: nn.Module) -> None:
        """Keep this stage's modules; the others become nothing (their parameters are never allocated
        when the model was built on the meta device)."""
        layout = getattr(model, "pipeline_layout", None)
        if layout is None:
            raise PapertrainError(f"strategy=pipeline needs the model to say how it splits into stages, and "
                                  f"{type(model).__name__} has no pipeline_layout()",
                                  "use a model with embed/run_block/head/pipeline_layout (e.g. GPTNeoX), or "
                                  "another strategy")
        embed_names, blocks_name, head_names = layout()
        blocks: nn.ModuleList = getattr(model, blocks_name)

        def size(names: list[str]) -> int:
            return sum(p.numel() for n in names for p in getattr(model, n).parameters())

        owner = balanced_split([sum(p.numel() for p in b.parameters()) for b in blocks], size(embed_names),
                               size(head_names), self.stages)
        self.blocks_name = blocks_name
        self.owned = [i for i, s in enumerate(owner) if s == self.stage]
        for i, s in enumerate(owner):
            if s != self.stage:
                blocks[i] = nn.Identity()
        for name in (embed_names if not self.first else []) + (head_names if not self.last else []):
            setattr(model, name, None)

    def build_model(self, build: ModelBuilder) -> nn.Module:
        model = build().to(self.device)  # the trainer's model_builder calls prune() before loading any weight
        if self.activation_checkpointing:  # this stage's blocks keep only their inputs for the backward
            checkpoint_activations(model)
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        self._pipelined = PipelinedModel(model, self)
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self._pipelined if model is not self._pipelined else model

    def describe(self) -> str:
        blocks = f"{self.blocks_name}[{self.owned[0]}:{self.owned[-1] + 1}]" if self.owned else "no blocks"
        return (f"pipeline on {self.device} ({self.precision}, {self.stages} stages; stage {self.stage} holds "
                f"{blocks})")

    # -- one stage's part of a forward pass -----------------------------------------------------------
    def _run_stage(self, model: nn.Module, input_ids: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        h = model.embed(input_ids) if self.first else hidden
        blocks = getattr(model, self.blocks_name)
        for index in self.owned:
            h = model.run_block(blocks[index], h)
        return h

    def _activation(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.empty(*input_ids.shape, model.d_model, device=self.device)

    # -- GPipe: all forwards, then all backwards ------------------------------------------------------
    def forward_backward(self, model: nn.Module, loss: Any, micro_batches: list[dict[str, torch.Tensor]],
                         weights: list[float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step's forward and backward passes over the micro-batches; returns the step's loss and
        metrics (as every rank's trainer expects them: already the global values)."""
        previous, following = self.stage - 1, self.stage + 1
        pending: list[Any] = []  # non-blocking sends, waited for at the end
        outputs: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        total = torch.zeros((), device=self.device)
        parts_total: dict[str, torch.Tensor] = {}
        for batch, weight in zip(micro_batches, weights):
            ids = batch["input_ids"]
            received = None
            if not self.first:
                received = self._activation(model, ids)
                dist.recv(received, src=previous)
                received.requires_grad_(True)
            with self.autocast():
                h = self._run_stage(model, ids, received)
                if self.last:
                    value, parts = loss(_Head(model, h), batch)
            if self.last:  # the last stage runs each micro-batch's backward at once
                self.backward(value * weight)
                total += value.detach().float() * weight
                for k, v in parts.items():
                    parts_total[k] = parts_total.get(k, 0) + v.detach().float() * weight
                if received is not None:
                    pending.append(dist.isend(received.grad.contiguous(), dst=previous))
            else:
                pending.append(dist.isend(h.detach().float().contiguous(), dst=following))
                outputs.append((h, received))
        for h, received in outputs:  # the earlier stages: backwards, in the order the gradients arrive
            grad = torch.empty(h.shape, device=self.device)
            dist.recv(grad, src=following)
            torch.autograd.backward(h, grad.to(h.dtype))
            if received is not None:
                pending.append(dist.isend(received.grad.contiguous(), dst=previous))
        for request in pending:
            request.wait()
        dist.broadcast(total, src=self.stages - 1)
        shared = [{k: float(v) for k, v in parts_total.items()}]
        dist.broadcast_object_list(shared, src=self.stages - 1)
        return total, {k: torch.tensor(v, device=self.device) for k, v in shared[0].items()}

    @torch.no_grad()
    def forward_only(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        received = None
        if not self.first:
            received = self._activation(model, input_ids)
            dist.recv(received, src=self.stage - 1)
        with self.autocast():
            h = self._run_stage(model, input_ids, received)
            logits = model.head(h).float() if self.last else None
        if not self.last:
            dist.send(h.float().contiguous(), dst=self.stage + 1)
            logits = torch.empty(*input_ids.shape, model.vocab_size, device=self.device)
        dist.broadcast(logits, src=self.stages - 1)
        return logits

    # -- the step -------------------------------------------------------------------------------------
    def clip_and_step(self, model: nn.Module, optimizer: Any, max_norm: float | None,
                      parameters: Any = None) -> torch.Tensor | float | None:
        """Clip by the norm of the *whole* model's gradient: each stage's squared norm, summed over stages."""
        norm = None
        if max_norm is not None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            squared = sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=self.device))
            dist.all_reduce(squared)
            norm = squared.sqrt()
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(scale)
        optimizer.step()
        return norm

    # every rank already holds the global value
    def mean_across_ranks(self, values: dict[str, float]) -> dict[str, float]:
        return dict(values)

    def sum_across_ranks(self, values: dict[str, float]) -> dict[str, float]:
        return dict(values)

    def micro_step_context(self, model: nn.Module, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    # -- checkpoints: each stage writes and reads its own tensors --------------------------------------
    def save(self, folder: Path, model: nn.Module, optimizers: dict[str, Any], train_state: dict[str, Any]) -> list[Any]:
        module = model.module if isinstance(model, PipelinedModel) else model
        return save_training_state(folder, module, optimizers, train_state, self.rank, own_optimizer=True)

    def load(self, folder: Path, model: nn.Module, optimizers: dict[str, Any]) -> dict[str, Any]:
        module = model.module if isinstance(model, PipelinedModel) else model
        return load_training_state(folder, module, optimizers, self.rank, own_optimizer=True)
