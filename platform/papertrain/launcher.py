"""`papertrain launch`: N training processes on this machine (and M machines), ending as one process does.

    papertrain launch --nproc 4 gpt strategy=fsdp2
    papertrain launch --nproc 8 --nnodes 2 --node-rank 0 --master-addr node0 --master-port 29500 gpt ...

Each worker is `python -m papertrain.launch TARGET ...` with the environment torchrun would give it (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so `torchrun`, `deepspeed` and `srun`
start exactly the same program. What this launcher adds is the ending:

- **Ctrl-C or SIGTERM** reaches every worker once (the workers run in a process group of their own, so
  the terminal's signal goes to the launcher alone, which passes it on): every rank finishes its step,
  they save a checkpoint together, and the launcher exits 130 with one line. A second Ctrl-C is passed on
  too and stops the workers at once (the last complete checkpoint is untouched).
- **kill -9 of the launcher** (or of its process group) does not leave orphans training on: each worker
  asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG, set first thing in
  papertrain/launch), so it saves a checkpoint and exits. The run directory's lock is held by every rank,
  so no second run starts in it while any of them lives.
- **A failing worker** (a bad config: every rank says the same) ends the job with its exit status and
  one copy of the message; the other ranks' output is shown only where it differs (a rank of its own
  failure). A worker that dies while the others wait in a collective gets the others stopped after a grace
  period, instead of a hang.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from typing import Any

LAUNCHER_PID = "PAPERTRAIN_LAUNCHER_PID"
GRACE_S = 60.0  # how long the other ranks may take to notice a dead peer before they are stopped
KEEP_LINES = 400  # of each other rank's output, kept to show if it failed differently


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _own_process_group() -> None:
    os.setpgid(0, 0)


class Worker:
    """One training process. Rank 0 of this node writes to the terminal; the others to a temporary file (a
    file, not a pipe: if the launcher is killed, a pipe's writers would die of it, a file's carry on)."""

    def __init__(self, rank: int, local_rank: int, command: list[str], env: dict[str, str], show: bool):
        self.rank = rank
        environment = {**env, "RANK": str(rank), "LOCAL_RANK": str(local_rank)}
        self.log = None if show else tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, env=environment, stdout=self.log,
                                        stderr=subprocess.STDOUT if self.log else None, preexec_fn=_own_process_group)

    @property
    def last_lines(self) -> str:
        if self.log is None:
            return ""
        self.log.seek(0)
        return "".join(deque(self.log.read().decode("utf-8", errors="replace").splitlines(keepends=True),
                             maxlen=KEEP_LINES))

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass


def launch(worker_argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, master_addr: str | None = None,
           master_port: int | None = None) -> int:
    """Start this node's `nproc` workers, pass signals on, wait for all, and return the job's exit status."""
    world = nproc * nnodes
    address = master_addr or "127.0.0.1"
    port = master_port or (free_port() if nnodes == 1 else 29500)
    env = {**os.environ, "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": address,
           "MASTER_PORT": str(port), LAUNCHER_PID: str(os.getpid()), "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "papertrain.launch", *worker_argv]
    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        for worker in workers:
            worker.signal(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    workers: list[Worker] = []
    try:
        for local in range(nproc):
            rank = node_rank * nproc + local
            workers.append(Worker(rank, local, command, env, show=rank == node_rank * nproc))
        status = _wait(workers, received)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return status


def _wait(workers: list[Worker], received: list[int]) -> int:
    first_failure: float | None = None
    stopped = False
    while True:
        codes = [w.process.poll() for w in workers]
        if all(code is not None for code in codes):
            break
        if first_failure is None and any(code not in (None, 0) for code in codes):
            first_failure = time.monotonic()
        if first_failure is not None and not stopped and time.monotonic() - first_failure > GRACE_S:
            for worker in workers:  # a peer died; the others would wait for it in a collective forever
                worker.signal(signal.SIGKILL)
            stopped = True
        time.sleep(0.2)
    codes = [w.process.returncode for w in workers]
    lead = workers[0]
    for worker, code in zip(workers[1:], codes[1:]):  # another rank's own story, when it differs
        if code != lead.process.returncode and worker.last_lines:
            sys.stderr.write(f"--- rank {worker.rank} (exit {code}), its last lines:\n" + worker.last_lines)
    sys.stderr.flush()
    if received:
        return 130
    failed = [c for c in codes if c != 0]
    return 0 if not failed else (failed[0] if failed[0] > 0 else 1)


def die_with_parent() -> None:
    """In a worker: ask the kernel for SIGTERM when the process that started us dies (Linux), so that a
    killed launcher leaves no orphans training; the SIGTERM saves a checkpoint, as any stop does."""
    if not sys.platform.startswith("linux") or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return  # only a worker of a multi-process job
    expected = os.environ.get(LAUNCHER_PID)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if expected and expected.isdigit() and os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)  # our launcher died before we asked: act as if it had just died
