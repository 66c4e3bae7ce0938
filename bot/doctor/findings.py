"""What one doctor check found: a status, the check's name and one line of text."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    """How a check came out. FAIL: `dishbot run` would not start, or not answer."""

    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


STATUS_WIDTH = 6
NAME_WIDTH = 12


@dataclass(frozen=True)
class Finding:
    """One line of the doctor's report: ``ok    python      3.11.9 (needs 3.11+)``."""

    status: Status
    check: str
    text: str

    def line(self) -> str:
        """The line as the doctor prints it; the name column widens for a long name."""
        name = self.check.ljust(NAME_WIDTH - 1)
        return f"{self.status.value.ljust(STATUS_WIDTH)}{name} {self.text}"


def ok(check: str, text: str) -> Finding:
    """A check that passed."""
    return Finding(Status.OK, check, text)


def warn(check: str, text: str) -> Finding:
    """Something is off or missing, but `dishbot run` starts and answers without it."""
    return Finding(Status.WARN, check, text)


def fail(check: str, text: str) -> Finding:
    """Something that stops `dishbot run` from starting or from answering."""
    return Finding(Status.FAIL, check, text)


def with_fix(problem: str, fix: str) -> str:
    """A problem and what to do about it, as one line."""
    return f"{problem} — {fix}"
