"""The evaluation gate: the candidate and the active model answer the same questions.

Three sets, from the run's export and the store:

* **held out**: the export's validation split (photos never trained on);
* **taught**: the accepted corrections that were trained on (does it now name the dish users
  taught it?);
* **kept**: a sample of approved (👍) answers of the active model (does it still agree?).

A correction scores 1 when the answer names the corrected dish (normalised containment); an
approved answer scores its character-level similarity to the approved text, which works for
Chinese and English alike. Both models answer greedily, each with the prompt it is served with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SetName = Literal["held_out", "taught", "kept"]
SET_NAMES: tuple[SetName, ...] = ("held_out", "taught", "kept")


@dataclass(frozen=True, slots=True)
class SampleResult:
    """One question of one set: what each model answered and how it scored (0..1)."""

    set_name: SetName
    image: str  # path of the photo, relative to the export directory
    question: str
    expected: str
    active_answer: str
    candidate_answer: str
    active_score: float
    candidate_score: float


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Every sample's result; the per-set means are derived."""

    samples: tuple[SampleResult, ...] = field(default=())

    def mean(self, set_name: SetName, model: Literal["active", "candidate"]) -> float | None:
        """The mean score of ``model`` on ``set_name`` (None for an empty set)."""
        scores = [
            s.active_score if model == "active" else s.candidate_score
            for s in self.samples
            if s.set_name == set_name
        ]
        return sum(scores) / len(scores) if scores else None

    def count(self, set_name: SetName) -> int:
        """How many samples ``set_name`` has."""
        return sum(1 for s in self.samples if s.set_name == set_name)


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether to promote, and the rule's reasoning in one sentence."""

    promote: bool
    reason: str
