"""Checkpoints: one reshardable format, written atomically, pruned, found again on resume.

    RUN_DIR/checkpoints/step_00001000/
        model/            the weights as safetensors (one file, or one per rank when sharded)
        optimizer/        the optimizer's tensors (moments, step counts) as safetensors, keyed
                          "<parameter name>.<state name>", sharded like the weights
        train_state.pt    everything that is not a tensor: step, optimizer hyperparameters, scheduler,
                          data position; read back with torch.load(weights_only=True)
        rng/rank_00000.pt every rank's random-number generators
        meta.json         step, strategy, world size, format, and every file's size (the manifest)

`model/` and `optimizer/` go through torch.distributed.checkpoint with its safetensors storage: each
shard records its offset in the global tensor, so a checkpoint written by N ranks loads on M ranks,
or on one process, as the same tensors. Nothing in a checkpoint is ever unpickled. DeepSpeed keeps
its engine's own files in `deepspeed/` (see strategies/deepspeed.py).

A checkpoint is written into a hidden temporary folder, then renamed into place by rank 0 once every
rank has finished. A rename is atomic, so a kill mid-save leaves at worst a stale temporary folder
(removed on the next start) and the previous checkpoint untouched.

Before a checkpoint is resumed or exported, `verify_checkpoint` checks it without unpickling anything:
meta.json parses and names a known format, every file of the manifest is there with its size, each
safetensors file's header describes exactly the bytes the file holds, and the small state files load
with `weights_only=True`. A resume that meets a damaged checkpoint (a truncated file, a disk that filled
up under another tool, an edited file) names the file, moves the folder aside as `damaged-step_N`, and
continues from the newest intact one.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
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
DAMAGED_PREFIX = "damaged-"

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
        if self.is_main:
            self.prepare_temporary(step)
        barrier()
        return self.temporary(step)

    def temporary(self, step: int) -> Path:
        return self.root / f"{_TEMPORARY_PREFIX}step_{step:08d}"

    def prepare_temporary(self, step: int) -> Path:
        """Rank 0: a fresh, empty temporary folder for checkpoint `step`."""
        temporary = self.temporary(step)
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        return temporary

    def commit(self, step: int, meta: dict[str, Any]) -> Path:
        """Once every rank has written (waited for, if the writes ran in the background): rename into place."""
        barrier()
        final = self.finalize(step, meta) if self.is_main else self.root / f"step_{step:08d}"
        barrier()
        return final

    def finalize(self, step: int, meta: dict[str, Any]) -> Path:
        """Rank 0's part of a commit: the manifest and meta.json, fsync, the atomic rename, pruning."""
        final = self.root / f"step_{step:08d}"
        temporary = self.root / f"{_TEMPORARY_PREFIX}{final.name}"
        files = {path.relative_to(temporary).as_posix(): path.stat().st_size
                 for path in sorted(temporary.rglob("*")) if path.is_file()}
        (temporary / META_FILE).write_text(json.dumps({"step": step, "time": time.time(), **meta, "files": files},
                                                      indent=2))
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
        return final

    def discard(self, step: int) -> None:
        """Remove the temporary folder of a save that failed (rank 0), freeing what it took."""
        if self.is_main:
            shutil.rmtree(self.root / f"{_TEMPORARY_PREFIX}step_{step:08d}", ignore_errors=True)

    def newest_complete(self) -> tuple[int, Path] | None:
        """The newest checkpoint folder with its meta.json (complete as far as a glance can tell)."""
        complete = [(step, path) for step, path in self.all() if (path / META_FILE).is_file()]
        return complete[-1] if complete else None

    def prune(self) -> None:
        for _, path in self.all()[:-self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def newest_intact(self, known_formats: set[str] | None = None) -> tuple[tuple[int, Path] | None, list[str]]:
        """The newest checkpoint that passes `verify_checkpoint`, and a note for each damaged one found on
        the way, which is moved aside (renamed `damaged-step_N`: never resumed or pruned, kept for you to
        inspect). Rank 0 only; the other ranks take its answer."""
        notes = []
        for step, folder in reversed(self.all()):
            try:
                verify_checkpoint(folder, known_formats)
                return (step, folder), notes
            except DamagedCheckpoint as err:
                aside = self.root / f"{DAMAGED_PREFIX}{folder.name}"
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(folder, aside)
                notes.append(f"checkpoint {folder.name} is damaged ({err.reason_text}); moved aside to {aside}")
        return None, notes


class DamagedCheckpoint(PapertrainError):
    """A checkpoint folder whose files are missing, cut short, or not what papertrain writes."""

    def __init__(self, folder: Path, file: str, reason: str):
        self.folder, self.file, self.reason = folder, file, reason
        self.reason_text = f"{file}: {reason}"
        super().__init__(f"checkpoint {folder} is damaged: {self.reason_text}",
                         "resume from an older checkpoint (a resume does so by itself), or train again")


def read_meta(folder: Path) -> dict[str, Any]:
    """meta.json of a checkpoint ({} if absent); a damaged one raises DamagedCheckpoint."""
    path = folder / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedCheckpoint(folder, META_FILE, f"not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise DamagedCheckpoint(folder, META_FILE, f"holds a {type(meta).__name__}, not an object")
    return meta


def verify_checkpoint(folder: Path, known_formats: set[str] | None = None) -> dict[str, Any]:
    """Check a checkpoint folder without unpickling anything; return its meta.json or raise DamagedCheckpoint."""
    if not (folder / META_FILE).is_file():
        raise DamagedCheckpoint(folder, META_FILE, "missing (the save never finished)")
    meta = read_meta(folder)
    expected_step = _STEP_DIR.match(folder.name)
    for key, kind in (("step", int), ("world_size", int), ("format", str), ("strategy", str)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise DamagedCheckpoint(folder, META_FILE, f"'{key}' is {meta.get(key)!r}, not a {kind.__name__}")
    if expected_step and meta["step"] != int(expected_step.group(1)):
        raise DamagedCheckpoint(folder, META_FILE, f"says step {meta['step']}, but the folder is {folder.name}")
    if meta["world_size"] < 1:
        raise DamagedCheckpoint(folder, META_FILE, f"world_size {meta['world_size']}")
    if known_formats is not None and meta["format"] not in known_formats:
        raise DamagedCheckpoint(folder, META_FILE, f"format '{meta['format']}' is not one papertrain writes "
                                                   f"({', '.join(sorted(known_formats))})")
    files = meta.get("files")
    if files is not None:
        if not isinstance(files, dict):
            raise DamagedCheckpoint(folder, META_FILE, "'files' is not a mapping of file names to sizes")
        root = folder.resolve()
        for name, size in files.items():
            path = (folder / str(name)).resolve()
            if root not in path.parents:
                raise DamagedCheckpoint(folder, META_FILE, f"lists '{name}', outside the checkpoint")
            if not path.is_file():
                raise DamagedCheckpoint(folder, str(name), "missing")
            if path.stat().st_size != size:
                raise DamagedCheckpoint(folder, str(name), f"{path.stat().st_size:,} bytes, but {size:,} were written")
    else:  # written before checkpoints had a manifest: the files every format has
        for name in (STATE_FILE, f"{RNG_DIR}/rank_00000.pt"):
            if not (folder / name).is_file():
                raise DamagedCheckpoint(folder, name, "missing")
    for path in sorted(folder.rglob("*.safetensors")):
        _check_safetensors(folder, path)
    for path in [folder / STATE_FILE, *sorted(folder.glob(f"rank*_{STATE_FILE}")), *sorted((folder / RNG_DIR).glob("*.pt"))]:
        if path.is_file():
            weights_only_load(path, folder)
    return meta


def _check_safetensors(folder: Path, path: Path) -> None:
    """The file holds exactly what its header describes: 8 bytes of header length, the JSON header, the data."""
    name = path.relative_to(folder).as_posix()
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise DamagedCheckpoint(folder, name, f"{size} bytes: too short for a safetensors file")
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            raise DamagedCheckpoint(folder, name, f"its header claims {length:,} bytes, the file holds {size:,}")
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
            end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                      default=0)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError):
            raise DamagedCheckpoint(folder, name, "its safetensors header is not valid") from None
    if 8 + length + end != size:
        how = "cut short" if size < 8 + length + end else "extra bytes at the end"
        raise DamagedCheckpoint(folder, name, f"{size:,} bytes, but its header describes {8 + length + end:,} ({how})")


def weights_only_load(path: Path, folder: Path | None = None) -> Any:
    """torch.load(weights_only=True), with papertrain's own message for a file that is not what we write."""
    folder = folder or path.parent
    name = path.relative_to(folder).as_posix() if folder in path.parents else path.name
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DamagedCheckpoint(folder, name, "holds pickled Python objects, not only tensors and plain data; "
                                              "papertrain never unpickles a checkpoint (this file is damaged, or "
                                              "was not written by papertrain)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise DamagedCheckpoint(folder, name, f"cannot be read ({_last_line(err)})") from None


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


Optimizers = dict[str, torch.optim.Optimizer]  # named optimizers; a config's single `optimizer:` is "optimizer"
DEFAULT_OPTIMIZER = "optimizer"


def optimizer_dir(name: str) -> str:
    """Where an optimizer's tensors go: `optimizer/` for a config's one optimizer, `optimizer.NAME/` else."""
    return OPTIMIZER_DIR if name == DEFAULT_OPTIMIZER else f"{OPTIMIZER_DIR}.{name}"


def model_state(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint holds of the model. A finetune keeps only what training changes: the trainable
    parameters and the floating-point buffers (e.g. norm statistics). The frozen base is rebuilt from the
    config (`pretrained.path`, or the seed) on resume, so a 20B-parameter finetune checkpoints megabytes,
    and int8 layers, whose state bitsandbytes writes in its own format, never pass through the checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not has_frozen_base(model):
        return get_model_state_dict(model)
    state: dict[str, Any] = {name: p for name, p in model.named_parameters() if p.requires_grad}
    state.update({name: b for name, b in model.named_buffers() if b.is_floating_point()})
    return state


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer's state keyed by parameter names (DCP's form: reshardable, whatever the world size)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def save_training_state(folder: Path, model: nn.Module, optimizers: Optimizers,
                        train_state: dict[str, Any], rank: int, background_group: Any = None,
                        own_optimizer: bool = False) -> list[Any]:
    """Weights, optimizers and the rest of `train_state` into `folder` (call on every rank).

    With `background_group` (a process group of its own), the tensors are copied aside and written by a
    background thread: training goes on, and the returned futures say when the files are complete.
    One thread writes every part, one after the other: two concurrent DCP saves would interleave their
    collectives on the one group in a different order on each rank, and deadlock.
    `own_optimizer`: each rank steps different parameters (a pipeline's stages), so each also keeps its
    own optimizer settings (param groups, step counts) beside rank 0's file.
    """
    weights, aliases = split_aliases(model_state(model))
    parts = [(MODEL_DIR, weights)]
    rests = {}
    for name, optimizer in optimizers.items():
        moments, rests[name] = split_optimizer_state(optimizer_state(model, optimizer))
        parts.append((optimizer_dir(name), moments))
    sharded = dist.is_initialized() and dist.get_world_size() > 1
    group = background_group if sharded else None  # ("local" only ever comes without a process group)

    pending = []
    if background_group is None:
        write_tensors(folder, parts, sharded, group)
    else:  # a copy of this step's tensors (training will change the originals), written in the background
        staged = [(part, {k: _copy_aside(v) for k, v in tensors.items()}) for part, tensors in parts]
        pending.append(_background_writer().submit(write_tensors, folder, staged, sharded, group))
    if rank == 0:
        torch.save({**train_state, "optimizers": rests, "aliases": aliases}, folder / STATE_FILE)
    if own_optimizer and rank > 0:
        torch.save({"optimizers": rests, "aliases": aliases}, folder / f"rank{rank}_{STATE_FILE}")
    save_rng(folder, rank)
    return pending


def write_tensors(folder: Path, parts: list[tuple[str, dict[str, Any]]], sharded: bool, group: Any = None) -> None:
    """Each (subfolder, tensors) through DCP's safetensors storage (every rank calls it: a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    with single_process_dcp():
        for part, tensors in parts:
            dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder / part), save_distributed=sharded),
                     process_group=group)


def read_tensors(folder: Path, part: str, tensors: dict[str, Any]) -> None:
    """Fill `tensors` (sharded like this run) from `folder/part`, whatever world size wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    with single_process_dcp():
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder / part)))


