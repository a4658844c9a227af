"""`python -m papertrain.launch RECIPE|CONFIG [key=value ...] [--run-dir DIR]`: train on this process."""

from __future__ import annotations

import os
import sys

from papertrain.cli import EXIT_USER_ERROR, main


def launcher_world_size() -> int:
    """The number of processes a launcher (torchrun, deepspeed, Slurm) says this job has."""
    for variable in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(variable):
            return int(os.environ[variable])
    return 1


if __name__ == "__main__":
    world = launcher_world_size()
    if world > 1:
        print(f"error: this job has {world} processes, but this version of papertrain trains on one process "
              "only (strategy=single); multi-process strategies are not available yet.\n"
              "  fix: launch a single process (python -m papertrain.launch ... or papertrain run ...)",
              file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)
    raise SystemExit(main(["run", *sys.argv[1:]]))
