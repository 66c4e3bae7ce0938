"""What an export did, counted: for the chat reply, the command line, the card and the manifest."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bot.training.export.selection import EXCLUDED_FATES, Fate
from bot.training.export.text import comparison_key

MISSING_PHOTOS_LISTED = 10


@dataclass(frozen=True, slots=True)
class ExportSummary:
    """The outcome of one export.

    ``answers`` counts every answer considered by what became of it (`Fate` values);
    ``samples_left_out`` counts candidate samples that were not written, by reason.
    """

    out_dir: Path
    train_samples: int
    val_samples: int
    answers: Mapping[str, int]
    samples_left_out: Mapping[str, int]
    photos_linked: int
    photos_copied: int
    missing_photos: int
    missing_photo_examples: tuple[str, ...]
    votes_up: int
    votes_down: int
    rating_distribution: Mapping[str, int]
    ignored_ratings: int
    ignored_corrections: int
    top_dishes: tuple[tuple[str, int], ...]
    model_versions: Mapping[str, int]
    first_question_at: datetime | None
    last_question_at: datetime | None
    train_command: str = field(default="")

    @property
    def samples(self) -> int:
        """Samples written, training and validation together."""
        return self.train_samples + self.val_samples

    @property
    def exported_answers(self) -> int:
        """Answers that are in a written sample."""
        return self.answers.get(Fate.EXPORTED, 0)

    @property
    def answers_considered(self) -> int:
        """Every answer the filters let through, exported or not."""
        return sum(self.answers.values())

    @property
    def photos(self) -> int:
        """Photos in the export's images folder."""
        return self.photos_linked + self.photos_copied

    def held_back(self) -> dict[str, int]:
        """Answers not exported that a later export may take, by reason."""
        return {
            reason: count
            for reason, count in self.answers.items()
            if reason != Fate.EXPORTED and reason not in EXCLUDED_FATES
        }

    def excluded(self) -> dict[str, int]:
        """Answers not exported for good (net-negative, banned, empty), by reason."""
        return {r: n for r, n in self.answers.items() if r in EXCLUDED_FATES}

    def lines(self) -> list[str]:
        """A short account in English, for the chat reply and the command line."""
        lines = [
            f"Exported {self.samples:,} samples ({self.train_samples:,} train, "
            f"{self.val_samples:,} validation) from {self.exported_answers:,} of "
            f"{self.answers_considered:,} answers, with {self.photos:,} photos, "
            f"to {self.out_dir}."
        ]
        if self.samples == 0:
            lines.append("Nothing qualifies for training yet.")
        held_back = self.held_back()
        if held_back:
            lines.append("Held back: " + _list_counts(held_back) + ".")
        excluded = self.excluded()
        if excluded:
            lines.append("Excluded: " + _list_counts(excluded) + ".")
        if self.ignored_ratings or self.ignored_corrections:
            lines.append(
                f"Ignored {self.ignored_ratings:,} ratings and {self.ignored_corrections:,} "
                "corrections from banned or distrusted users."
            )
        if self.missing_photos:
            examples = ", ".join(sha[:12] for sha in self.missing_photo_examples)
            lines.append(
                f"{self.missing_photos:,} photo files were missing or damaged ({examples}); "
                "their samples were left out."
            )
        if self.train_command:
            lines.append(f"Train: {self.train_command}")
        return lines

    def counts(self) -> dict[str, Any]:
        """The counts as plain data, for the manifest."""
        return {
            "samples": {"train": self.train_samples, "val": self.val_samples},
            "answers": dict(sorted(self.answers.items())),
            "samples_left_out": dict(sorted(self.samples_left_out.items())),
            "photos": {
                "linked": self.photos_linked,
                "copied": self.photos_copied,
                "missing": self.missing_photos,
            },
            "votes": {"up": self.votes_up, "down": self.votes_down},
            "rating_distribution": dict(self.rating_distribution),
            "ignored_feedback": {
                "ratings": self.ignored_ratings,
                "corrections": self.ignored_corrections,
            },
            "model_versions": dict(sorted(self.model_versions.items())),
        }


def _list_counts(counts: Mapping[str, int]) -> str:
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{count:,} {reason}" for reason, count in ordered)


class BoundedTally:
    """Counts of labels, loosely compared, in bounded memory: the most frequent survive.

    When more than ``capacity`` labels are held, the rarest are dropped, so counts of very
    common labels stay exact while a long tail of one-offs cannot grow without end.
    """

    def __init__(self, capacity: int = 5000) -> None:
        self.capacity = capacity
        self._counts: dict[str, int] = {}
        self._spelling: dict[str, str] = {}

    def add(self, label: str) -> None:
        """Count one more ``label`` (labels that compare equal count together)."""
        key = comparison_key(label)
        if not key:
            return
        self._spelling.setdefault(key, label)
        self._counts[key] = self._counts.get(key, 0) + 1
        if len(self._counts) > self.capacity:
            self._drop_rarest()

    def _drop_rarest(self) -> None:
        rarest = min(self._counts.values())
        for key in [k for k, n in self._counts.items() if n == rarest]:
            del self._counts[key]
            del self._spelling[key]

    def most_common(self, n: int) -> tuple[tuple[str, int], ...]:
        """The ``n`` most frequent labels with their counts, ties in label order."""
        ordered = sorted(self._counts.items(), key=lambda item: (-item[1], item[0]))
        return tuple((self._spelling[key], count) for key, count in ordered[:n])
