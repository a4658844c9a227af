"""Checkpoints: one reshardable format, written atomically, pruned, found again on resume.

    RUN_DIR/checkpoints/step_00001000/
        model/            the weights as safetensors (one file, or one per rank when sharded)
        optimizer/        the optimizer's tensors (moments, step counts) as safetensors, keyed
                          "<parameter name>.<state name>", sharded like the weights
        train_state.pt    everything that is not a tensor: step, optimizer hyperparameters, scheduler,
                          data position; read back with torch.load(weights_only=True)
        rng/rank_00000.pt every rank's random-number generators
        meta.json         step, strategy, world size, format

`model/` and `optimizer/` go through torch.distributed.checkpoint with its safetensors storage: each
shard records its offset in the global tensor, so a checkpoint written by N ranks loads on M ranks,
or on one process, as the same tensors. Nothing in a checkpoint is ever unpickled. DeepSpeed keeps
its engine's own files in `deepspeed/` (see strategies/deepspeed.py).

A checkpoint is written into a hidden temporary folder, then renamed into place by rank 0 once every
rank has finished. A rename is atomic, so a kill mid-save leaves at worst a stale temporary folder
(removed on the next start) and the previous checkpoint untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from papertrain.distributed import barrier
from papertrain.errors import PapertrainError
from papertrain.seeding import capture_rng, restore_rng

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TEMPORARY_PREFIX = ".tmp-"

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
STATE_FILE = "train_state.pt"
RNG_DIR = "rng"
META_FILE = "meta.json"
FORMAT = "dcp-safetensors"


class CheckpointDir:
    """The run's checkpoints folder: atomic saves (also across ranks), pruning, finding the latest."""

    def __init__(self, root: Path, keep_last: int, is_main: bool = True):
        self.root = root
        self.keep_last = max(1, keep_last)
        self.is_main = is_main

    def remove_partial(self) -> list[Path]:
        """Delete temporary folders left by a save that was killed (rank 0, before anything else)."""
        removed = []
        if self.is_main and self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith(_TEMPORARY_PREFIX):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed

    def all(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, write: Callable[[Path], None], meta: dict[str, Any]) -> Path:
        """Create the checkpoint of `step`: every rank's `write(folder)` fills one temporary folder,
        then rank 0 renames it into place. Call on every rank."""
        write(self.begin(step))
        return self.commit(step, meta)

    def begin(self, step: int) -> Path:
        """The temporary folder that becomes checkpoint `step` on commit (every rank gets the same one)."""
        temporary = self.root / f"{_TEMPORARY_PREFIX}step_{step:08d}"
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
        barrier()
        return temporary

    def commit(self, step: int, meta: dict[str, Any]) -> Path:
        """Once every rank has written (waited for, if the writes ran in the background): rename into place."""
        final = self.root / f"step_{step:08d}"
        temporary = self.root / f"{_TEMPORARY_PREFIX}{final.name}"
        barrier()
        if self.is_main:
            (temporary / META_FILE).write_text(json.dumps({"step": step, "time": time.time(), **meta}, indent=2))
            _fsync_tree(temporary)
            if final.exists():  # the same step saved again (e.g. interrupted right after a resume)
                displaced = self.root / f"{_TEMPORARY_PREFIX}old-{final.name}"
                shutil.rmtree(displaced, ignore_errors=True)
                os.rename(final, displaced)
                os.rename(temporary, final)
                shutil.rmtree(displaced, ignore_errors=True)
            else:
                os.rename(temporary, final)
            self.prune()
        barrier()
        return final

    def prune(self) -> None:
        for _, path in self.all()[:-self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


# --- model and optimizer state, sharded or not ---------------------------------------------------------

def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def split_aliases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop keys whose tensor shares storage with an earlier key (tied weights); return {alias: original}."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    owners: dict[tuple[int, tuple[int, ...]], str] = {}
    for key, tensor in state.items():
        local = _local(tensor)
        identity = (local.data_ptr(), tuple(tensor.shape))
        if local.numel() and identity in owners:
            aliases[key] = owners[identity]
        else:
            owners[identity] = key
            kept[key] = tensor
    return kept, aliases


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """{"state": {param: {name: value}}, "param_groups": [...]} -> (tensors keyed "param.name", the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}.{name}"] = value
            else:
                scalars.setdefault(param, {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        param, name = key.rsplit(".", 1)
        state.setdefault(param, {})[name] = tensor
    for param, entries in rest["scalars"].items():
        state.setdefault(param, {}).update(entries)
    return {"state": state, "param_groups": rest["param_groups"]}


def has_frozen_base(model: nn.Module) -> bool:
    """A finetune (biases, LoRA, an int8 base): some parameters never change."""
    return any(not p.requires_grad for p in model.parameters())


def model_and_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer
                              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a checkpoint holds. A finetune keeps only what training changes: the trainable parameters
    and the floating-point buffers (e.g. norm statistics). The frozen base is rebuilt from the config
    (`pretrained.path`, or the seed) on resume, so a 20B-parameter finetune checkpoints megabytes, and
    int8 layers, whose state bitsandbytes writes in its own format, never pass through the checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict

    if not has_frozen_base(model):
        return get_state_dict(model, optimizer)
    state: dict[str, Any] = {name: p for name, p in model.named_parameters() if p.requires_grad}
    state.update({name: b for name, b in model.named_buffers() if b.is_floating_point()})
    return state, get_optimizer_state_dict(model, optimizer)


def save_training_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        train_state: dict[str, Any], rank: int, background_group: Any = None,
                        own_optimizer: bool = False) -> list[Any]:
    """Weights, optimizer and the rest of `train_state` into `folder` (call on every rank).

    With `background_group` (a process group of its own), the tensors are copied aside and written by a
    background thread: training goes on, and the returned futures say when the files are complete.
    One thread writes both parts, one after the other: two concurrent DCP saves would interleave their
    collectives on the one group in a different order on each rank, and deadlock.
    `own_optimizer`: each rank steps different parameters (a pipeline's stages), so each also keeps its
    own optimizer settings (param groups, step counts) beside rank 0's file.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    model_state, optimizer_state = model_and_optimizer_state(model, optimizer)
    weights, aliases = split_aliases(model_state)
    moments, rest = split_optimizer_state(optimizer_state)
    sharded = dist.is_initialized() and dist.get_world_size() > 1
    parts = ((MODEL_DIR, weights), (OPTIMIZER_DIR, moments))
    group = background_group if sharded else None  # ("local" only ever comes without a process group)

    def write(parts: tuple[tuple[str, dict[str, Any]], ...]) -> None:
        with single_process_dcp():
            for part, tensors in parts:
                dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder / part), save_distributed=sharded),
                         process_group=group)

    pending = []
    if background_group is None:
        write(parts)
    else:  # a copy of this step's tensors (training will change the originals), written in the background
        staged = tuple((part, {k: _copy_aside(v) for k, v in tensors.items()}) for part, tensors in parts)
        pending.append(_background_writer().submit(write, staged))
    if rank == 0:
        torch.save({**train_state, "optimizer": rest, "aliases": aliases}, folder / STATE_FILE)
    if own_optimizer and rank > 0:
        torch.save({"optimizer": rest, "aliases": aliases}, folder / f"rank{rank}_{STATE_FILE}")
    save_rng(folder, rank)
    return pending


