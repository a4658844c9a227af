"""Other packages' warnings go to the run's log file, not the console.

A two-rank DeepSpeed run used to print 82 FutureWarnings in 186 lines of output: the console is for what
the user must read (progress, metrics, errors), and a deprecation notice inside a dependency is not that.
While a run trains, a warning raised from code outside papertrain is appended to RUN_DIR/warnings.log
(with the rank that saw it); warnings from papertrain's own code, which are meant for the user, are
shown as usual. Warnings raised before the run directory exists (while strategies and models are built)
are held and written once it does. At the end the run says, in one line, how many went to the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

WARNINGS_FILE = "warnings.log"


def _own_roots() -> tuple[str, ...]:
    import papertrain

    from papertrain.registry import recipes_root

    return (*(str(Path(p).resolve()) for p in papertrain.__path__), str(Path(recipes_root()).resolve()))


class ThirdPartyWarnings:
    def __init__(self, rank: int = 0):
        self.rank = rank
        self.pending: list[str] = []
        self.path: Path | None = None
        self.count = 0
        self.previous: Any = None
        self.roots = _own_roots()

    def install(self) -> None:
        self.previous = warnings.showwarning
        warnings.showwarning = self._show

    def uninstall(self) -> None:
        if self.previous is not None and warnings.showwarning == self._show:
            warnings.showwarning = self.previous
        self.previous = None

    def attach(self, run_dir: Path) -> None:
        """From now on (and for what was held until now) write to RUN_DIR/warnings.log."""
        self.path = Path(run_dir) / WARNINGS_FILE
        if self.pending:
            self._append(self.pending)
            self.pending = []

    def summary(self) -> str | None:
        if not self.count:
            return None
        where = self.path if self.path is not None else "nowhere (the run directory was never made)"
        return f"{self.count} warning(s) from other packages went to {where}"

    def _show(self, message: Any, category: type, filename: str, lineno: int, file: Any = None,
              line: str | None = None) -> None:
        if str(Path(filename).resolve()).startswith(self.roots):
            self.previous(message, category, filename, lineno, file, line)
            return
        self.count += 1
        text = f"[rank {self.rank}] " + warnings.formatwarning(message, category, filename, lineno, line)
        if self.path is None:
            self.pending.append(text)
        else:
            self._append([text])

    def _append(self, texts: list[str]) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.writelines(texts)
        except OSError:  # a full or read-only disk must not turn a warning into a crash
            pass
