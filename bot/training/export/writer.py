"""Turning the stream of exchanges, one photo at a time, into training files.

`DatasetWriter` is fed exchanges in photo order and holds only the current photo's
exchanges, the per-user sample counts and bounded tallies, so memory stays flat however
large the database. For each photo it judges every answer, builds the conversations,
leaves out samples that would not fit, collapses duplicates, applies the per-user cap,
places the photo and appends the records to ``train.jsonl`` or ``val.jsonl``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bot.store.feedback import ExchangeFeedback
from bot.store.photos import extension_for
from bot.training.export.conversations import (
    CandidateSample,
    conversation_paths,
    photo_conversations,
)
from bot.training.export.export_dir import ExportDirectory, PhotoUnavailable
from bot.training.export.options import ExportOptions
from bot.training.export.records import build_record, estimate_tokens, record_line
from bot.training.export.selection import Fate, SelectionRules, ignored_corrections, judge_turn
from bot.training.export.summary import MISSING_PHOTOS_LISTED, BoundedTally
from bot.training.export.targets import dish_label

TRAIN_FILE = "train.jsonl"
VAL_FILE = "val.jsonl"
UNKNOWN_MODEL_VERSION = "unknown"
# When one answer is in several candidate samples, the fate it is counted under.
_FATE_PRIORITY = (Fate.EXPORTED, Fate.DUPLICATE, Fate.USER_CAP, Fate.TOO_LONG, Fate.PHOTO_MISSING)


def is_validation_photo(sha256: str, val_fraction: float) -> bool:
    """Whether a photo's samples go to validation: decided by its hash alone.

    The same photo always lands on the same side, and raising the fraction only moves
    photos from training to validation.
    """
    # Multiplying by a power of two is exact, and int-to-float comparison is exact too.
    return int(sha256[:16], 16) < val_fraction * 16**16


@dataclass
class WriterTally:
    """Everything the writer counted, for the summary."""

    train_samples: int = 0
    val_samples: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    samples_left_out: Counter[str] = field(default_factory=Counter)
    placements: Counter[str] = field(default_factory=Counter)
    missing_photos: int = 0
    missing_photo_examples: list[str] = field(default_factory=list)
    votes_up: int = 0
    votes_down: int = 0
    rating_distribution: Counter[str] = field(
        default_factory=lambda: Counter(
            {"net positive": 0, "tied": 0, "net negative": 0, "no votes": 0}
        )
    )
    ignored_ratings: int = 0
    ignored_corrections: int = 0
    dishes: BoundedTally = field(default_factory=BoundedTally)
    model_versions: Counter[str] = field(default_factory=Counter)
    first_question_at: datetime | None = None
    last_question_at: datetime | None = None


class DatasetWriter:
    """Writes the records of an export, fed exchanges in photo order by `consume`."""

    def __init__(
        self,
        directory: ExportDirectory,
        photo_root: Path,
        rules: SelectionRules,
        options: ExportOptions,
        *,
        max_length: int,
        max_samples_per_user: int,
    ) -> None:
        self._directory = directory
        self._photo_root = photo_root
        self._rules = rules
        self._options = options
        self._max_length = max_length
        self._max_samples_per_user = max_samples_per_user
        self._files = contextlib.ExitStack()
        self._train = self._files.enter_context(directory.text_file(TRAIN_FILE))
        self._val = self._files.enter_context(directory.text_file(VAL_FILE))
        self._photo_group: list[ExchangeFeedback] = []
        self._samples_per_user: Counter[int] = Counter()
        self.tally = WriterTally()

    def consume(self, exchanges: Iterable[ExchangeFeedback]) -> None:
        """Take the next exchanges of the stream (ordered by photo, then id)."""
        for exchange in exchanges:
            group = self._photo_group
            if group and exchange.photo.sha256 != group[0].photo.sha256:
                self._write_photo(group)
                self._photo_group = []
            self._photo_group.append(exchange)

    def finish(self) -> WriterTally:
        """Write what is left and close the record files."""
        if self._photo_group:
            self._write_photo(self._photo_group)
            self._photo_group = []
        self.close()
        return self.tally

    def close(self) -> None:
        """Close the record files (also when the export failed half-way)."""
        self._files.close()

    def _write_photo(self, exchanges: Sequence[ExchangeFeedback]) -> None:
        paths = [
            path
            for path in conversation_paths(exchanges)
            if self._options.includes(path[0].created_at)
        ]
        considered = {exchange.id: exchange for path in paths for exchange in path}
        judgements = {eid: judge_turn(e, self._rules) for eid, e in considered.items()}
        for exchange in considered.values():
            if judgements[exchange.id].fate is not Fate.NOT_ANSWERED:
                self._count_feedback(exchange)
        conversations = photo_conversations(
            paths, judgements, include_unrated=self._options.include_unrated
        )
        sample_fates = self._write_samples(exchanges[0], conversations.candidates)
        for fate in conversations.left_out.values():
            if fate is not Fate.NOT_ANSWERED:
                self.tally.answers[fate] += 1
        for fates in sample_fates.values():
            self.tally.answers[next(f for f in _FATE_PRIORITY if f in fates)] += 1

    def _write_samples(
        self, first: ExchangeFeedback, candidates: Sequence[CandidateSample]
    ) -> dict[int, set[Fate]]:
        """Write the winning samples about one photo; the fates of every candidate's answers."""
        fates: dict[int, set[Fate]] = {}

        def settle(candidate: CandidateSample, fate: Fate) -> None:
            for exchange_id in candidate.exchange_ids:
                fates.setdefault(exchange_id, set()).add(fate)
            if fate is not Fate.EXPORTED:
                self.tally.samples_left_out[fate] += 1

        by_key: dict[tuple[str, ...], list[CandidateSample]] = {}
        for candidate in candidates:
            if self._estimate(candidate) > self._max_length:
                settle(candidate, Fate.TOO_LONG)
            else:
                by_key.setdefault(candidate.duplicate_key, []).append(candidate)
        image: str | None = None
        for duplicates in by_key.values():
            ranked = sorted(duplicates, key=lambda c: c.strength, reverse=True)
            winner = next((c for c in ranked if self._under_cap(c)), None)
            if winner is None:
                for candidate in ranked:
                    settle(candidate, Fate.USER_CAP)
                continue
            if image is None:
                image = self._place_photo(first)
            if not image:
                for candidate in ranked:
                    settle(candidate, Fate.PHOTO_MISSING)
                continue
            self._write_record(winner, image)
            settle(winner, Fate.EXPORTED)
            for candidate in ranked:
                if candidate is not winner:
                    settle(candidate, Fate.DUPLICATE)
        return fates

    def _estimate(self, candidate: CandidateSample) -> int:
        photo = candidate.turns[0].exchange.photo
        turns = [(turn.question, turn.answer) for turn in candidate.turns]
        return estimate_tokens(photo.width, photo.height, turns)

    def _under_cap(self, candidate: CandidateSample) -> bool:
        limit = self._max_samples_per_user
        return all(self._samples_per_user[user] < limit for user in candidate.accountable)

    def _place_photo(self, exchange: ExchangeFeedback) -> str:
        """The photo's file name in ``images/``, or "" when its file cannot be used."""
        photo = exchange.photo
        name = f"{photo.sha256}.{extension_for(photo.format)}"
        try:
            placement = self._directory.add_image(
                self._photo_root / photo.path, name, photo.sha256, photo.bytes
            )
        except PhotoUnavailable:
            self.tally.missing_photos += 1
            if len(self.tally.missing_photo_examples) < MISSING_PHOTOS_LISTED:
                self.tally.missing_photo_examples.append(photo.sha256)
            return ""
        self.tally.placements[placement] += 1
        return name

    def _write_record(self, sample: CandidateSample, image: str) -> None:
        photo = sample.turns[0].exchange.photo
        record = build_record(
            sample.record_id,
            image,
            photo.width,
            photo.height,
            [(turn.question, turn.answer) for turn in sample.turns],
        )
        if is_validation_photo(photo.sha256, self._options.val_fraction):
            self._val.write(record_line(record))
            self.tally.val_samples += 1
        else:
            self._train.write(record_line(record))
            self.tally.train_samples += 1
        for user in sample.accountable:
            self._samples_per_user[user] += 1
        self.tally.dishes.add(dish_label(sample.turns[0].answer))
        for turn in sample.turns:
            self.tally.model_versions[turn.exchange.model_version or UNKNOWN_MODEL_VERSION] += 1
        started = sample.turns[0].exchange.created_at
        tally = self.tally
        tally.first_question_at = min(filter(None, (tally.first_question_at, started)))
        tally.last_question_at = max(filter(None, (tally.last_question_at, started)))

    def _count_feedback(self, exchange: ExchangeFeedback) -> None:
        tally = self.tally
        tally.votes_up += exchange.votes_up
        tally.votes_down += exchange.votes_down
        tally.ignored_ratings += exchange.votes_ignored
        tally.ignored_corrections += ignored_corrections(exchange)
        net = exchange.votes_up - exchange.votes_down
        if not exchange.votes_up and not exchange.votes_down:
            tally.rating_distribution["no votes"] += 1
        elif net > 0:
            tally.rating_distribution["net positive"] += 1
        elif net < 0:
            tally.rating_distribution["net negative"] += 1
        else:
            tally.rating_distribution["tied"] += 1
