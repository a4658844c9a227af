"""What runs inside a Slurm job: one `TrainingJob` call per task (one task per GPU).

submitit pickles a `TrainingJob` at submission; on the cluster, `srun` starts one Python process per
task, and each loads the pickle and calls it. This module is the bridge between Slurm's world and the
trainer's:

1. Ranks. Slurm numbers the tasks (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS); we export them as the
   RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT that torch.distributed reads, with the
   job's first node as the rendezvous and a port derived from the job id (the same on every task, and
   again after a requeue). Every strategy (DDP, FSDP2, DeepSpeed, zero3_reference) then connects as
   under torchrun; no second launcher runs inside the job.

2. Preemption and time limits. Slurm sends SIGUSR2 `signal_delay_s` before the time limit (sbatch
   `--signal`), and a preempting scheduler SIGTERM. Either becomes the trainer's "stop after this step":
   the ranks agree on the step (a signal reaches them at different moments), save a checkpoint
   together, and return. Then rank 0 hands over to submitit, which calls `checkpoint()` (the saved
   checkpoint is all there is to keep) and requeues the job; the requeued job runs the same command
   with the same run directory, so it resumes from that checkpoint exactly.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainingJob:
    """Train `target` (a config file) with `overrides` into `run_dir`, as one task of a job."""

    target: str
    overrides: list[str]
    run_dir: str
    workdir: str
    env: dict[str, str] = field(default_factory=dict)
    trust: list[str] = field(default_factory=list)  # --trust on the submitting command line

    def __post_init__(self) -> None:
        self._trainer: Any = None
        self._signals: list[str] = []

    def __getstate__(self) -> dict[str, Any]:  # the pickle holds the command, never a live trainer
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    # -- the task -------------------------------------------------------------------------------------
    def __call__(self) -> dict[str, Any]:
        import submitit

        from papertrain.config import load_config
        from papertrain.trainer import Trainer

        os.chdir(self.workdir)
        os.environ.update(self.env)
        job = submitit.JobEnvironment()
        export_rendezvous(job)
        submitit_handler = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint() + requeue
        signal.signal(signal.SIGUSR2, self._on_usr2)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if job.global_rank == 0:
            print(f"papertrain: job {job.job_id}, task {job.global_rank} of {job.num_tasks} on {job.hostname}"
                  + (f", requeued {restarts} time(s)" if restarts else ""), flush=True)

        config = load_config(Path(self.target), self.overrides, trust=self.trust)
        self._trainer = Trainer(config, Path(self.run_dir))
        if self._signals:  # it came while we were starting up
            self._trainer.stop.request(self._signals[0])
        result = self._trainer.run()
        # From here on a SIGUSR2 has nothing left to stop. Ignore it rather than keep a Python handler:
        # the interpreter resets those to the default action (terminate) as it exits, so a signal that
        # lands during the exit of a finished job would turn a COMPLETED job into a FAILED one.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        outcome = {"status": result.status, "step": result.step, "run_dir": self.run_dir,
                   "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}
        if result.status == "interrupted" and self._signals and job.global_rank == 0 and callable(submitit_handler):
            print(f"papertrain: {self._signals[0]} at step {result.step}; checkpoint saved, requeueing", flush=True)
            submitit_handler(signal.SIGUSR2, None)  # calls self.checkpoint(), requeues, and exits
        return outcome

    def _on_usr2(self, signum: int, frame: Any) -> None:
        self._signals.append("SIGUSR2 (preempted, or near the time limit)")
        if self._trainer is not None:
            self._trainer.stop.request(self._signals[-1])

    # -- submitit's checkpoint protocol ---------------------------------------------------------------
    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit when the job is preempted or times out: what to run when it comes back.

        The trainer has already saved a checkpoint of the step it stopped at (all ranks together), so the
        same command, resuming from the run directory, is the whole continuation."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainingJob(self.target, self.overrides, self.run_dir,
                                                              self.workdir, self.env, self.trust))


def export_rendezvous(job: Any) -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from submitit's view of
    the job (Slurm's variables, or the local executor's)."""
    from papertrain.distributed import rendezvous_port

    tasks, nodes = job.num_tasks, max(job.num_nodes, 1)
    os.environ.update(
        RANK=str(job.global_rank), WORLD_SIZE=str(tasks), LOCAL_RANK=str(job.local_rank),
        LOCAL_WORLD_SIZE=str(max(1, tasks // nodes)),
        MASTER_ADDR=job.hostnames[0] if tasks > 1 else "127.0.0.1",
        MASTER_PORT=str(rendezvous_port(str(job.job_id))))
