"""How the one training loop runs on hardware: the strategy interface.

The trainer never asks "am I distributed?". It asks the strategy to build the model and optimizer, run
the backward pass, clip, step, average metrics and save or load checkpoints. `SingleDevice` is one
process on one device; DDP, FSDP2, DeepSpeed and the ZeRO-3 reference implement the same methods.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from papertrain import distributed
from papertrain.checkpoint import FORMAT, load_training_state, read_dcp_weights, save_training_state
from papertrain.distributed import ProcessInfo
from papertrain.errors import PapertrainError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

ModelBuilder = Callable[[], nn.Module]
Optimizers = dict[str, torch.optim.Optimizer]
OptimizersBuilder = Callable[[nn.Module], Optimizers]
LossFunction = Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`: this rank's GPU when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PapertrainError(f"trainer.device={name} but this machine has no CUDA GPU",
                              "use trainer.device=cpu (or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PapertrainError(f"trainer.device={name} but MPS is not available", "use trainer.device=cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def pick_precision(name: str, device: torch.device) -> str:
    """`auto` is bf16 on GPUs that support it and fp32 elsewhere (CPU autocast rarely pays off). fp16 works on
    CPU as well (autocast and the loss scaler both support it), slowly: useful to test a recipe's fp16 path."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return name


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated layers of a model: the children of its ModuleLists (GPT's `layers`, the encoder's
    and decoder's layers). FSDP2 shards each one separately and activation checkpointing recomputes
    them; a model with other needs defines `blocks()` itself."""
    if hasattr(model, "blocks") and callable(model.blocks):
        return list(model.blocks())
    found: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            found += [child for child in module if any(p.requires_grad for p in child.parameters())]
    return found


def initialise(model: nn.Module, gather: Callable[[list[nn.Parameter]], Any] | None = None) -> None:
    """(Re)initialise a model one module at a time, as a sharded model needs it.

    The contract every recipe model follows: each module's own `reset_parameters()` sets the defaults for
    the parameters and buffers it owns directly (optional arguments, e.g. a generator, take their defaults),
    and a module that initialises its descendants its own way defines `init_weights(name, module)`
    (name relative to itself), applied after the defaults. Children go first; of several modules with an
    `init_weights` (a GPT inside a LoRA wrapper), the innermost applies first and the outermost last.
    `gather(params)` (DeepSpeed's GatheredParameters) makes a partitioned module's parameters whole for
    the moment they are written; no more than one module is ever whole at a time.
    """
    initialisers = [(name, module.init_weights) for name, module in model.named_modules()
                    if callable(getattr(module, "init_weights", None))]
    for name, module in reversed(list(model.named_modules())):
        own = list(module.parameters(recurse=False))
        if not own and not list(module.buffers(recurse=False)):
            continue
        with (gather(own) if gather is not None and own else contextlib.nullcontext()):
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and _needs_no_arguments(reset):
                reset()
            # ancestors (and the module itself) that initialise their descendants, innermost first
            for prefix, init_weights in sorted(initialisers, key=lambda item: -len(item[0])):
                if not prefix:
                    init_weights(name, module)
                elif name == prefix or name.startswith(prefix + "."):
                    init_weights(name[len(prefix) + 1:], module)


def refuse_frozen_base_on_meta(model: nn.Module) -> None:
    """strategy.meta_init draws each shard's initial values on its own rank, so a frozen part (a LoRA or
    biases-only finetune's base) could never be rebuilt the same way on resume, and weights loaded into
    meta tensors would be lost: refuse, naming the fix."""
    if any(not p.requires_grad for p in model.parameters()):
        raise PapertrainError(f"strategy.meta_init with {type(model).__name__}, which freezes part of itself: a frozen "
                              "base is rebuilt from its weights or the seed on every resume, and a model initialised "
                              "shard by shard cannot be rebuilt the same way (weights loaded into it would be lost)",
                              "drop strategy.meta_init (FSDP2 and ZeRO-3 still shard the model once it is built)")


def _needs_no_arguments(function: Callable[..., Any]) -> bool:
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in inspect.signature(function).parameters.values())


def checkpoint_activations(model: nn.Module) -> int:
    """Recompute each block's activations in the backward pass instead of storing them (Chen et al. 2016):
    memory for activations drops from O(layers) to O(1) blocks, at the cost of a second forward."""
    from torch.utils.checkpoint import checkpoint

    blocks = blocks_of(model)
    for block in blocks:
        original = block.forward

        def recomputed(*args: Any, _original: Callable = original, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        block.forward = recomputed
    return len(blocks)


# What a strategy can do beyond the default step, declared as data and checked by `papertrain validate`
# before any work (see papertrain/capabilities.py for what each recipe needs).
CUSTOM_STEP = "custom_step"  # a task's own train_step(ctx, batch): its own backward passes and optimizer steps
NAMED_OPTIMIZERS = "named_optimizers"  # several optimizers, each over a part of the model
NO_OPTIMIZER = "no_optimizer"  # solvers: nothing to optimize by gradient (CFR)
REPEATED_BACKWARD = "repeated_backward"  # more than one backward pass per step (a curvature pass)
STAGED_MODEL = "staged_model"  # needs a model that declares pipeline_layout() (the pipeline)
FROZEN_PARAMETERS = "frozen_parameters"  # a model part of which does not train (LoRA, biases-only, int8 weights)
CAPABILITIES = {
    CUSTOM_STEP: "a task that defines its own train_step",
    NAMED_OPTIMIZERS: "several named optimizers (`optimizers:`)",
    NO_OPTIMIZER: "no optimizer (a solver: `optimizer: null`)",
    REPEATED_BACKWARD: "an extra backward pass before a step (a callback's, e.g. Sophia's curvature pass)",
    FROZEN_PARAMETERS: "a model with frozen parameters (a LoRA, biases-only or int8 finetune)",
}


class Strategy:
    """The interface every strategy implements. Subclasses override what they do differently; the trainer
    calls nothing else, and never probes for optional methods: what a strategy can do is `capabilities`."""

    name = "base"
    checkpoint_format = FORMAT
    capabilities: frozenset[str] = frozenset({CUSTOM_STEP, NAMED_OPTIMIZERS, REPEATED_BACKWARD, FROZEN_PARAMETERS})
    limits = ""  # why a capability is missing, for validate's message
    # more than one process, each with its share of every batch (False: one process, or a pipeline's stages)
    multi_process = True

    def __init__(self, info: ProcessInfo, device: torch.device, precision: str, options: Any = None):
        self.info = info
        self.rank, self.world_size, self.local_rank = info.rank, info.world_size, info.local_rank
        self.device = device
        self.precision = precision
        self.options = options
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.custom_step = False  # set by configure(): the task owns its step

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which share of each batch this rank reads (a pipeline's stages all read the same batch)."""
        return self.rank

    @property
    def data_world_size(self) -> int:
        return self.world_size

    def configure(self, batch_size: int, accumulation: int, grad_clip: float | None, custom_step: bool = False) -> None:
        """The run's batch settings, before anything is built (DeepSpeed turns them into its config)."""
        self.custom_step = custom_step

    # -- building -------------------------------------------------------------------------------------
    @property
    def activation_checkpointing(self) -> bool:
        return bool(getattr(self.options, "activation_checkpointing", False))

    def model_filter(self) -> Callable[[nn.Module], None] | None:
        """A function that drops what this rank does not hold from a freshly built model, before any weight
        loads (a pipeline keeps its stage's layers); None keeps everything."""
        return None

    def build_model(self, build: ModelBuilder) -> nn.Module:
        """Construct the model as this strategy holds it (on this rank's device, or sharded)."""
        model = build().to(self.device)
        if self.activation_checkpointing:
            checkpoint_activations(model)
        return model

    def prepare(self, build_model: ModelBuilder, build_optimizers: OptimizersBuilder
                ) -> tuple[nn.Module, Optimizers]:
        """The model, wrapped for training, and its optimizers by name."""
        model = self.build_model(build_model)
        return self.wrap(model), build_optimizers(model)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The module itself (for evaluation, sampling, and any method other than forward)."""
        return model

    def whole_model(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Around evaluation and sampling, which may call any method of the model (greedy decoding calls
        `encode`), not only `forward`: a strategy whose parameters are whole only while their block's
        forward runs (zero3_reference) gathers them all here. Others have nothing to do."""
        return contextlib.nullcontext()

    # -- one step -------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def micro_step_context(self, model: nn.Module, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Around forward+backward of one micro-batch (DDP skips the gradient sync until the last)."""
        return contextlib.nullcontext()

    def forward_backward(self, model: nn.Module, loss: LossFunction, micro_batches: list[dict[str, Any]],
                         weights: list[float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward passes of `loss(model, batch)` over a step's micro-batches, each weighted by
        its share of the step's units; returns this rank's share of the step's loss and extra metrics.
        (A pipeline overrides this: it schedules the micro-batches across its stages.)"""
        total = torch.zeros((), device=self.device)
        parts_total: dict[str, torch.Tensor] = {}
        for micro, (batch, weight) in enumerate(zip(micro_batches, weights)):
            with self.micro_step_context(model, micro == len(micro_batches) - 1):
                with self.autocast():
                    value, parts = loss(model, batch)
                self.backward(value * weight)
            total += value.detach().float() * weight
            for k, v in parts.items():
                parts_total[k] = parts_total.get(k, 0) + v.detach().float() * weight
        return total, parts_total

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip_and_step(self, model: nn.Module, optimizer: Any, max_norm: float | None,
                      parameters: list[nn.Parameter] | None = None) -> torch.Tensor | float | None:
        """Unscale, clip the global gradient norm of `parameters` (default: the model's), step (gradients are
        kept); returns the norm before clipping."""
        self.synchronize_gradients(optimizer)
        if self.scaler:
            self.scaler.unscale_(optimizer)
        norm = None
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters() if parameters is None else parameters, max_norm)
            if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2: the same global norm on every rank
                norm = norm.full_tensor()
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return norm

    def synchronize_gradients(self, optimizer: Any) -> None:
        """Make the gradients of `optimizer`'s parameters the global ones before it steps (nothing to do on one
        process, or where the backward pass already reduced them)."""

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    # -- across ranks ---------------------------------------------------------------------------------
    def mean_across_ranks(self, values: dict[str, float]) -> dict[str, float]:
        return distributed.mean_across_ranks(values)

    def sum_across_ranks(self, values: dict[str, float]) -> dict[str, float]:
        return distributed.sum_across_ranks(values)

    def barrier(self) -> None:
        distributed.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's (small, picklable-by-torch) value on every rank."""
        return distributed.broadcast_object(value)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any (a stop signal reaches ranks at different moments;
        all must stop at the same step). Runs on a CPU (gloo) group, so a GPU job does not sync its stream."""
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        if not hasattr(self, "_control_group"):
            self._control_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        vote = torch.tensor([int(flag)])
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._control_group)
        return bool(vote.item())

    # -- checkpoints ----------------------------------------------------------------------------------
    def save(self, folder: Path, model: nn.Module, optimizers: Optimizers, train_state: dict[str, Any]) -> list[Any]:
        """Called on every rank, inside the temporary checkpoint folder. Returns the futures of writes
        still running in the background (`strategy.async_checkpoint`), if any."""
        if self.scaler:
            train_state = {**train_state, "grad_scaler": self.scaler.state_dict()}
        return save_training_state(folder, self.unwrap(model), optimizers, train_state, self.rank,
                                   background_group=self.background_group())

    def background_group(self) -> Any:
        """A process group for background checkpoint writes, apart from training's collectives."""
        if not getattr(self.options, "async_checkpoint", False):
            return None
        if not hasattr(self, "_background_group"):
            import torch.distributed as dist

            self._background_group = dist.new_group(backend="gloo") if dist.is_initialized() else "local"
        return self._background_group

    def load(self, folder: Path, model: nn.Module, optimizers: Optimizers) -> dict[str, Any]:
        state = load_training_state(folder, self.unwrap(model), optimizers, self.rank)
        if self.scaler and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        return state

    @classmethod
    def full_weights(cls, folder: Path) -> dict[str, torch.Tensor]:
        """The complete weights of a checkpoint this strategy wrote, on one process (`papertrain export`)."""
        return read_dcp_weights(folder)

    # -- what this rank holds -------------------------------------------------------------------------
    def memory_by_kind(self, model: nn.Module, optimizers: Optimizers) -> dict[str, int]:
        """Bytes this rank holds in parameters, gradients and optimizer state (the "model states" of ZeRO)."""
        module = self.unwrap(model)
        params = sum(self.parameter_bytes(p) for p in module.parameters())
        grads = sum(local_bytes(p.grad) for p in module.parameters() if p.grad is not None)
        return {"memory/params_bytes": params, "memory/grads_bytes": grads,
                "memory/optimizer_bytes": sum(optimizer_bytes(o, module) for o in optimizers.values())}

    def parameter_bytes(self, parameter: torch.Tensor) -> int:
        return local_bytes(parameter)

    def teardown(self) -> None:
        pass

    def describe(self) -> str:
        ranks = f", {self.world_size} ranks" if self.world_size > 1 else ""
        return f"{self.name} on {self.device} ({self.precision}{ranks})"


def optimizer_bytes(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """The optimizer's state (moments, ...) plus any parameters it steps that the model does not own:
    the fp32 master copies that ZeRO keeps beside the model's own (possibly low-precision) weights."""
    owned = {id(p) for p in model.parameters()}
    states = sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                 if isinstance(v, torch.Tensor))
    masters = sum(local_bytes(p) for group in optimizer.param_groups for p in group["params"] if id(p) not in owned)
    return states + masters


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes of this rank's part of a tensor (a DTensor's local shard, not its global size)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


class SingleDevice(Strategy):
    """One process, one device: a laptop CPU, one GPU, or Apple's MPS."""

    name = "single"
    capabilities = frozenset(CAPABILITIES)  # everything, including a model with nothing to train
    multi_process = False

    def __init__(self, info: ProcessInfo, device: torch.device, precision: str, options: Any = None):
        if info.distributed:
            raise PapertrainError(
                f"strategy=single, but this process is one of {info.world_size} ({info.launcher})",
                "choose a multi-process strategy: strategy=ddp, strategy=fsdp2 or strategy=deepspeed")
        super().__init__(info, device, precision, options)
