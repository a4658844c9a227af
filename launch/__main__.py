"""`python -m papertrain.launch RECIPE|CONFIG [key=value ...] [--run-dir DIR]`: train as this process's rank.

Launchers start this module once per process:

    papertrain launch --nproc 4 gpt strategy=fsdp2                  (torchrun underneath)
    torchrun --nproc_per_node 4 -m papertrain.launch gpt strategy=fsdp2
    deepspeed --num_gpus 4 --module papertrain.launch gpt strategy=deepspeed strategy.stage=3
    accelerate launch --multi_gpu --num_processes 4 -m papertrain.launch gpt strategy=ddp strategy.world_size=4
    srun python -m papertrain.launch gpt strategy=fsdp2              (inside a Slurm allocation)

The rank, world size and rendezvous come from the environment those launchers set (see
papertrain.distributed); the deepspeed launcher's extra `--local_rank=N` argument is accepted and ignored.
"""

from __future__ import annotations

import re
import sys



def strip_launcher_arguments(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local-rank N` (the deepspeed launcher's; LOCAL_RANK says the same)."""
    kept, skip_next = [], False
    for word in argv:
        if skip_next:
            skip_next = False
        elif re.fullmatch(r"--local[_-]rank=\d+", word):
            continue
        elif word in ("--local_rank", "--local-rank"):
            skip_next = True
        else:
            kept.append(word)
    return kept


if __name__ == "__main__":
    from papertrain.launcher import die_with_parent

    die_with_parent()  # first thing: a killed launcher must not leave this process training on its own
    from papertrain.cli import main

    raise SystemExit(main(["run", *strip_launcher_arguments(sys.argv[1:])]))
