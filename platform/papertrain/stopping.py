"""Stopping a run cleanly: Ctrl-C, SIGTERM and a cluster's preemption signal become "stop after this step".

The first SIGINT or SIGTERM finishes the current step; then every rank saves a checkpoint at that same
step (ranks vote each step, since a signal reaches them at different moments) and the run returns
"interrupted" (the CLI exits with 130). A second Ctrl-C stops at once: the last complete checkpoint is
untouched, because saves are atomic, and the one being written is discarded on the next start.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any


class StopRequest:
    """Turns the first SIGINT/SIGTERM into "stop after this step"; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing this step, then saving a checkpoint (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    def request(self, reason: str) -> None:
        """Stop after this step, for `reason` (e.g. a cluster's preemption signal; see papertrain.cluster)."""
        if self.requested is None:
            self.requested = reason
            print(f"\n{reason}: finishing this step, then saving a checkpoint", file=sys.stderr, flush=True)

    def agreed(self, strategy: Any) -> bool:
        """True on every rank once any rank was asked to stop (a collective: every rank calls it each step)."""
        return strategy.any_rank(self.requested is not None)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C, with what is safe on disk (the CLI prints it and exits with 130)."""
