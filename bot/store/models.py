"""The SQL schema, as typed SQLAlchemy 2 ORM classes: the single source the migrations follow.

Platform ids (Telegram chat ids, Discord snowflakes) are kept as text: they are opaque to
dishbot, and text holds both without caring about sign or width.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints, so that migrations can refer to them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
Id = BigInteger().with_variant(Integer(), "sqlite")
PLATFORM_ID = String(64)


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, on SQLite as on PostgreSQL.

    SQLite has no time zones and hands back naive values; this stores UTC and says so.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where UTC is required")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class ExchangeStatus(enum.StrEnum):
    PENDING = "pending"
    ANSWERED = "answered"
    FAILED = "failed"


class CorrectionStatus(enum.StrEnum):
    NEW = "new"
    ACCEPTED = "accepted"
    REJECTED = "rejected"


class RunStage(enum.StrEnum):
    """Where a training run is: the first seven are running, the last four are its end."""

    QUEUED = "queued"
    EXPORTING = "exporting"
    TRAINING = "training"
    CONVERTING = "converting"
    EVALUATING = "evaluating"
    PROMOTING = "promoting"
    DONE = "done"
    REJECTED = "rejected"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Whether the run has ended (done, rejected, failed or cancelled)."""
        return self in FINISHED_STAGES


FINISHED_STAGES = frozenset({RunStage.DONE, RunStage.REJECTED, RunStage.FAILED, RunStage.CANCELLED})
_RUNNING_SQL = ", ".join(f"'{stage.value}'" for stage in RunStage if stage not in FINISHED_STAGES)


