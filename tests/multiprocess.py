"""Run a function on N local ranks (gloo on CPU), as torchrun would, from inside a test."""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _entry(rank: int, world: int, port: int, function: Callable[..., Any], args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    function(*args)


def run_ranks(world: int, function: Callable[..., Any], *args: Any) -> None:
    """Start `world` processes running `function(*args)` with torchrun's environment; raise if any fails."""
    mp.spawn(_entry, args=(world, free_port(), function, args), nprocs=world, join=True)
