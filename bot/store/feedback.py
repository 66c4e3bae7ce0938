"""Reading every answer with its feedback, as one consistent stream, for the training export.

The export must see the whole database as it was at one moment and must not hold it in
memory, so `feedback_snapshot` opens one read-only transaction (REPEATABLE READ on
PostgreSQL; an SQLite read transaction is a snapshot by itself) and streams exchanges from a
server-side cursor, ordered by the photo of their conversation and then by id. That order
puts every exchange about one photo next to each other, so a reader can collapse duplicates
and rebuild follow-up chains one photo at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import CTE, Row, Select, and_, case, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.orm import aliased

from bot.store.models import (
    Correction,
    CorrectionStatus,
    Exchange,
    ExchangeStatus,
    Photo,
    Rating,
    User,
)
from bot.store.records import PhotoRecord

STREAM_CHUNK_ROWS = 1000  # rows fetched from the server-side cursor at a time


@dataclass(frozen=True, slots=True)
class Author:
    """Who wrote a question or a correction, with what the export needs to weigh it."""

    id: int
    platform: str
    platform_user_id: str
    trust: int
    banned: bool

    @property
    def ignored(self) -> bool:
        """Banned users and users of negative trust have no say."""
        return self.banned or self.trust < 0


@dataclass(frozen=True, slots=True)
class CorrectionFeedback:
    """One user's correction of an answer."""

    id: int
    text: str
    status: CorrectionStatus
    updated_at: datetime
    author: Author


@dataclass(frozen=True, slots=True)
class ExchangeFeedback:
    """One question and answer about a photo, with the votes and corrections it received.

    ``photo`` is the photo of the conversation: the exchange's own, or for a follow-up
    stored without one, its parent's. Votes of banned or distrusted users are counted
    apart, in ``votes_ignored``.
    """

    id: int
    parent_id: int | None
    asker: Author
    photo: PhotoRecord
    question: str
    answer: str | None
    status: ExchangeStatus
    model_version: str | None
    created_at: datetime
    votes_up: int
    votes_down: int
    votes_ignored: int
    corrections: tuple[CorrectionFeedback, ...]


def _conversation_photos() -> CTE:
    """(exchange id, photo) for every exchange; follow-ups without a photo inherit it."""
    anchor = select(
        Exchange.id.label("exchange_id"), Exchange.photo_sha256.label("photo_sha256")
    ).where(Exchange.photo_sha256.is_not(None))
    photos = anchor.cte("conversation_photos", recursive=True)
    follow_up = aliased(Exchange)
    return photos.union_all(
        select(follow_up.id, photos.c.photo_sha256)
        .join(photos, follow_up.parent_id == photos.c.exchange_id)
        .where(follow_up.photo_sha256.is_(None))
    )


def _vote_counts() -> Any:
    """Per exchange: 👍 and 👎 from users who count, and votes from users who do not."""
    counts = and_(~User.banned, User.trust >= 0)
    return (
        select(
            Rating.exchange_id,
            func.sum(case((and_(counts, Rating.value > 0), 1), else_=0)).label("up"),
            func.sum(case((and_(counts, Rating.value < 0), 1), else_=0)).label("down"),
            func.sum(case((counts, 0), else_=1)).label("ignored"),
        )
        .join(User, User.id == Rating.user_id)
        .group_by(Rating.exchange_id)
        .subquery("vote_counts")
    )