def saved_optimizer_rests(state: dict[str, Any]) -> dict[str, Any]:
    """The optimizers' non-tensor state by name (a checkpoint from before named optimizers has one)."""
    return state["optimizers"] if "optimizers" in state else {DEFAULT_OPTIMIZER: state["optimizer"]}


def load_training_state(folder: Path, model: nn.Module, optimizers: Optimizers, rank: int,
                        own_optimizer: bool = False) -> dict[str, Any]:
    """Fill model and optimizers from `folder`, whatever world size wrote it; return the rest."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    meta = read_meta(folder)
    written_by = meta.get("format", FORMAT)
    if written_by != FORMAT:
        raise PapertrainError(f"{folder} was written by strategy '{meta.get('strategy')}' "
                              f"({written_by}), which this strategy cannot read",
                              f"resume with strategy={meta.get('strategy')}, or "
                              "`papertrain export` the run to safetensors and start from the weights")
    state = load_train_state(folder)
    if own_optimizer and rank > 0:
        state.update(weights_only_load(folder / f"rank{rank}_{STATE_FILE}"))
    rests = saved_optimizer_rests(state)
    if set(rests) != set(optimizers):
        raise PapertrainError(f"checkpoint {folder} holds optimizer(s) {', '.join(sorted(rests)) or 'none'}; this config "
                              f"builds {', '.join(sorted(optimizers)) or 'none'}",
                              "use the config the checkpoint was trained with, or a new --run-dir")
    weights, _ = split_aliases(model_state(model))  # targets, sharded like this run
    moments = {name: split_optimizer_state(optimizer_state(model, optimizer))[0] for name, optimizer in optimizers.items()}
    try:
        read_tensors(folder, MODEL_DIR, weights)
        for name, tensors in moments.items():
            read_tensors(folder, optimizer_dir(name), tensors)
    except (Exception, CheckpointException) as err:  # shapes or names differ: say so, not DCP's internals
        raise PapertrainError(f"checkpoint {folder} does not fit the model and optimizer this config builds: "
                              f"{_last_line(err)}",
                              "use the config the checkpoint was trained with, or a new --run-dir") from None
    for alias, original in state["aliases"].items():
        weights[alias] = weights[original]
    set_model_state_dict(model, weights, options=StateDictOptions(strict=not has_frozen_base(model)))
    for name, optimizer in optimizers.items():
        set_optimizer_state_dict(model, optimizer, join_optimizer_state(moments[name], rests[name]))
    load_rng(folder, rank)
    return state


# --- named state: whatever else a recipe keeps (regret tables, replay buffers, EMA weights, environments) ---

STATE_DIR = "state"
_TENSOR = "_tensor_"  # marks where a tensor was taken out of a state tree


def _split_tree(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A state_dict with its tensors taken out (into `tensors`, keyed by their path) and marked in place."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree
        return {_TENSOR: prefix}
    if isinstance(tree, dict):
        return {key: _split_tree(value, f"{prefix}/{key}" if prefix else str(key), tensors) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [_split_tree(value, f"{prefix}/{i}" if prefix else str(i), tensors) for i, value in enumerate(tree)]
        return items if isinstance(tree, list) else tuple(items)
    return tree


def _join_tree(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            return tensors[tree[_TENSOR]]
        return {key: _join_tree(value, tensors) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [_join_tree(value, tensors) for value in tree]
        return items if isinstance(tree, list) else tuple(items)
    return tree


def state_scope(obj: Any) -> str:
    """"per_rank" (each rank its own: environments, a rank's replay buffer; resumes on the same number of
    ranks) or "replicated" (the same on every rank, or sharded DTensors: tables, EMA weights; reshards)."""
    scope = getattr(obj, "state_scope", "per_rank")
    if scope not in ("per_rank", "replicated"):
        raise PapertrainError(f"{type(obj).__name__}.state_scope is {scope!r}", "use 'per_rank' or 'replicated'")
    return scope


def save_named_state(folder: Path, named: dict[str, Any], rank: int) -> None:
    """Every named object's `state_dict()` (call on every rank): tensors as safetensors, the rest in a
    weights-only file. Replicated state goes through DCP (rank 0's copy, or each rank's DTensor shard, with
    offsets: it reshards), per-rank state into one file per rank."""
    from safetensors.torch import save_file

    sharded = dist.is_initialized() and dist.get_world_size() > 1
    for name, obj in named.items():
        tensors: dict[str, torch.Tensor] = {}
        rest = _split_tree(obj.state_dict(), "", tensors)
        target = folder / STATE_DIR / name
        if state_scope(obj) == "replicated":
            if tensors:
                write_tensors(folder, [(f"{STATE_DIR}/{name}", tensors)], sharded)
            if rank == 0:
                target.mkdir(parents=True, exist_ok=True)
                torch.save(rest, target / "rest.pt")
        else:
            target.mkdir(parents=True, exist_ok=True)
            if tensors:
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                          str(target / f"rank_{rank:05d}.safetensors"))
            torch.save(rest, target / f"rank_{rank:05d}.pt")


def load_named_state(folder: Path, named: dict[str, Any], rank: int, world_size: int) -> None:
    """Restore what `save_named_state` wrote into each named object (`load_state_dict`)."""
    from safetensors.torch import load_file

    written_by = read_meta(folder).get("world_size", world_size)
    for name, obj in named.items():
        target = folder / STATE_DIR / name
        if not target.is_dir():
            raise PapertrainError(f"checkpoint {folder} holds no state '{name}' ({type(obj).__name__})",
                                  "use the config the checkpoint was trained with, or a new --run-dir")
        if state_scope(obj) == "replicated":
            rest = weights_only_load(target / "rest.pt", folder)
            tensors: dict[str, torch.Tensor] = {}
            _split_tree(obj.state_dict(), "", tensors)  # targets with this run's shapes and sharding
            if tensors:
                read_tensors(folder, f"{STATE_DIR}/{name}", tensors)
        else:
            if written_by != world_size:
                raise PapertrainError(f"checkpoint {folder} holds state '{name}' of each of {written_by} ranks "
                                      f"(per rank: {type(obj).__name__}), and this job has {world_size}",
                                      f"resume on {written_by} ranks")
            rest = weights_only_load(target / f"rank_{rank:05d}.pt", folder)
            file = target / f"rank_{rank:05d}.safetensors"
            tensors = load_file(str(file)) if file.is_file() else {}
        obj.load_state_dict(_join_tree(rest, tensors))


def read_dcp_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The complete weights of a DCP checkpoint, whatever world size wrote it (tied weights under every name)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(folder / MODEL_DIR))
    metadata = reader.read_metadata()
    weights = {key: torch.empty(info.size, dtype=info.properties.dtype)
               for key, info in metadata.state_dict_metadata.items()}
    with single_process_dcp():
        dcp.load(weights, storage_reader=HuggingFaceStorageReader(str(folder / MODEL_DIR)))
    for alias, original in load_train_state(folder).get("aliases", {}).items():
        weights[alias] = weights[original]
    return weights


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
    restore_rng(weights_only_load(path, folder))


def load_train_state(folder: Path) -> dict[str, Any]:
    return weights_only_load(folder / STATE_FILE, folder)


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
