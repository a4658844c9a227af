"""Errors a user can act on.

Anything raised as a `PapertrainError` is printed by the CLI as a short message with a hint and exits
with status 2, without a traceback: the message itself must say what is wrong and what to do.
Everything else is a bug in papertrain and keeps its traceback.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


def did_you_mean(name: str, options: Iterable[str]) -> str | None:
    """The closest of `options` to a mistyped `name`, if any is close enough to suggest."""
    close = difflib.get_close_matches(name, [str(o) for o in options], n=1, cutoff=0.6)
    return close[0] if close else None


class PapertrainError(Exception):
    """A problem with the user's input or environment, with a fix in the message."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config: where it was set, the dotted key, and what is wrong."""

    where: str  # "path/to/file.yaml:12", "command line" or "defaults"
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.key}: {self.message}"


class ConfigError(PapertrainError):
    """Every problem found in a config, reported together."""

    def __init__(self, source: str, issues: list[ConfigIssue]):
        self.source = source
        self.issues = list(issues)
        noun = "problem" if len(self.issues) == 1 else "problems"
        lines = [f"{source}: {len(self.issues)} config {noun}"]
        lines += [f"  {issue}" for issue in self.issues]
        super().__init__("\n".join(lines))
