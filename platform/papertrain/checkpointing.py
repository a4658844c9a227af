"""The loop's checkpointer: save (in the foreground or background), resume from the newest intact
checkpoint, and say exactly what is safe on disk when something goes wrong.

    checkpointer.resume(model, optimizers, named)   -> the saved train state, or None for a fresh run
    checkpointer.save(step, model, optimizers, state, named)
    checkpointer.commit_pending()                    wait for a background save and rename it into place

What a checkpoint holds (papertrain/checkpoint.py): the model, every named optimizer, the train state
(step, schedulers, data position, the log window), each rank's random generators, and the *named state*
of whatever else is stateful (a data source's environments, a task's tables, a callback's EMA weights).

Failures end in one message: a full disk names the checkpoint being written and the newest complete one
(and frees the partial folder); a second Ctrl-C inside a save (which DCP wraps in its own exception)
becomes a plain interruption; a damaged checkpoint is set aside and the next older one resumes. Every
rank agrees on the outcome of a save by a vote, so one rank's failure never leaves the others waiting.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Any

from papertrain.checkpoint import CheckpointDir, load_named_state, save_named_state
from papertrain.errors import PapertrainError
from papertrain.stopping import Interrupted

DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def unwrap_failure(err: BaseException) -> BaseException:
    """DCP reports a rank's failure as a CheckpointException holding the original; return the original."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            return unwrap_failure(inner[0])
    return err


class Checkpointer:
    def __init__(self, run_dir: Path, strategy: Any, keep_last: int):
        self.run_dir = run_dir
        self.strategy = strategy
        self.folder = CheckpointDir(run_dir / "checkpoints", keep_last, is_main=strategy.is_main)
        self.saved_step = -1  # the step of the last checkpoint written or loaded
        self.resumed_from: Path | None = None
        self.pending: tuple[int, list[Any], dict[str, Any]] | None = None

    # -- what is on disk ------------------------------------------------------------------------------
    def remove_partial(self) -> None:
        """Temporary folders of saves that were killed (rank 0, before anything else)."""
        self.folder.remove_partial()

    def safe_on_disk(self) -> str:
        latest = self.folder.newest_complete()
        if latest is None:
            return "no checkpoint was completed yet"
        return f"the newest complete checkpoint is step {latest[0]} ({latest[1]})"

    # -- resume ---------------------------------------------------------------------------------------
    def resume(self, model: Any, optimizers: dict[str, Any], named: dict[str, Any]) -> dict[str, Any] | None:
        """Load the newest intact checkpoint into model, optimizers and named state (every rank); rank 0
        checks them, sets damaged ones aside with a note, and tells the other ranks which one to read."""
        from papertrain.strategies import checkpoint_formats

        strategy = self.strategy
        choice, notes = (self.folder.newest_intact(set(checkpoint_formats())) if strategy.is_main else (None, []))
        for note in notes:
            print(f"warning: {note}", file=sys.stderr, flush=True)
        shared = strategy.broadcast([str(choice[1]) if choice else None, len(notes)])
        if shared[0] is None:
            if shared[1]:
                raise PapertrainError(f"no intact checkpoint is left in {self.folder.root} (the damaged ones were "
                                      "moved aside, see the warnings above)",
                                      "run the same command again to train from step 0, or restore the checkpoints")
            return None
        folder = Path(shared[0])
        if notes:
            print(f"resuming from the newest intact checkpoint instead: {folder}", file=sys.stderr, flush=True)
        state = strategy.load(folder, model, optimizers)
        load_named_state(folder, named, strategy.rank, strategy.world_size)
        self.saved_step = state["step"]
        self.resumed_from = folder
        return state

    # -- save -----------------------------------------------------------------------------------------
    def save(self, step: int, model: Any, optimizers: dict[str, Any], state: dict[str, Any],
             named: dict[str, Any]) -> None:
        """Checkpoint `step` (every rank). With strategy.async_checkpoint the tensors are written in the
        background and the folder is renamed into place by the next save, or by `commit_pending`."""
        if self.saved_step == step:
            return
        self.commit_pending()  # one background save at a time
        strategy = self.strategy
        meta = {"world_size": strategy.world_size, "strategy": strategy.name, "format": strategy.checkpoint_format}
        folder = self.folder.temporary(step)
        self._guarded(step, lambda: self.folder.prepare_temporary(step) if strategy.is_main else None)
        pending: list[Any] = []

        def write() -> None:
            pending.extend(strategy.save(folder, model, optimizers, state) or [])
            save_named_state(folder, named, strategy.rank)

        self._guarded(step, write)
        self.pending = (step, pending, meta)
        if not pending:
            self.commit_pending()
        self.saved_step = step

    def commit_pending(self) -> None:
        """Wait for a checkpoint being written in the background, then rename it into place (every rank)."""
        if self.pending is None:
            return
        step, futures, meta = self.pending
        self.pending = None

        def wait() -> None:
            for future in futures:
                future.result()

        self._guarded(step, wait)  # (its vote is also the barrier: every rank has written)
        self._guarded(step, lambda: self.folder.finalize(step, meta) if self.strategy.is_main else None)

    def _guarded(self, step: int, action: Any) -> Any:
        """Run one part of a save; every rank learns whether any rank failed, and all raise one clear error."""
        failure: BaseException | None = None
        result = None
        try:
            result = action()
        except BaseException as err:  # DCP's CheckpointException is a BaseException
            failure = unwrap_failure(err)
            if isinstance(failure, KeyboardInterrupt):  # a second Ctrl-C: stop now, say what is complete
                self.folder.discard(step)
                raise Interrupted(f"interrupted while writing checkpoint step {step}; {self.safe_on_disk()}") from None
            if not isinstance(failure, Exception):
                raise
        if self.strategy.any_rank(failure is not None):
            self.folder.discard(step)
            raise self._explain(step, failure)
        return result

    def _explain(self, step: int, failure: BaseException | None) -> BaseException:
        where = self.folder.root
        if isinstance(failure, PapertrainError):
            return failure
        if failure is None:
            return PapertrainError(f"another rank failed to write checkpoint step {step} (its error is in its own "
                                   f"output); {self.safe_on_disk()}",
                                   "fix what that rank reports, then run the same command again to resume")
        if isinstance(failure, OSError) and failure.errno in DISK_FULL:
            return PapertrainError(
                f"the disk is full: checkpoint step {step} could not be written to {where} "
                f"({failure.strerror}); the partial folder was removed, and {self.safe_on_disk()}",
                "free disk space (or move the run with --run-dir to a disk with room), then run the same command "
                "again: it resumes from that checkpoint")
        if isinstance(failure, OSError):
            return PapertrainError(f"checkpoint step {step} could not be written to {where}: {failure.strerror or failure}"
                                   f"; {self.safe_on_disk()}",
                                   "make the run directory writable (or use another --run-dir), then run the same "
                                   "command again")
        return PapertrainError(f"checkpoint step {step} could not be written: {type(failure).__name__}: {failure}; "
                               f"{self.safe_on_disk()}", "run the same command again to resume")

