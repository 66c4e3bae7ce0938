"""What the dialog reports as it goes, for whoever counts (`bot.metrics`): plain calls, no state.

The dialog calls a `DialogObserver` when a question ends (answered or not) and when feedback
is stored. `NO_OBSERVER` ignores everything, so a dialog without metrics needs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

# How a question ended: the answer shown, or why not.
Outcome = Literal["answered", "refused", "cancelled", "timed_out", "unavailable", "failed"]


@dataclass(frozen=True, slots=True)
class AnswerTiming:
    """One answered question's figures, all measured from when it was handed to the engine."""

    queued_s: float  # waiting in the engine's queue (the engine's own figure)
    first_text_s: float | None  # until the first words of the answer (None: it came whole)
    total_s: float  # until the whole answer
    text: str  # the model's answer


class DialogObserver(Protocol):
    """Told about each question's end and each stored rating or correction."""

    def answered(self, timing: AnswerTiming) -> None:
        """A question was answered."""
        ...

    def not_answered(self, outcome: Outcome) -> None:
        """A question ended without an answer (refused before the engine, or failed in it)."""
        ...

    def rated(self, value: int) -> None:
        """A rating (+1 or -1) was stored."""
        ...

    def corrected(self) -> None:
        """A correction was stored."""
        ...


class _Ignore:
    def answered(self, timing: AnswerTiming) -> None:
        pass

    def not_answered(self, outcome: Outcome) -> None:
        pass

    def rated(self, value: int) -> None:
        pass

    def corrected(self) -> None:
        pass


NO_OBSERVER: DialogObserver = _Ignore()