def load_training_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                        own_optimizer: bool = False) -> dict[str, Any]:
    """Fill model and optimizer from `folder`, whatever world size wrote it; return the rest."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    written_by = read_meta(folder).get("format", FORMAT)
    if written_by != FORMAT:
        raise PapertrainError(f"{folder} was written by strategy '{read_meta(folder).get('strategy')}' "
                              f"({written_by}), which this strategy cannot read",
                              f"resume with strategy={read_meta(folder).get('strategy')}, or "
                              "`papertrain export` the run to safetensors and start from the weights")
    state = load_train_state(folder)
    if own_optimizer and rank > 0:
        state.update(torch.load(folder / f"rank{rank}_{STATE_FILE}", map_location="cpu", weights_only=True))
    model_state, optimizer_state = model_and_optimizer_state(model, optimizer)  # targets, sharded like this run
    weights, _ = split_aliases(model_state)
    moments, _ = split_optimizer_state(optimizer_state)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with single_process_dcp():
            dcp.load(weights, storage_reader=HuggingFaceStorageReader(str(folder / MODEL_DIR)))
            dcp.load(moments, storage_reader=HuggingFaceStorageReader(str(folder / OPTIMIZER_DIR)))
    except (Exception, CheckpointException) as err:  # shapes or names differ: say so, not DCP's internals
        raise PapertrainError(f"checkpoint {folder} does not fit the model and optimizer this config builds: "
                              f"{_last_line(err)}",
                              "use the config the checkpoint was trained with, or a new --run-dir") from None
    for alias, original in state["aliases"].items():
        weights[alias] = weights[original]
    set_state_dict(model, optimizer, model_state_dict=weights,
                   optim_state_dict=join_optimizer_state(moments, state["optimizer"]),
                   options=StateDictOptions(strict=not has_frozen_base(model)))
    load_rng(folder, rank)
    return state


_WRITER: ThreadPoolExecutor | None = None


def _background_writer() -> ThreadPoolExecutor:
    """The one thread that writes checkpoints in the background (saves run in order, never two at once)."""
    global _WRITER
    if _WRITER is None:
        _WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="papertrain-checkpoint")
    return _WRITER


def _copy_aside(value: Any) -> Any:
    """A tensor (a DTensor keeps its sharding) copied to CPU memory, detached from training."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return value


@contextlib.contextmanager
def single_process_dcp() -> Iterator[None]:
    """DCP warns when no process group exists; one process is a supported case here, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]


def save_rng(folder: Path, rank: int) -> None:
    (folder / RNG_DIR).mkdir(exist_ok=True)
    torch.save(capture_rng(), folder / RNG_DIR / f"rank_{rank:05d}.pt")


def load_rng(folder: Path, rank: int) -> None:
    """This rank's generators; a rank the checkpoint did not have takes rank 0's (new world size)."""
    own = folder / RNG_DIR / f"rank_{rank:05d}.pt"
    path = own if own.is_file() else folder / RNG_DIR / "rank_00000.pt"
    restore_rng(torch.load(path, map_location="cpu", weights_only=True))


def load_train_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)


# --- plain weights files ---------------------------------------------------------------------------------

def save_model_weights(model: nn.Module, path: Path) -> None:
    """One safetensors file; tied tensors (e.g. GPT's shared embedding) are stored once."""
    from safetensors.torch import save_model

    save_model(model, str(path))


def load_model_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_model

    check_shapes(model, path)
    load_model(model, str(path), strict=True)


def check_shapes(model: nn.Module, path: Path) -> None:
    """Compare a weights file with the model before loading, to say clearly what differs."""
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(path), framework="pt") as handle:
        stored = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    problems = [f"{k}: file {stored[k]} vs model {expected[k]}"
                for k in stored if k in expected and stored[k] != expected[k]]
    problems += [f"{k}: in the file but not in the model" for k in stored if k not in expected]
    if problems:
        listed = "\n    ".join(problems[:8]) + (f"\n    ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise PapertrainError(f"{path} does not fit the model this config builds:\n    {listed}",
                              "use the config the weights were trained with")
