"""What the store hands back: plain, frozen snapshots of rows, safe to pass between layers."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, fields
from datetime import date, datetime
from typing import Any, TypeVar

from bot.store.models import CorrectionStatus, ExchangeStatus, RunStage

R = TypeVar("R")


def snapshot(record_type: type[R], row: Any) -> R:
    """Copy the attributes a record declares from an ORM row."""
    names = [f.name for f in fields(record_type)]  # type: ignore[arg-type]
    return record_type(**{name: getattr(row, name) for name in names})


@dataclass(frozen=True, slots=True)
class UserRecord:
    id: int
    platform: str
    platform_user_id: str
    display_name: str | None
    language: str | None
    trust: int
    banned: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class PhotoRecord:
    sha256: str
    path: str
    width: int
    height: int
    format: str
    bytes: int


@dataclass(frozen=True, slots=True)
class ExchangeOwner:
    """A serving process that answers pending exchanges: its host, its pid, and a token
    unique to this run of it (a restarted container's pid 1 has the same pid, not the token)."""

    host: str
    pid: int
    token: str

    @classmethod
    def this_process(cls) -> ExchangeOwner:
        """This process, with a new token."""
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex)


@dataclass(frozen=True, slots=True)
class ExchangeRecord:
    id: int
    user_id: int
    platform: str
    chat_id: str
    question_message_id: str | None
    reply_message_id: str | None
    photo_sha256: str | None
    parent_id: int | None
    question: str
    answer: str | None
    model_version: str | None
    status: ExchangeStatus
    error: str | None
    latency_ms: int | None
    created_at: datetime
    finished_at: datetime | None
    host: str | None  # of the owner: see `ExchangeOwner`
    pid: int | None
    owner_token: str | None
    owned_since: datetime | None


@dataclass(frozen=True, slots=True)
class InboxRecord:
    """Something a platform delivered that its handler has not finished (see `InboxEntry`)."""

    id: int
    platform: str
    key: str
    payload: str
    attempts: int  # how often a process took it over after its owner was gone
    created_at: datetime
    host: str | None  # of the owner: see `ExchangeOwner`
    pid: int | None
    owner_token: str | None
    owned_since: datetime | None


@dataclass(frozen=True, slots=True)
class RatingRecord:
    exchange_id: int
    user_id: int
    value: int
    rated_at: datetime


@dataclass(frozen=True, slots=True)
class CorrectionRecord:
    id: int
    exchange_id: int
    user_id: int
    text: str
    status: CorrectionStatus
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class DayStats:
    """One day's questions (UTC): how many, how they ended, how long answers took."""

    day: date
    questions: int
    answered: int
    failed: int
    latency_p50_ms: int | None  # of the answered ones
    latency_p95_ms: int | None


@dataclass(frozen=True, slots=True)
class VersionRatings:
    """The 👍 and 👎 given to one model version's answers."""

    model_version: str
    up: int
    down: int

    @property
    def up_rate(self) -> float | None:
        """The share of ratings that are 👍 (None without ratings)."""
        total = self.up + self.down
        return self.up / total if total else None


@dataclass(frozen=True, slots=True)
class ReviewedCorrection:
    """One user's correction as a reviewer sees it: with who wrote it."""

    id: int
    text: str
    status: CorrectionStatus
    updated_at: datetime
    author: UserRecord


@dataclass(frozen=True, slots=True)
class ReviewItem:
    """An answer with corrections waiting for review: the photo of its conversation (a
    follow-up's is its first question's), the answer, and every correction of it."""

    exchange: ExchangeRecord
    photo_sha256: str | None
    corrections: tuple[ReviewedCorrection, ...]


@dataclass(frozen=True, slots=True)
class ModelVersionRecord:
    """A model version: what to load, how to serve it, where it came from, how it scored."""

    id: int
    name: str
    path: str
    parent_id: int | None  # the version it was trained from
    trainer: str | None
    run_id: int | None
    system_prompt: str | None  # None: dishbot's default prompt
    template: str | None  # None: the tokenizer's own chat template
    evaluation: dict[str, Any] | None
    metrics: dict[str, Any]
    is_active: bool
    created_at: datetime
    activated_at: datetime | None


@dataclass(frozen=True, slots=True)
class ReportTarget:
    """Where a run reports: the chat and the one progress message the adapter edits."""

    platform: str
    chat_id: str
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class TrainingRunRecord:
    """A training run as it stands.

    ``progress`` holds ``stage``, ``iteration``, ``total``, ``loss`` (or None) and ``eta_s``
    (or None) of the step under way; ``notes`` are remarks worth keeping ("retried with
    batch 1"); ``evaluation`` is the gate's result with per-set means under ``summary``.
    """

    id: int
    stage: RunStage
    trainer: str | None
    force: bool
    dry_run: bool
    requested_by: int | None
    report_platform: str | None
    report_chat_id: str | None
    report_message_id: str | None
    parameters: dict[str, Any]
    progress: dict[str, Any]
    host: str | None
    pid: int | None
    trainer_pgid: int | None
    run_dir: str | None
    log_path: str | None
    output_path: str | None
    notes: list[str]
    evaluation: dict[str, Any] | None
    decision: str | None
    error: str | None
    base_version_id: int | None
    model_version_id: int | None
    created_at: datetime
    started_at: datetime | None
    updated_at: datetime
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        """Whether the run has ended."""
        return self.stage.finished

    @property
    def report_to(self) -> ReportTarget | None:
        """Where the run reports, if anywhere."""
        if self.report_platform is None or self.report_chat_id is None:
            return None
        return ReportTarget(self.report_platform, self.report_chat_id, self.report_message_id)


@dataclass(frozen=True, slots=True)
class ForgetReport:
    """What `Store.forget` removed."""

    users: int
    exchanges: int
    ratings: int
    corrections: int
    photos: int
