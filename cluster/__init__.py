"""Slurm support through submitit (`papertrain submit`): cluster profiles live in this folder as YAML."""
