"""Reading a launcher's environment: torchrun-style variables, a Slurm step, or nothing."""

from __future__ import annotations

from papertrain.distributed import ProcessInfo, process_info, slurm_rendezvous


def test_torchrun_deepspeed_and_accelerate_variables() -> None:
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert process_info(env) == ProcessInfo(5, 8, 1, 4, "torchrun")


def test_a_slurm_step() -> None:
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_ID": "4242"}
    assert process_info(env) == ProcessInfo(3, 8, 1, 4, "slurm")


def test_a_batch_script_outside_any_step_is_one_process() -> None:
    """sbatch sets SLURM_PROCID and SLURM_NTASKS for the whole allocation, but only one process runs."""
    assert process_info({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}).world_size == 1
    assert process_info({}) == ProcessInfo(0, 1, 0, 1, "none")


def test_every_task_of_a_job_derives_the_same_rendezvous() -> None:
    env = {"SLURM_STEP_NODELIST": "gpu-node-17", "SLURM_JOB_ID": "4242"}
    address, port = slurm_rendezvous(env)
    assert address == "gpu-node-17" and 20000 <= int(port) < 40000
    assert slurm_rendezvous(dict(env)) == (address, port)
    assert slurm_rendezvous({**env, "SLURM_JOB_ID": "4243"})[1] != port
