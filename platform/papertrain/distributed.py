"""Who am I among the processes of this job, and connecting them.

Every launcher says it through environment variables:

    torchrun, deepspeed, accelerate    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    Slurm (inside an srun step)        SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_STEP_NODELIST

`process_info()` reads them; `connect()` starts torch.distributed (NCCL on GPUs, gloo on CPU) and checks
that the group it joined has the size the launcher promised, so that N unconnected copies of a job never
train side by side believing they are alone.
"""

from __future__ import annotations

import atexit
import gc
import os
import socket
import subprocess
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from papertrain.errors import PapertrainError


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # "none", "torchrun" (also deepspeed, accelerate) or "slurm"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def process_info(environ: dict[str, str] | None = None) -> ProcessInfo:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return ProcessInfo(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                           int(env.get("LOCAL_WORLD_SIZE", world)), "torchrun")
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1"))
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES", "1"))
        return ProcessInfo(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)),
                           max(1, world // max(nodes, 1)), "slurm")
    return ProcessInfo(0, 1, 0, 1, "none")


def slurm_rendezvous(env: dict[str, str]) -> tuple[str, str]:
    """MASTER_ADDR = the step's first node; MASTER_PORT derived from the job id (same on every task)."""
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                               check=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        first = nodes.split(",")[0]
    return first, str(rendezvous_port(env.get("SLURM_JOB_ID", "0")))


def rendezvous_port(job_id: str) -> int:
    """A port in 20000-39999 from a Slurm job id ("123", or "123_4" for an array element): the same on
    every task of the job and after a requeue, and different for array elements sharing a node."""
    return 20000 + zlib.crc32(job_id.encode()) % 20000


def connect(info: ProcessInfo, device_type: str, expected_world_size: int | None = None,
            timeout_s: int = 1800, single_rank_group: bool = False) -> None:
    """Join the job's process group; refuse a world size nobody asked for. One process joins nothing,
    unless `single_rank_group` (a multi-process strategy run on one rank, on purpose) asks for a group of one."""
    if expected_world_size is not None and expected_world_size != info.world_size:
        raise PapertrainError(
            f"strategy.world_size={expected_world_size}, but this process was started as one of "
            f"{info.world_size} (launcher: {info.launcher})",
            "check the launcher's process count; `accelerate launch --cpu` runs ONE process whatever "
            "--num_processes says: use `papertrain launch --nproc N` (torchrun) instead")
    if dist.is_initialized():
        return
    atexit.register(disconnect)  # a process that never calls it must still not exit with live groups
    if not info.distributed:
        if single_rank_group:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                    init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        return
    if info.launcher == "slurm":
        address, port = slurm_rendezvous(dict(os.environ))
        os.environ.setdefault("MASTER_ADDR", address)
        os.environ.setdefault("MASTER_PORT", port)
        os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank))
    backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
        kwargs["device_id"] = torch.device("cuda", info.local_rank)
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    if dist.get_world_size() != info.world_size:
        raise PapertrainError(f"joined a process group of {dist.get_world_size()}, expected {info.world_size}")


def disconnect() -> None:
    """Leave the job's process groups, and free them while the interpreter is whole.

    A group freed only during interpreter exit can abort the process: its gloo worker thread, releasing
    the last collective it ran, needs the GIL that exit is tearing down ("terminate called without an
    active exception"). Hence Trainer._close drops the model (FSDP2 holds the groups) before this."""
    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over all ranks (identity for one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return values
    return {k: v / dist.get_world_size() for k, v in sum_across_ranks(values).items()}


def sum_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Add up a dict of floats over all ranks (identity for one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    return dict(zip(keys, stacked.tolist()))


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s Python value on every rank (small values: paths, flags)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
