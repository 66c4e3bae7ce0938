"""What the store hands back: plain, frozen snapshots of rows, safe to pass between layers."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, TypeVar

from bot.store.models import CorrectionStatus, ExchangeStatus, TrainingStatus

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
class ModelVersionRecord:
    id: int
    name: str
    path: str
    parent_id: int | None
    metrics: dict[str, Any]
    is_active: bool
    created_at: datetime
    activated_at: datetime | None


@dataclass(frozen=True, slots=True)
class TrainingRunRecord:
    id: int
    status: TrainingStatus
    requested_by: int | None
    parameters: dict[str, Any]
    dataset_path: str | None
    output_path: str | None
    model_version_id: int | None
    metrics: dict[str, Any]
    error: str | None
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class ForgetReport:
    """What `Store.forget` removed."""

    users: int
    exchanges: int
    ratings: int
    corrections: int
    photos: int