def _status_column(enum_cls: type[enum.StrEnum], name: str) -> Enum:
    # A VARCHAR with a CHECK, the same on SQLite and PostgreSQL, and easy to extend.
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
    )


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("platform", "platform_user_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    platform: Mapped[str] = mapped_column(String(16))
    platform_user_id: Mapped[str] = mapped_column(PLATFORM_ID)
    display_name: Mapped[str | None] = mapped_column(String(255))
    language: Mapped[str | None] = mapped_column(String(16))
    # Weight of this user's feedback: 0 is ordinary, higher is trusted, negative is ignored.
    trust: Mapped[int] = mapped_column(SmallInteger, default=0, server_default=text("0"))
    banned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Photo(Base):
    __tablename__ = "photos"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(String(255), doc="relative to the data directory")
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Exchange(Base):
    """One question and its answer."""

    __tablename__ = "exchanges"
    __table_args__ = (
        # A platform re-delivering the same message must not create a second exchange.
        UniqueConstraint("platform", "chat_id", "question_message_id"),
        Index("ix_exchanges_reply", "platform", "chat_id", "reply_message_id"),
        # Recovery looks for pending rows; they are few among many answered ones.
        Index(
            "ix_exchanges_pending",
            "status",
            sqlite_where=text("status = 'pending'"),
            postgresql_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    platform: Mapped[str] = mapped_column(String(16))
    chat_id: Mapped[str] = mapped_column(PLATFORM_ID)
    question_message_id: Mapped[str | None] = mapped_column(PLATFORM_ID)
    reply_message_id: Mapped[str | None] = mapped_column(PLATFORM_ID)
    photo_sha256: Mapped[str | None] = mapped_column(
        ForeignKey("photos.sha256", ondelete="RESTRICT"), index=True
    )
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("exchanges.id", ondelete="SET NULL"), index=True
    )
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str | None] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[ExchangeStatus] = mapped_column(
        _status_column(ExchangeStatus, "exchange_status"), default=ExchangeStatus.PENDING
    )
    error: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    finished_at: Mapped[datetime | None] = mapped_column()
    # The serving process that answers it while pending: its host and pid, a token unique to
    # that run of it (a restarted container's pid 1 is another process), and since when.
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    owner_token: Mapped[str | None] = mapped_column(String(32))
    owned_since: Mapped[datetime | None] = mapped_column()


class Rating(Base):
    __tablename__ = "ratings"
    __table_args__ = (
        UniqueConstraint("exchange_id", "user_id"),
        CheckConstraint("value IN (-1, 1)", name="value_is_up_or_down"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    exchange_id: Mapped[int] = mapped_column(ForeignKey("exchanges.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    value: Mapped[int] = mapped_column(SmallInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When the user pressed the button; the latest press wins, whatever order writes land in.
    rated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Correction(Base):
    __tablename__ = "corrections"
    __table_args__ = (UniqueConstraint("exchange_id", "user_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    exchange_id: Mapped[int] = mapped_column(ForeignKey("exchanges.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    status: Mapped[CorrectionStatus] = mapped_column(
        _status_column(CorrectionStatus, "correction_status"), default=CorrectionStatus.NEW
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class CorrectionPrompt(Base):
    """A ✏️ prompt waiting for its reply: which answer a reply to that message corrects.

    Kept in the database so that a reply written after the bot restarted still counts.
    """

    __tablename__ = "correction_prompts"
    __table_args__ = (UniqueConstraint("platform", "chat_id", "message_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    platform: Mapped[str] = mapped_column(String(16))
    chat_id: Mapped[str] = mapped_column(PLATFORM_ID)
    message_id: Mapped[str] = mapped_column(PLATFORM_ID)
    exchange_id: Mapped[int] = mapped_column(
        ForeignKey("exchanges.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ModelVersion(Base):
    """A model the engine can serve, and how: the prompt and template it was trained with."""

    __tablename__ = "model_versions"
    __table_args__ = (
        # At most one active version, enforced by the database itself.
        Index(
            "uq_model_versions_one_active",
            "is_active",
            unique=True,
            sqlite_where=text("is_active"),
            postgresql_where=text("is_active"),
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    path: Mapped[str] = mapped_column(Text, doc="local path or hub id the engine loads")
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL"), doc="the version it was trained from"
    )
    trainer: Mapped[str | None] = mapped_column(String(32))
    # The run that made it; no foreign key, so that a run and its version can be written in
    # either order, and SQLite never has to rebuild this table.
    run_id: Mapped[int | None] = mapped_column(Id)
    system_prompt: Mapped[str | None] = mapped_column(Text, doc="None: dishbot's default")
    template: Mapped[str | None] = mapped_column(String(32), doc="None: the tokenizer's own")
    evaluation: Mapped[dict[str, Any] | None] = mapped_column()
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    is_active: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column()


class ModelActivation(Base):
    """One activation of a version, in order: what a rollback goes back through.

    A rollback marks the current activation ``rolled_back`` and reactivates the version of
    the newest activation before it that is not, so rollbacks walk back one step each.
    """

    __tablename__ = "model_activations"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    reason: Mapped[str] = mapped_column(String(32), doc="activate, promote, base")
    rolled_back: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    activated_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrainingRun(Base):
    """One retraining, from request to result, supervised by the process that started it."""

    __tablename__ = "training_runs"
    __table_args__ = (
        # One run at a time, enforced by the database: only unfinished runs are running,
        # and at most one row may be running.
        Index(
            "uq_training_runs_one_running",
            "is_running",
            unique=True,
            sqlite_where=text("is_running"),
            postgresql_where=text("is_running"),
        ),
        CheckConstraint(f"is_running = (stage IN ({_RUNNING_SQL}))", name="running_matches_stage"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    stage: Mapped[RunStage] = mapped_column(
        _status_column(RunStage, "run_stage"), default=RunStage.QUEUED, index=True
    )
    is_running: Mapped[bool] = mapped_column(Boolean, default=True)
    trainer: Mapped[str | None] = mapped_column(String(32))
    force: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    requested_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    # Where to report: the chat adapters edit one progress message.
    report_platform: Mapped[str | None] = mapped_column(String(16))
    report_chat_id: Mapped[str | None] = mapped_column(PLATFORM_ID)
    report_message_id: Mapped[str | None] = mapped_column(PLATFORM_ID)
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The supervising bot process, and the trainer subprocess's process group.
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    trainer_pgid: Mapped[int | None] = mapped_column(Integer)
    run_dir: Mapped[str | None] = mapped_column(Text)
    log_path: Mapped[str | None] = mapped_column(Text)
    output_path: Mapped[str | None] = mapped_column(Text)
    notes: Mapped[list[str]] = mapped_column(JSON, default=list)
    evaluation: Mapped[dict[str, Any] | None] = mapped_column()
    decision: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    base_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, doc="the supervisor's heartbeat")
    finished_at: Mapped[datetime | None] = mapped_column()


class InboxEntry(Base):
    """Something a platform delivered and the bot has not finished handling.

    Written before the platform is told it arrived (Telegram) or as soon as it arrives
    (Discord), deleted when its handling has ended, however it ended: what a process that
    died leaves here is handled again by the next (see `Store.orphaned_inbox`).
    """

    __tablename__ = "inbox"
    __table_args__ = (UniqueConstraint("platform", "key"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    platform: Mapped[str] = mapped_column(String(16))
    # Unique per platform: a Telegram update's "<bot id>:<update id>", a Discord message's
    # "<channel id>:<message id>".
    key: Mapped[str] = mapped_column(String(160))
    payload: Mapped[str] = mapped_column(Text, doc="what the adapter needs to handle it again")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Its owner, as for exchanges: the process that handles it (see `ExchangeOwner`).
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    owner_token: Mapped[str | None] = mapped_column(String(32))
    owned_since: Mapped[datetime | None] = mapped_column()
