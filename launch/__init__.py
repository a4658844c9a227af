"""Per-process entry point: `python -m papertrain.launch RECIPE|CONFIG [key=value ...]`.

This is what torchrun, the deepspeed launcher, accelerate and Slurm start on every rank. It reads the
rank and world size those launchers put in the environment (RANK, WORLD_SIZE, LOCAL_RANK) and refuses
to train if the processes it finds are not the ones it expected, rather than silently running N
unconnected copies.
"""