def _feedback_rows() -> Select[*tuple[Any, ...]]:
    """One row per exchange and correction (or one row with no correction), labelled."""
    photos = _conversation_photos()
    votes = _vote_counts()
    asker = aliased(User, name="asker")
    author = aliased(User, name="author")
    return (
        select(
            Exchange.id.label("exchange_id"),
            Exchange.parent_id,
            Exchange.question,
            Exchange.answer,
            Exchange.status,
            Exchange.model_version,
            Exchange.created_at,
            asker.id.label("asker_id"),
            asker.platform.label("asker_platform"),
            asker.platform_user_id.label("asker_platform_user_id"),
            asker.trust.label("asker_trust"),
            asker.banned.label("asker_banned"),
            Photo.sha256.label("photo_sha256"),
            Photo.path.label("photo_path"),
            Photo.width.label("photo_width"),
            Photo.height.label("photo_height"),
            Photo.format.label("photo_format"),
            Photo.bytes.label("photo_bytes"),
            func.coalesce(votes.c.up, 0).label("votes_up"),
            func.coalesce(votes.c.down, 0).label("votes_down"),
            func.coalesce(votes.c.ignored, 0).label("votes_ignored"),
            Correction.id.label("correction_id"),
            Correction.text.label("correction_text"),
            Correction.status.label("correction_status"),
            Correction.updated_at.label("correction_updated_at"),
            author.id.label("author_id"),
            author.platform.label("author_platform"),
            author.platform_user_id.label("author_platform_user_id"),
            author.trust.label("author_trust"),
            author.banned.label("author_banned"),
        )
        .join(photos, photos.c.exchange_id == Exchange.id)
        .join(Photo, Photo.sha256 == photos.c.photo_sha256)
        .join(asker, asker.id == Exchange.user_id)
        .outerjoin(votes, votes.c.exchange_id == Exchange.id)
        .outerjoin(Correction, Correction.exchange_id == Exchange.id)
        .outerjoin(author, author.id == Correction.user_id)
        .order_by(Photo.sha256, Exchange.id, Correction.id)
    )


def _exchange_from(row: Row[Any], corrections: tuple[CorrectionFeedback, ...]) -> ExchangeFeedback:
    return ExchangeFeedback(
        id=row.exchange_id,
        parent_id=row.parent_id,
        question=row.question,
        answer=row.answer,
        status=row.status,
        model_version=row.model_version,
        created_at=row.created_at,
        asker=Author(
            id=row.asker_id,
            platform=row.asker_platform,
            platform_user_id=row.asker_platform_user_id,
            trust=row.asker_trust,
            banned=row.asker_banned,
        ),
        photo=PhotoRecord(
            sha256=row.photo_sha256,
            path=row.photo_path,
            width=row.photo_width,
            height=row.photo_height,
            format=row.photo_format,
            bytes=row.photo_bytes,
        ),
        votes_up=int(row.votes_up),
        votes_down=int(row.votes_down),
        votes_ignored=int(row.votes_ignored),
        corrections=corrections,
    )


def _correction_from(row: Row[Any]) -> CorrectionFeedback | None:
    if row.correction_id is None:
        return None
    return CorrectionFeedback(
        id=row.correction_id,
        text=row.correction_text,
        status=row.correction_status,
        updated_at=row.correction_updated_at,
        author=Author(
            id=row.author_id,
            platform=row.author_platform,
            platform_user_id=row.author_platform_user_id,
            trust=row.author_trust,
            banned=row.author_banned,
        ),
    )


class FeedbackSnapshot:
    """The database as it was when the snapshot began, read in one transaction."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def count_exchanges(self) -> int:
        """How many exchanges `exchanges` will yield (every exchange about a photo)."""
        photos = _conversation_photos()
        count = await self._connection.scalar(select(func.count()).select_from(photos))
        return int(count or 0)

    async def exchanges(self) -> AsyncIterator[ExchangeFeedback]:
        """Every exchange about a photo, ordered by photo sha256 then id, with its feedback.

        Rows come from a server-side cursor a chunk at a time, so memory does not grow
        with the number of exchanges.
        """
        statement = _feedback_rows().execution_options(yield_per=STREAM_CHUNK_ROWS)
        result = await self._connection.stream(statement)
        current: Row[Any] | None = None
        corrections: list[CorrectionFeedback] = []
        # A chunk at a time: fetching row by row costs a thread hop per row on SQLite.
        async for chunk in result.partitions(STREAM_CHUNK_ROWS):
            for row in chunk:
                if current is not None and row.exchange_id != current.exchange_id:
                    yield _exchange_from(current, tuple(corrections))
                    corrections = []
                current = row
                correction = _correction_from(row)
                if correction is not None:
                    corrections.append(correction)
        if current is not None:
            yield _exchange_from(current, tuple(corrections))


@contextlib.asynccontextmanager
async def feedback_snapshot(engine: AsyncEngine) -> AsyncIterator[FeedbackSnapshot]:
    """A read-only, consistent view of every exchange and its feedback.

    Writers are not blocked while it is open (WAL on SQLite, MVCC on PostgreSQL).
    """
    async with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            await connection.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
        async with connection.begin():
            yield FeedbackSnapshot(connection)
