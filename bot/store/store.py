"""The Store: every read and write the bot makes to SQL and to the photo files."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator, Collection, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Select, case, delete, exists, false, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.errors import AlreadyAnswered, AlreadyAsked, DishbotError, NotFound, StoreUnavailable
from bot.store.database import is_connection_failure, open_engine
from bot.store.models import (
    Correction,
    CorrectionPrompt,
    CorrectionStatus,
    Exchange,
    ExchangeStatus,
    InboxEntry,
    ModelActivation,
    ModelVersion,
    Photo,
    Rating,
    RunStage,
    TrainingRun,
    User,
    utcnow,
)
from bot.store.photos import PhotoFiles, sha256_hex
from bot.store.records import (
    CorrectionRecord,
    DayStats,
    ExchangeOwner,
    ExchangeRecord,
    ForgetReport,
    InboxRecord,
    ModelVersionRecord,
    PhotoRecord,
    RatingRecord,
    ReportTarget,
    ReviewedCorrection,
    ReviewItem,
    TrainingRunRecord,
    UserRecord,
    VersionRatings,
    snapshot,
)

log = logging.getLogger(__name__)

RATING_VALUES = (-1, 1)
_ACTIVATION_LOCK = 0x646973680001  # pg_advisory_xact_lock key for model activation
MAX_CONVERSATION_TURNS = 50
STATS_CHUNK_ROWS = 1000  # exchanges read at a time for the daily figures
# A ✏️ prompt nobody answered is dropped after this long (the answer itself stays).
CORRECTION_PROMPT_KEPT = timedelta(days=7)
ORPHANS_PER_SWEEP = 100  # `orphaned_exchanges` at a time: recovery comes back for more
MAX_PENDING_SCANNED = 10_000  # pending rows read per sweep (every process's queues together)
# Locks that keep a photo's file and row in step within this process (adding a photo and
# removing a forgotten one's file); a photo takes the lock its sha256 falls on.
PHOTO_LOCK_STRIPES = 256


class RunInProgress(DishbotError):
    """A run was asked for while another holds the one training slot; ``run`` is that one."""

    def __init__(self, run: TrainingRunRecord) -> None:
        self.run = run
        super().__init__(f"training run {run.id} is already {run.stage}{_progress_words(run)}")


class RunEnded(DishbotError):
    """A finished run was to be moved on (it was cancelled or failed meanwhile)."""

    def __init__(self, run: TrainingRunRecord) -> None:
        self.run = run
        super().__init__(f"training run {run.id} has ended: {run.stage}")


class NothingToRollBack(DishbotError):
    """A rollback was asked for, but no earlier model version was ever active."""


def _progress_words(run: TrainingRunRecord) -> str:
    total = run.progress.get("total") or 0
    if not total:
        return ""
    words = f", {run.progress.get('iteration', 0)}/{total}"
    eta = run.progress.get("eta_s")
    return words + (f", about {round(eta / 60)} min left" if eta is not None else "")


def _exchange_asked_in(platform: str, chat_id: str, question_message_id: str) -> Select[int]:
    """The id of the exchange a platform message asked, if any (they are unique)."""
    return select(Exchange.id).where(
        Exchange.platform == platform,
        Exchange.chat_id == chat_id,
        Exchange.question_message_id == question_message_id,
    )


class _Owned(Protocol):
    """A row a serving process owns while it works on it (see `ExchangeOwner`)."""

    @property
    def host(self) -> str | None: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def owner_token(self) -> str | None: ...
    @property
    def owned_since(self) -> datetime | None: ...
    @property
    def created_at(self) -> datetime: ...


def _user_by_platform_id(platform: str, platform_user_id: str) -> Select[User]:
    return select(User).where(User.platform == platform, User.platform_user_id == platform_user_id)


class Store:
    """dishbot's persistent state: users, photos, exchanges, feedback, models, training runs.

    Every method is a complete transaction. Methods that a platform may retry (a rating
    press, a re-delivered message) are idempotent.
    """

    def __init__(self, engine: AsyncEngine, data_dir: Path) -> None:
        self.engine = engine
        self.photos = PhotoFiles(data_dir)
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._dialect = engine.dialect.name
        # SQLite has one writer at a time; queueing writers here instead of in SQLite's
        # busy loop keeps them fair and avoids its lock-upgrade deadlock.
        self._sqlite_writer = asyncio.Lock() if self._dialect == "sqlite" else None
        # The process that answers the questions this store starts (see `orphaned_exchanges`).
        self.owner = ExchangeOwner.this_process()
        self._photo_locks = tuple(asyncio.Lock() for _ in range(PHOTO_LOCK_STRIPES))

    @classmethod
    def open(cls, database_url: str, data_dir: Path) -> Store:
        """A store on a new engine for ``database_url``; `close` disposes of it."""
        return cls(open_engine(database_url), data_dir)

    async def close(self) -> None:
        """Close every database connection."""
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncSession]:
        async with contextlib.AsyncExitStack() as stack:
            if self._sqlite_writer is not None:
                await stack.enter_async_context(self._sqlite_writer)
            # Outside the session, so that a failure to commit is translated too.
            await stack.enter_async_context(_unavailable_as_store_unavailable())
            session = await stack.enter_async_context(self._sessions.begin())
            yield session

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncSession]:
        async with _unavailable_as_store_unavailable(), self._sessions() as session:
            yield session

    def _insert(self, model: type[Any]) -> Any:
        """INSERT with ON CONFLICT support for the dialect in use."""
        if self._dialect == "postgresql":
            return postgresql.insert(model)
        return sqlite.insert(model)

    # -- users --------------------------------------------------------------------------

    async def upsert_user(
        self,
        platform: str,
        platform_user_id: str,
        *,
        display_name: str | None = None,
        language: str | None = None,
    ) -> UserRecord:
        """The user with this platform id, created if new; a given name or language updates it."""
        now = utcnow()
        stmt = self._insert(User).values(
            platform=platform,
            platform_user_id=platform_user_id,
            display_name=display_name,
            language=language,
            created_at=now,
            updated_at=now,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[User.platform, User.platform_user_id],
            set_={
                "display_name": func.coalesce(stmt.excluded.display_name, User.display_name),
                "language": func.coalesce(stmt.excluded.language, User.language),
                "updated_at": now,
            },
        )
        async with self._write() as session:
            await session.execute(stmt)
            user = await session.scalar(_user_by_platform_id(platform, platform_user_id))
            assert user is not None
            return snapshot(UserRecord, user)

    async def get_user(self, user_id: int) -> UserRecord | None:
        """The user with this id, or None."""
        async with self._read() as session:
            user = await session.get(User, user_id)
            return snapshot(UserRecord, user) if user else None

    async def find_user(self, platform: str, platform_user_id: str) -> UserRecord | None:
        """The user with this platform id, or None if the bot never stored them."""
        async with self._read() as session:
            user = await session.scalar(_user_by_platform_id(platform, platform_user_id))
            return snapshot(UserRecord, user) if user else None

    async def set_user_banned(self, user_id: int, banned: bool) -> None:
        """Ban or unban a user."""
        await self._update_user(user_id, banned=banned)

    async def set_user_trust(self, user_id: int, trust: int) -> None:
        """Weigh a user's feedback: above 0 their corrections are accepted without waiting
        for others to agree, below 0 their feedback is ignored, 0 is ordinary."""
        await self._update_user(user_id, trust=trust)

    async def set_user_language(self, user_id: int, language: str) -> None:
        """Remember the language a user wants answers in."""
        await self._update_user(user_id, language=language)

    async def _update_user(self, user_id: int, **values: Any) -> None:
        async with self._write() as session:
            result = await session.execute(
                update(User).where(User.id == user_id).values(updated_at=utcnow(), **values)
            )
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise NotFound(f"user {user_id} does not exist")

    # -- photos -------------------------------------------------------------------------

    async def add_photo(
        self, data: bytes, *, image_format: str, width: int, height: int
    ) -> PhotoRecord:
        """Store a photo's bytes (once per content) and its row; the same bytes give the same row.

        The file is written before the row commits, and removed again if the row does not
        commit: a row never names a missing file, and no file is left without its row.
        """
        sha256 = sha256_hex(data)
        relative = self.photos.relative_path(sha256, image_format)
        stmt = self._insert(Photo).values(
            sha256=sha256,
            path=relative,
            width=width,
            height=height,
            format=image_format.upper(),
            bytes=len(data),
            created_at=utcnow(),
        )
        # An upsert rather than DO NOTHING: it locks the row, so two processes adding the
        # same picture take turns.
        stmt = stmt.on_conflict_do_update(
            index_elements=[Photo.sha256], set_={"sha256": stmt.excluded.sha256}
        )
        async with self._photo_lock(sha256):
            written = False
            try:
                async with self._write() as session:
                    await self._lock_photo_key(session, sha256)
                    await session.execute(stmt)
                    photo = await session.get(Photo, sha256)
                    assert photo is not None
                    written = await asyncio.to_thread(self._write_file, data, image_format)
                    return snapshot(PhotoRecord, photo)
            except BaseException:
                if written:  # ours alone: no committed row names it
                    await asyncio.to_thread(self.photos.remove, relative)
                raise

    def _write_file(self, data: bytes, image_format: str) -> bool:
        """Write the photo's file; True when this call created it."""
        existed = self.photos.absolute(
            self.photos.relative_path(sha256_hex(data), image_format)
        ).is_file()
        self.photos.write(data, image_format)
        return not existed

    def _photo_lock(self, sha256: str) -> asyncio.Lock:
        return self._photo_locks[int(sha256[:8], 16) % PHOTO_LOCK_STRIPES]

    async def _lock_photo_key(self, session: AsyncSession, sha256: str) -> None:
        """On PostgreSQL, take a photo's turn across processes until the transaction ends
        (another process may be removing a forgotten photo's file)."""
        if self._dialect == "postgresql":
            key = int(sha256[:15], 16)  # 60 bits: fits the bigint advisory lock key
            await session.execute(select(func.pg_advisory_xact_lock(key)))

    async def get_photo(self, sha256: str) -> PhotoRecord | None:
        """The photo with this sha256, or None."""
        async with self._read() as session:
            photo = await session.get(Photo, sha256)
            return snapshot(PhotoRecord, photo) if photo else None

    def photo_file(self, photo: PhotoRecord) -> Path:
        """The file holding a stored photo."""
        return self.photos.absolute(photo.path)

    # -- exchanges ----------------------------------------------------------------------

    async def start_exchange(
        self,
        *,
        user_id: int,
        platform: str,
        chat_id: str,
        question: str,
        question_message_id: str | None = None,
        photo_sha256: str | None = None,
        parent_id: int | None = None,
        owner: ExchangeOwner | None = None,
    ) -> ExchangeRecord:
        """Record a question as pending, owned by ``owner`` (default: this process, `owner`)
        until it is answered or failed; see `orphaned_exchanges`.

        A message the platform delivers twice (same chat and message id: a redelivered
        update, or the user editing it) raises `AlreadyAsked` naming the exchange stored the
        first time; nothing is stored again.
        """
        owner = owner or self.owner
        now = utcnow()
        values = {
            "user_id": user_id,
            "platform": platform,
            "chat_id": chat_id,
            "question": question,
            "question_message_id": question_message_id,
            "photo_sha256": photo_sha256,
            "parent_id": parent_id,
            "status": ExchangeStatus.PENDING,
            "created_at": now,
            "host": owner.host,
            "pid": owner.pid,
            "owner_token": owner.token,
            "owned_since": now,
        }
        stmt = self._insert(Exchange).values(**values)
        if question_message_id is not None:
            stmt = stmt.on_conflict_do_nothing(
                index_elements=[Exchange.platform, Exchange.chat_id, Exchange.question_message_id]
            )
        async with self._write() as session:
            try:
                new_id = await session.scalar(stmt.returning(Exchange.id))
            except IntegrityError:
                raise NotFound("the user, photo or parent exchange does not exist") from None
            if new_id is None:
                assert question_message_id is not None  # only then can the insert conflict
                existing = await session.scalar(
                    _exchange_asked_in(platform, chat_id, question_message_id)
                )
                assert existing is not None
                raise AlreadyAsked(existing)
            exchange = await session.get(Exchange, new_id)
            assert exchange is not None
            return snapshot(ExchangeRecord, exchange)

    async def was_asked(self, platform: str, chat_id: str, question_message_id: str) -> bool:
        """Whether a question was stored for this message already (see `start_exchange`)."""
        async with self._read() as session:
            found = await session.scalar(_exchange_asked_in(platform, chat_id, question_message_id))
            return found is not None

    async def recent_chats(
        self, platform: str, since: datetime, *, limit: int = 5000
    ) -> list[tuple[str, str]]:
        """The chats of ``platform`` with questions asked at or after ``since``, each with the
        id of its newest question message: ``(chat_id, question_message_id)``, the chat
        asked in most recently first. Ids are compared as integers (Discord's snowflakes, Telegram's
        message ids), so only numeric ids count; at most the ``limit`` latest questions are
        read."""
        query = (
            select(Exchange.chat_id, Exchange.question_message_id)
            .where(
                Exchange.platform == platform,
                Exchange.created_at >= since,
                Exchange.question_message_id.is_not(None),
            )
            .order_by(Exchange.created_at.desc(), Exchange.id.desc())
            .limit(limit)
        )
        async with self._read() as session:
            rows = (await session.execute(query)).all()
        # In Python: SQL would compare the ids as strings, and "9" > "10".
        newest: dict[str, int] = {}
        for chat_id, message_id in rows:
            if message_id is not None and message_id.isdigit():
                newest[chat_id] = max(newest.get(chat_id, 0), int(message_id))
        return [(chat_id, str(message_id)) for chat_id, message_id in newest.items()]

    async def finish_exchange(
        self,
        exchange_id: int,
        *,
        answer: str,
        model_version: str | None,
        latency_ms: int,
        reply_message_id: str | None = None,
    ) -> ExchangeRecord:
        """Store the answer to a pending (or failed) question.

        Raises `AlreadyAnswered` for a question answered before: its answer is what people
        rated and corrected, so it is never replaced.
        """
        values: dict[str, Any] = {
            "answer": answer,
            "model_version": model_version,
            "latency_ms": latency_ms,
            "error": None,  # an answer that came after all clears an earlier failure
        }
        if reply_message_id is not None:
            values["reply_message_id"] = reply_message_id
        return await self._finish(exchange_id, ExchangeStatus.ANSWERED, values)

    async def fail_exchange(
        self, exchange_id: int, *, error: str, latency_ms: int | None = None
    ) -> ExchangeRecord:
        """Mark a question as failed (engine error, timeout, cancellation) with the reason."""
        values: dict[str, Any] = {"error": error, "latency_ms": latency_ms}
        return await self._finish(exchange_id, ExchangeStatus.FAILED, values)

    async def set_reply_message(self, exchange_id: int, reply_message_id: str) -> None:
        """Remember which platform message carries the answer (for replies and buttons)."""
        async with self._write() as session:
            exchange = await self._exchange_or_raise(session, exchange_id)
            exchange.reply_message_id = reply_message_id

    async def _finish(
        self, exchange_id: int, status: ExchangeStatus, values: dict[str, Any]
    ) -> ExchangeRecord:
        async with self._write() as session:
            exchange = await self._exchange_or_raise(session, exchange_id, for_update=True)
            if status is ExchangeStatus.ANSWERED and exchange.status is ExchangeStatus.ANSWERED:
                raise AlreadyAnswered(exchange_id)
            for name, value in values.items():
                setattr(exchange, name, value)
            exchange.status = status
            exchange.finished_at = utcnow()
            await session.flush()
            return snapshot(ExchangeRecord, exchange)

    @staticmethod
    async def _exchange_or_raise(
        session: AsyncSession, exchange_id: int, *, for_update: bool = False
    ) -> Exchange:
        exchange = await session.get(Exchange, exchange_id, with_for_update=for_update)
        if exchange is None:
            raise NotFound(f"exchange {exchange_id} does not exist")
        return exchange

    async def orphaned_exchanges(
        self,
        *,
        stale_after: timedelta,
        busy: Collection[int] = (),
        limit: int = ORPHANS_PER_SWEEP,
    ) -> list[ExchangeRecord]:
        """Pending exchanges that no living process is answering, oldest first.

        An exchange is orphaned when its owner is gone: on this host, a pid that is not
        running, or this very pid under another token (a restarted container's pid 1); on
        any host, an owner that took it over ``stale_after`` ago or more (longer than any
        request may take) and has not finished it. This process's own exchanges count only
        when that old and not in ``busy`` (those it is still answering or storing).
        Take one over with `claim_exchange` before answering it.
        """
        async with self._read() as session:
            rows = await session.scalars(
                select(Exchange)
                .where(Exchange.status == ExchangeStatus.PENDING)
                .order_by(Exchange.id)
                .limit(MAX_PENDING_SCANNED)
            )
            pending = [snapshot(ExchangeRecord, row) for row in rows]
        stale_before = utcnow() - stale_after
        orphans = [
            exchange
            for exchange in pending
            if exchange.id not in busy and self._owner_gone(exchange, stale_before)
        ]
        return orphans[:limit]

    def _owner_gone(self, row: _Owned, stale_before: datetime) -> bool:
        if (row.owned_since or row.created_at) <= stale_before:
            return True
        if row.owner_token == self.owner.token or row.host != self.owner.host:
            return False
        return row.pid is None or row.pid == self.owner.pid or not process_alive(row.pid)

    def _owner_values(self, owner: ExchangeOwner | None = None) -> dict[str, Any]:
        owner = owner or self.owner
        return {
            "host": owner.host,
            "pid": owner.pid,
            "owner_token": owner.token,
            "owned_since": utcnow(),
        }

    async def claim_exchange(self, exchange: ExchangeRecord) -> ExchangeRecord | None:
        """Take over a pending exchange, as `orphaned_exchanges` listed it, for this process.

        A compare-and-set on its owner: None when it was answered, failed or claimed by
        another process since it was listed, so of processes racing for it one wins.
        """
        owner, token = self.owner, exchange.owner_token
        unchanged = Exchange.owner_token == token if token else Exchange.owner_token.is_(None)
        async with self._write() as session:
            result = await session.execute(
                update(Exchange)
                .where(
                    Exchange.id == exchange.id,
                    Exchange.status == ExchangeStatus.PENDING,
                    unchanged,
                )
                .values(
                    host=owner.host, pid=owner.pid, owner_token=owner.token, owned_since=utcnow()
                )
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
            claimed = await session.get(Exchange, exchange.id, populate_existing=True)
            assert claimed is not None
            return snapshot(ExchangeRecord, claimed)

    async def undelivered_answers(
        self,
        *,
        stale_after: timedelta,
        answered_within: timedelta,
        busy: Collection[int] = (),
        limit: int = ORPHANS_PER_SWEEP,
    ) -> list[ExchangeRecord]:
        """Answers stored but never shown, oldest first: answered within ``answered_within``,
        with no message carrying them (`set_reply_message` never came), of an owner that is
        gone: on this host, a pid not running (or this pid under another token); on another,
        answered ``stale_after`` ago or more. Never this process's own.

        The answer is stored before it is shown, so a process that died in between leaves
        these. Take one over with `claim_undelivered_answer` before sending it.
        """
        async with self._read() as session:
            rows = await session.scalars(
                select(Exchange)
                .where(
                    Exchange.status == ExchangeStatus.ANSWERED,
                    Exchange.reply_message_id.is_(None),
                    Exchange.finished_at >= utcnow() - answered_within,
                )
                .order_by(Exchange.id)
                .limit(MAX_PENDING_SCANNED)
            )
            answered = [snapshot(ExchangeRecord, row) for row in rows]
        stale_before = utcnow() - stale_after
        found = [
            exchange
            for exchange in answered
            if exchange.id not in busy
            and exchange.owner_token != self.owner.token
            and self._answerer_gone(exchange, stale_before)
        ]
        return found[:limit]

    def _answerer_gone(self, exchange: ExchangeRecord, stale_before: datetime) -> bool:
        # On this host the pid says it for sure. Of another host only time tells: an answer
        # stored ``stale_after`` ago would have been shown by a living owner. One whose
        # message id was lost (`DeliveryUnknown`, or noting it failed) looks the same, and is
        # shown again: a rare duplicate, taken over an answer never shown.
        if exchange.host == self.owner.host:
            pid = exchange.pid
            return pid is None or pid == self.owner.pid or not process_alive(pid)
        return exchange.finished_at is not None and exchange.finished_at <= stale_before

    async def claim_undelivered_answer(self, exchange: ExchangeRecord) -> ExchangeRecord | None:
        """Take over an answer `undelivered_answers` listed, to show it: a compare-and-set on
        its owner, None when another process took it or it was shown meanwhile."""
        token = exchange.owner_token
        unchanged = Exchange.owner_token == token if token else Exchange.owner_token.is_(None)
        async with self._write() as session:
            result = await session.execute(
                update(Exchange)
                .where(
                    Exchange.id == exchange.id,
                    Exchange.status == ExchangeStatus.ANSWERED,
                    Exchange.reply_message_id.is_(None),
                    unchanged,
                )
                .values(**self._owner_values())
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
            claimed = await session.get(Exchange, exchange.id, populate_existing=True)
            assert claimed is not None
            return snapshot(ExchangeRecord, claimed)

    # -- the inbox ------------------------------------------------------------------------

    async def add_to_inbox(
        self,
        platform: str,
        entries: Sequence[tuple[str, str]],
        *,
        owner: ExchangeOwner | None = None,
    ) -> None:
        """Keep what a platform delivered, as ``(key, payload)`` pairs, owned by ``owner``
        (default: this process) until `remove_from_inbox`; all in one transaction. A key
        already kept (delivered again) stays as it is."""
        if not entries:
            return
        values = [
            {
                "platform": platform,
                "key": key,
                "payload": payload,
                "attempts": 0,
                "created_at": utcnow(),
                **self._owner_values(owner),
            }
            for key, payload in entries
        ]
        stmt = self._insert(InboxEntry).values(values)
        stmt = stmt.on_conflict_do_nothing(index_elements=[InboxEntry.platform, InboxEntry.key])
        async with self._write() as session:
            await session.execute(stmt)

    async def remove_from_inbox(self, platform: str, keys: Collection[str]) -> None:
        """Forget what was delivered under ``keys``: its handling has ended (however it did)."""
        if not keys:
            return
        async with self._write() as session:
            await session.execute(
                delete(InboxEntry).where(
                    InboxEntry.platform == platform, InboxEntry.key.in_(list(keys))
                )
            )

    async def inbox(self, platform: str | None = None) -> list[InboxRecord]:
        """Everything kept in the inbox (of one platform), oldest first."""
        query = select(InboxEntry).order_by(InboxEntry.id)
        if platform is not None:
            query = query.where(InboxEntry.platform == platform)
        async with self._read() as session:
            return [snapshot(InboxRecord, row) for row in await session.scalars(query)]

    async def orphaned_inbox(
        self, *, stale_after: timedelta, limit: int = ORPHANS_PER_SWEEP
    ) -> list[InboxRecord]:
        """Inbox entries of owners that are gone (the rule of `orphaned_exchanges`), oldest
        first; never this process's own, which its handlers remove when they end. Take one
        over with `claim_inbox_entry` before handling it again."""
        async with self._read() as session:
            rows = await session.scalars(
                select(InboxEntry)
                .where(
                    (InboxEntry.owner_token != self.owner.token) | InboxEntry.owner_token.is_(None)
                )
                .order_by(InboxEntry.id)
                .limit(MAX_PENDING_SCANNED)
            )
            entries = [snapshot(InboxRecord, row) for row in rows]
        stale_before = utcnow() - stale_after
        return [entry for entry in entries if self._owner_gone(entry, stale_before)][:limit]

    async def claim_inbox_entry(self, entry: InboxRecord) -> InboxRecord | None:
        """Take over an entry `orphaned_inbox` listed, counting the attempt: a compare-and-set
        on its owner, None when another process took it or it was removed meanwhile."""
        token = entry.owner_token
        unchanged = InboxEntry.owner_token == token if token else InboxEntry.owner_token.is_(None)
        async with self._write() as session:
            result = await session.execute(
                update(InboxEntry)
                .where(InboxEntry.id == entry.id, unchanged)
                .values(attempts=InboxEntry.attempts + 1, **self._owner_values())
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
            claimed = await session.get(InboxEntry, entry.id, populate_existing=True)
            assert claimed is not None
            return snapshot(InboxRecord, claimed)

    async def get_exchange(self, exchange_id: int) -> ExchangeRecord | None:
        """The exchange with this id, or None."""
        async with self._read() as session:
            exchange = await session.get(Exchange, exchange_id)
            return snapshot(ExchangeRecord, exchange) if exchange else None

    async def find_exchange_by_reply(
        self, platform: str, chat_id: str, reply_message_id: str
    ) -> ExchangeRecord | None:
        """The exchange whose answer is this platform message (a user replied to it)."""
        async with self._read() as session:
            exchange = await session.scalar(
                select(Exchange)
                .where(
                    Exchange.platform == platform,
                    Exchange.chat_id == chat_id,
                    Exchange.reply_message_id == reply_message_id,
                )
                .order_by(Exchange.id.desc())
                .limit(1)
            )
            return snapshot(ExchangeRecord, exchange) if exchange else None

    async def latest_exchange(
        self, user_id: int, platform: str, chat_id: str, *, since: datetime
    ) -> ExchangeRecord | None:
        """The user's newest answered question about a photo in this chat, asked after ``since``."""
        async with self._read() as session:
            exchange = await session.scalar(
                select(Exchange)
                .where(
                    Exchange.user_id == user_id,
                    Exchange.platform == platform,
                    Exchange.chat_id == chat_id,
                    Exchange.photo_sha256.is_not(None),
                    Exchange.status == ExchangeStatus.ANSWERED,
                    Exchange.created_at >= since,
                )
                .order_by(Exchange.id.desc())
                .limit(1)
            )
            return snapshot(ExchangeRecord, exchange) if exchange else None

    async def conversation(self, exchange_id: int) -> list[ExchangeRecord]:
        """The chain of exchanges ending at ``exchange_id``, oldest first (for follow-ups)."""
        chain: list[ExchangeRecord] = []
        next_id: int | None = exchange_id
        async with self._read() as session:
            while next_id is not None and len(chain) < MAX_CONVERSATION_TURNS:
                exchange = await session.get(Exchange, next_id)
                if exchange is None:
                    break
                chain.append(snapshot(ExchangeRecord, exchange))
                next_id = exchange.parent_id
        chain.reverse()
        return chain

    # -- feedback -----------------------------------------------------------------------

    async def record_rating(
        self, exchange_id: int, user_id: int, value: int, *, rated_at: datetime | None = None
    ) -> RatingRecord:
        """Store a user's 👍 (+1) or 👎 (-1) for an answer; one rating per user per answer.

        ``rated_at`` is when the user pressed (default: now). The rating with the latest
        press wins however the writes interleave, so a retried or late write of an older
        press never overrides a newer one. Returns the rating as stored.
        """
        if value not in RATING_VALUES:
            raise ValueError(f"a rating is +1 or -1, not {value!r}")
        pressed = rated_at or utcnow()
        stmt = self._insert(Rating).values(
            exchange_id=exchange_id,
            user_id=user_id,
            value=value,
            rated_at=pressed,
            created_at=utcnow(),
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[Rating.exchange_id, Rating.user_id],
            set_={"value": stmt.excluded.value, "rated_at": stmt.excluded.rated_at},
            where=Rating.rated_at <= stmt.excluded.rated_at,
        )
        async with self._write() as session:
            try:
                await session.execute(stmt)
            except IntegrityError:
                raise NotFound(f"exchange {exchange_id} or user {user_id} does not exist") from None
            rating = await session.scalar(
                select(Rating).where(Rating.exchange_id == exchange_id, Rating.user_id == user_id)
            )
            assert rating is not None
            return snapshot(RatingRecord, rating)

    async def ratings(self, exchange_id: int) -> list[RatingRecord]:
        """Every rating of one answer."""
        async with self._read() as session:
            rows = await session.scalars(
                select(Rating).where(Rating.exchange_id == exchange_id).order_by(Rating.user_id)
            )
            return [snapshot(RatingRecord, row) for row in rows]

    async def record_correction(
        self, exchange_id: int, user_id: int, text: str
    ) -> CorrectionRecord:
        """Store what a user says an answer should have been; a second one replaces the first."""
        text = text.strip()
        if not text:
            raise ValueError("a correction needs some text")
        now = utcnow()
        stmt = self._insert(Correction).values(
            exchange_id=exchange_id, user_id=user_id, text=text, created_at=now, updated_at=now
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[Correction.exchange_id, Correction.user_id],
            # Changed text needs a fresh review, whatever the old text's verdict was.
            set_={"text": stmt.excluded.text, "updated_at": now, "status": CorrectionStatus.NEW},
        )
        async with self._write() as session:
            try:
                await session.execute(stmt)
            except IntegrityError:
                raise NotFound(f"exchange {exchange_id} or user {user_id} does not exist") from None
            correction = await session.scalar(
                select(Correction).where(
                    Correction.exchange_id == exchange_id, Correction.user_id == user_id
                )
            )
            assert correction is not None
            return snapshot(CorrectionRecord, correction)

    async def corrections(self, exchange_id: int) -> list[CorrectionRecord]:
        """Every correction of one answer."""
        async with self._read() as session:
            rows = await session.scalars(
                select(Correction)
                .where(Correction.exchange_id == exchange_id)
                .order_by(Correction.id)
            )
            return [snapshot(CorrectionRecord, row) for row in rows]

    async def question_days(self, since: datetime) -> list[DayStats]:
        """Per UTC day since ``since``, oldest first: questions asked, answered and failed,
        and the answer latency's p50 and p95 (of the answered ones)."""
        days: dict[date, list[int]] = {}
        latencies: dict[date, list[int]] = {}
        async with self._read() as session:
            rows = await session.stream(
                select(Exchange.created_at, Exchange.status, Exchange.latency_ms)
                .where(Exchange.created_at >= since)
                .execution_options(yield_per=STATS_CHUNK_ROWS)
            )
            async for created_at, status, latency_ms in rows:
                day = created_at.date()
                counts = days.setdefault(day, [0, 0, 0])
                counts[0] += 1
                counts[1] += status == ExchangeStatus.ANSWERED
                counts[2] += status == ExchangeStatus.FAILED
                if status == ExchangeStatus.ANSWERED and latency_ms is not None:
                    latencies.setdefault(day, []).append(latency_ms)
        return [
            DayStats(day, *days[day], *_percentiles(latencies.get(day, []), 0.5, 0.95))
            for day in sorted(days)
        ]

    async def ratings_by_model_version(self) -> list[VersionRatings]:
        """👍 and 👎 per model version that answered, by the version's name."""
        async with self._read() as session:
            rows = await session.execute(
                select(
                    Exchange.model_version,
                    func.sum(case((Rating.value > 0, 1), else_=0)),
                    func.sum(case((Rating.value < 0, 1), else_=0)),
                )
                .join(Rating, Rating.exchange_id == Exchange.id)
                .where(Exchange.model_version.is_not(None))
                .group_by(Exchange.model_version)
                .order_by(Exchange.model_version)
            )
            return [VersionRatings(name, int(up or 0), int(down or 0)) for name, up, down in rows]

    async def corrections_to_review(self, *, limit: int = 50) -> list[ReviewItem]:
        """Answers with corrections waiting for review (status new), the most recently
        corrected first, each with all its corrections and their authors."""
        async with self._read() as session:
            waiting = (
                select(Correction.exchange_id, func.max(Correction.updated_at).label("latest"))
                .where(Correction.status == CorrectionStatus.NEW)
                .group_by(Correction.exchange_id)
                .subquery()
            )
            exchanges = await session.scalars(
                select(Exchange)
                .join(waiting, waiting.c.exchange_id == Exchange.id)
                .order_by(waiting.c.latest.desc(), Exchange.id.desc())
                .limit(limit)
            )
            return [await self._review_item(session, exchange) for exchange in exchanges.all()]

    async def _review_item(self, session: AsyncSession, exchange: Exchange) -> ReviewItem:
        rows = await session.execute(
            select(Correction, User)
            .join(User, User.id == Correction.user_id)
            .where(Correction.exchange_id == exchange.id)
            .order_by(Correction.id)
        )
        corrections = tuple(
            ReviewedCorrection(
                correction.id,
                correction.text,
                correction.status,
                correction.updated_at,
                snapshot(UserRecord, user),
            )
            for correction, user in rows.all()
        )
        photo = exchange.photo_sha256
        parent_id, turns = exchange.parent_id, 0
        while photo is None and parent_id is not None and turns < MAX_CONVERSATION_TURNS:
            parent = await session.get(Exchange, parent_id)
            if parent is None:
                break
            photo, parent_id, turns = parent.photo_sha256, parent.parent_id, turns + 1
        return ReviewItem(snapshot(ExchangeRecord, exchange), photo, corrections)

    async def accept_correction(
        self, correction_id: int, text: str | None = None
    ) -> CorrectionRecord:
        """An admin's verdict: this correction (its text replaced by ``text`` when given, a
        fix) is what the answer should have been, and the answer's other corrections are
        rejected. Training takes it however few users agreed. Raises `NotFound`."""
        fixed = text.strip() if text is not None else None
        if fixed == "":
            raise ValueError("a correction needs some text")
        async with self._write() as session:
            correction = await session.get(Correction, correction_id)
            if correction is None:
                raise NotFound(f"correction {correction_id} does not exist")
            await session.execute(
                update(Correction)
                .where(
                    Correction.exchange_id == correction.exchange_id,
                    Correction.id != correction_id,
                )
                .values(status=CorrectionStatus.REJECTED, updated_at=utcnow())
            )
            correction.status = CorrectionStatus.ACCEPTED
            if fixed is not None:
                correction.text = fixed
            await session.flush()
            return snapshot(CorrectionRecord, correction)

    async def reject_corrections(self, exchange_id: int) -> int:
        """An admin's verdict: none of the answer's corrections is right; training leaves
        them out however many users agreed. Returns how many were rejected."""
        async with self._write() as session:
            result = await session.execute(
                update(Correction)
                .where(Correction.exchange_id == exchange_id)
                .values(status=CorrectionStatus.REJECTED, updated_at=utcnow())
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    async def remember_correction_prompt(
        self, exchange_id: int, user_id: int, platform: str, chat_id: str, message_id: str
    ) -> None:
        """Note that message ``message_id`` asks ``user_id`` to correct ``exchange_id``.

        Prompts older than `CORRECTION_PROMPT_KEPT` are dropped on the way.
        """
        stmt = self._insert(CorrectionPrompt).values(
            platform=platform,
            chat_id=chat_id,
            message_id=message_id,
            exchange_id=exchange_id,
            user_id=user_id,
            created_at=utcnow(),
        )
        stmt = stmt.on_conflict_do_nothing(
            index_elements=[
                CorrectionPrompt.platform,
                CorrectionPrompt.chat_id,
                CorrectionPrompt.message_id,
            ]
        )
        async with self._write() as session:
            await session.execute(
                delete(CorrectionPrompt).where(
                    CorrectionPrompt.created_at < utcnow() - CORRECTION_PROMPT_KEPT
                )
            )
            try:
                await session.execute(stmt)
            except IntegrityError:
                raise NotFound(f"exchange {exchange_id} or user {user_id} does not exist") from None

    async def take_correction_prompt(
        self, platform: str, chat_id: str, message_id: str, platform_user_id: str
    ) -> int | None:
        """The exchange a reply by ``platform_user_id`` to prompt ``message_id`` corrects.

        None when that message is no waiting prompt for them: any other reply, a second reply
        to the same prompt (a prompt is used up), or a reply by anyone but the user who was
        asked (the prompt keeps waiting for them). Only a waiting prompt costs a write, so
        the replies people send each other in a busy channel are one read each.
        """
        asked = (
            select(User.id)
            .where(User.platform == platform, User.platform_user_id == platform_user_id)
            .scalar_subquery()
        )
        waiting = (
            CorrectionPrompt.platform == platform,
            CorrectionPrompt.chat_id == chat_id,
            CorrectionPrompt.message_id == message_id,
            CorrectionPrompt.user_id == asked,
        )
        async with self._read() as session:
            if await session.scalar(select(CorrectionPrompt.id).where(*waiting)) is None:
                return None
        async with self._write() as session:
            # Two replies racing for one prompt: only the one whose delete finds it wins.
            exchange_id: int | None = await session.scalar(
                delete(CorrectionPrompt).where(*waiting).returning(CorrectionPrompt.exchange_id)
            )
            return exchange_id

    # -- forgetting a user --------------------------------------------------------------

    async def forget(self, user_id: int) -> ForgetReport:
        """Delete everything stored about a user, and the photos they sent.

        Removes the user, their exchanges (with every rating and correction of them), their
        own ratings and corrections elsewhere, and the photos they sent: other users'
        follow-ups in their conversations keep their text and lose the photo. A photo that
        someone else sent too (the same bytes, so the same row) stays theirs. Photo files
        are removed only once the deletion has committed.
        """
        async with self._write() as session:
            own_exchanges = select(Exchange.id).where(Exchange.user_id == user_id)
            photo_keys = (
                await session.scalars(
                    select(Exchange.photo_sha256)
                    .where(Exchange.user_id == user_id, Exchange.photo_sha256.is_not(None))
                    .distinct()
                )
            ).all()
            await self._unlink_their_photo_from_follow_ups(session, user_id)
            ratings = await self._delete(
                session,
                delete(Rating).where(
                    (Rating.user_id == user_id) | Rating.exchange_id.in_(own_exchanges)
                ),
            )
            corrections = await self._delete(
                session,
                delete(Correction).where(
                    (Correction.user_id == user_id) | Correction.exchange_id.in_(own_exchanges)
                ),
            )
            await session.execute(
                delete(CorrectionPrompt).where(
                    (CorrectionPrompt.user_id == user_id)
                    | CorrectionPrompt.exchange_id.in_(own_exchanges)
                )
            )
            await session.execute(
                update(Exchange)
                .where(Exchange.parent_id.in_(own_exchanges), Exchange.user_id != user_id)
                .values(parent_id=None)
            )
            exchanges = await self._delete(
                session, delete(Exchange).where(Exchange.user_id == user_id)
            )
            await session.execute(
                update(TrainingRun)
                .where(TrainingRun.requested_by == user_id)
                .values(requested_by=None)
            )
            users = await self._delete(session, delete(User).where(User.id == user_id))
            orphans = await self._delete_unreferenced_photos(session, photo_keys)
        # Only now: had the deletion not committed, the rows would still name these files.
        await self._remove_photo_files(orphans)
        return ForgetReport(
            users=users,
            exchanges=exchanges,
            ratings=ratings,
            corrections=corrections,
            photos=len(orphans),
        )

    @staticmethod
    async def _unlink_their_photo_from_follow_ups(session: AsyncSession, user_id: int) -> None:
        """Other users' follow-ups, at any depth, in conversations about a photo this user
        sent lose the photo (their text stays)."""
        sent = select(Exchange.photo_sha256).where(
            Exchange.user_id == user_id,
            Exchange.parent_id.is_(None),
            Exchange.photo_sha256.is_not(None),
        )
        frontier = set(
            await session.scalars(select(Exchange.id).where(Exchange.user_id == user_id))
        )
        seen = set(frontier)
        while frontier:  # a conversation is at most MAX_CONVERSATION_TURNS deep
            children = set(
                await session.scalars(select(Exchange.id).where(Exchange.parent_id.in_(frontier)))
            )
            frontier = children - seen
            seen |= frontier
        others = seen - set(
            await session.scalars(select(Exchange.id).where(Exchange.user_id == user_id))
        )
        if others:
            await session.execute(
                update(Exchange)
                .where(Exchange.id.in_(others), Exchange.photo_sha256.in_(sent))
                .values(photo_sha256=None)
                .execution_options(synchronize_session=False)
            )

    async def _remove_photo_files(self, photos: Sequence[tuple[str, str]]) -> None:
        """Remove the files of deleted photo rows, unless the same picture was added again
        meanwhile (its row is back: the file is its file now)."""
        for sha256, path in photos:
            async with self._photo_lock(sha256):
                try:
                    async with self._write() as session:
                        await self._lock_photo_key(session, sha256)
                        if await session.get(Photo, sha256) is None:
                            await asyncio.to_thread(self.photos.remove, path)
                except StoreUnavailable:
                    # Gone since the deletion committed: nothing can store the picture anew
                    # while it is away, and the user asked for it to be deleted.
                    log.warning("could not check photo %s again; its file is removed", sha256)
                    await asyncio.to_thread(self.photos.remove, path)

    @staticmethod
    async def _delete(session: AsyncSession, statement: Any) -> int:
        result: CursorResult[Any] = await session.execute(  # type: ignore[assignment]
            statement.execution_options(synchronize_session=False)
        )
        return result.rowcount

    @staticmethod
    async def _delete_unreferenced_photos(
        session: AsyncSession, keys: Sequence[str | None]
    ) -> list[tuple[str, str]]:
        """Delete the rows of these photos that no exchange uses; their (sha256, path)."""
        if not keys:
            return []
        still_used = exists().where(Exchange.photo_sha256 == Photo.sha256)
        rows = await session.execute(
            delete(Photo)
            .where(Photo.sha256.in_(keys), ~still_used)
            .returning(Photo.sha256, Photo.path)
        )
        return [(sha256, path) for sha256, path in rows]

    # -- model versions -----------------------------------------------------------------

    async def add_model_version(
        self,
        name: str,
        path: str,
        *,
        parent_id: int | None = None,
        trainer: str | None = None,
        run_id: int | None = None,
        system_prompt: str | None = None,
        template: str | None = None,
        evaluation: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> ModelVersionRecord:
        """Register a model the engine can load; it is not active until `activate_model_version`.

        ``parent_id`` is the version it was trained from, ``system_prompt`` and ``template``
        how it must be served (None: dishbot's default prompt, the tokenizer's own template).
        Raises `ValueError` when the name is taken.
        """
        async with self._write() as session:
            version = ModelVersion(
                name=name,
                path=path,
                parent_id=parent_id,
                trainer=trainer,
                run_id=run_id,
                system_prompt=system_prompt,
                template=template,
                evaluation=evaluation,
                metrics=metrics or {},
                created_at=utcnow(),
            )
            session.add(version)
            try:
                await session.flush()
            except IntegrityError:
                raise ValueError(f"a model version named {name!r} already exists") from None
            return snapshot(ModelVersionRecord, version)

    async def get_model_version(self, name: str) -> ModelVersionRecord | None:
        """The model version called ``name``, or None."""
        async with self._read() as session:
            version = await session.scalar(select(ModelVersion).where(ModelVersion.name == name))
            return snapshot(ModelVersionRecord, version) if version else None

    async def activate_model_version(
        self, name: str, *, reason: str = "activate"
    ) -> ModelVersionRecord:
        """Make ``name`` the one active model version (the previous one is deactivated).

        The activation is remembered (with ``reason``: "activate", "promote", "base") for
        `rollback_model_version`; activating the active version again changes nothing.
        Raises `NotFound` for an unknown name.
        """
        async with self._write() as session:
            await self._take_activation_turn(session)
            version = await session.scalar(select(ModelVersion).where(ModelVersion.name == name))
            if version is None:
                raise NotFound(f"model version {name!r} does not exist")
            if version.is_active:
                return snapshot(ModelVersionRecord, version)
            await self._make_active(session, version)
            session.add(
                ModelActivation(model_version_id=version.id, reason=reason, activated_at=utcnow())
            )
            await session.flush()
            return snapshot(ModelVersionRecord, version)

    async def _take_activation_turn(self, session: AsyncSession) -> None:
        if self._dialect == "postgresql":
            # Two activations at once would each see the other's row as inactive and
            # collide on the one-active index; take turns instead.
            await session.execute(select(func.pg_advisory_xact_lock(_ACTIVATION_LOCK)))
        await self._write_first(session, ModelVersion)

    async def _write_first(self, session: AsyncSession, model: type[Any]) -> None:
        """On SQLite, take the write lock before reading: another process (the CLI, a second
        bot) may write in between, and a transaction that read first cannot wait for the
        lock, it fails at once with "database is locked"."""
        if self._dialect == "sqlite":
            # A write statement takes the lock even when it changes no row.
            await session.execute(update(model).where(false()).values(id=model.id))

    @staticmethod
    async def _make_active(session: AsyncSession, version: ModelVersion) -> None:
        await session.execute(
            update(ModelVersion)
            .where(ModelVersion.is_active, ModelVersion.id != version.id)
            .values(is_active=False)
        )
        await session.flush()
        version.is_active = True
        version.activated_at = utcnow()

    async def active_model_version(self) -> ModelVersionRecord | None:
        """The model version that should be served, or None before any was activated."""
        async with self._read() as session:
            version = await session.scalar(select(ModelVersion).where(ModelVersion.is_active))
            return snapshot(ModelVersionRecord, version) if version else None

    async def model_versions(self) -> list[ModelVersionRecord]:
        """Every registered model version, oldest first."""
        async with self._read() as session:
            rows = await session.scalars(select(ModelVersion).order_by(ModelVersion.id))
            return [snapshot(ModelVersionRecord, row) for row in rows]

    async def previous_model_version(self) -> ModelVersionRecord | None:
        """The version `rollback_model_version` would bring back, or None if there is none."""
        async with self._read() as session:
            found = await self._rollback_target(session)
            return snapshot(ModelVersionRecord, found[1]) if found else None

    async def rollback_model_version(self) -> ModelVersionRecord:
        """Reactivate the version that was active before the current one, and return it.

        Each rollback goes one activation further back; activating anything afterwards starts
        a new history from there. Raises `NothingToRollBack` when no earlier version exists.
        """
        async with self._write() as session:
            await self._take_activation_turn(session)
            found = await self._rollback_target(session)
            if found is None:
                raise NothingToRollBack("there is no earlier model version to go back to")
            previous_activation, version = found
            await session.execute(
                update(ModelActivation)
                .where(ModelActivation.id > previous_activation.id)
                .values(rolled_back=True)
            )
            await self._make_active(session, version)
            await session.flush()
            return snapshot(ModelVersionRecord, version)

    @staticmethod
    async def _rollback_target(
        session: AsyncSession,
    ) -> tuple[ModelActivation, ModelVersion] | None:
        standing = select(ModelActivation).where(~ModelActivation.rolled_back)
        current = await session.scalar(standing.order_by(ModelActivation.id.desc()).limit(1))
        if current is None:
            return None
        previous = await session.scalar(
            standing.where(
                ModelActivation.id < current.id,
                ModelActivation.model_version_id != current.model_version_id,
            )
            .order_by(ModelActivation.id.desc())
            .limit(1)
        )
        if previous is None:
            return None
        version = await session.get(ModelVersion, previous.model_version_id)
        assert version is not None  # activations cascade with their version
        return previous, version

    # -- training runs ------------------------------------------------------------------

    async def create_training_run(
        self,
        *,
        requested_by: int | None = None,
        report_to: ReportTarget | None = None,
        trainer: str | None = None,
        force: bool = False,
        dry_run: bool = False,
        host: str | None = None,
        pid: int | None = None,
        parameters: dict[str, Any] | None = None,
        base_version_id: int | None = None,
    ) -> TrainingRunRecord:
        """Claim the one training slot with a new run, queued, supervised by ``host``/``pid``.

        Raises `RunInProgress` carrying the run that holds the slot: the database allows
        one unfinished run at a time, whichever process asks.
        """
        for _attempt in range(3):
            now = utcnow()
            run = TrainingRun(
                stage=RunStage.QUEUED,
                is_running=True,
                trainer=trainer,
                force=force,
                dry_run=dry_run,
                requested_by=requested_by,
                report_platform=report_to.platform if report_to else None,
                report_chat_id=report_to.chat_id if report_to else None,
                report_message_id=report_to.message_id if report_to else None,
                parameters=parameters or {},
                progress={},
                host=host,
                pid=pid,
                notes=[],
                base_version_id=base_version_id,
                created_at=now,
                started_at=now,
                updated_at=now,
            )
            try:
                async with self._write() as session:
                    session.add(run)
                    await session.flush()
                    return snapshot(TrainingRunRecord, run)
            except IntegrityError:
                running = await self.running_training_run()
                if running is not None:
                    raise RunInProgress(running) from None
                # The other run ended in between, or a reference is wrong: try again.
        raise NotFound(f"user {requested_by} or model version {base_version_id} does not exist")

    async def update_training_run(
        self,
        run_id: int,
        *,
        stage: RunStage | None = None,
        progress: dict[str, Any] | None = None,
        trainer: str | None = None,
        trainer_pgid: int | None = None,
        run_dir: str | None = None,
        log_path: str | None = None,
        output_path: str | None = None,
        notes: Sequence[str] = (),
    ) -> TrainingRunRecord:
        """Move a running run on: its stage, progress, trainer process group, files, notes.

        Arguments left None stay as they are; ``notes`` are appended. Every update is also
        the supervisor's heartbeat (``updated_at``). Raises `RunEnded` when the run has
        finished meanwhile (cancelled from another process, or failed by `recover`), so the
        supervisor stops; `NotFound` for an unknown run.
        """
        if stage is not None and stage.finished:
            raise ValueError(f"{stage} ends a run: use finish_training_run")
        async with self._write() as session:
            await self._write_first(session, TrainingRun)
            run = await session.get(TrainingRun, run_id, with_for_update=True)
            if run is None:
                raise NotFound(f"training run {run_id} does not exist")
            if not run.is_running:
                raise RunEnded(snapshot(TrainingRunRecord, run))
            changes = {
                "stage": stage,
                "progress": progress,
                "trainer": trainer,
                "trainer_pgid": trainer_pgid,
                "run_dir": run_dir,
                "log_path": log_path,
                "output_path": output_path,
            }
            for name, value in changes.items():
                if value is not None:
                    setattr(run, name, value)
            if notes:
                run.notes = [*run.notes, *notes]
            run.updated_at = utcnow()
            await session.flush()
            return snapshot(TrainingRunRecord, run)

    async def set_run_report_message(self, run_id: int, message_id: str) -> None:
        """Remember the platform message that shows a run's progress (the one to edit)."""
        async with self._write() as session:
            result = await session.execute(
                update(TrainingRun)
                .where(TrainingRun.id == run_id)
                .values(report_message_id=message_id)
            )
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise NotFound(f"training run {run_id} does not exist")

    async def finish_training_run(
        self,
        run_id: int,
        stage: RunStage,
        *,
        error: str | None = None,
        evaluation: dict[str, Any] | None = None,
        decision: str | None = None,
        notes: Sequence[str] = (),
        model_version_id: int | None = None,
    ) -> TrainingRunRecord:
        """End a run: done, rejected, failed or cancelled, with its error or results.

        The first end wins: a run that has finished already is returned unchanged (compare
        its ``stage``), so a cancel racing the run's own failure leaves one consistent story.
        """
        if not stage.finished:
            raise ValueError(f"{stage} is not an end state of a training run")
        async with self._write() as session:
            await self._write_first(session, TrainingRun)
            run = await session.get(TrainingRun, run_id, with_for_update=True)
            if run is None:
                raise NotFound(f"training run {run_id} does not exist")
            if not run.is_running:
                return snapshot(TrainingRunRecord, run)
            run.stage = stage
            run.is_running = False
            run.error = error
            if evaluation is not None:
                run.evaluation = evaluation
            if decision is not None:
                run.decision = decision
            if notes:
                run.notes = [*run.notes, *notes]
            if model_version_id is not None:
                run.model_version_id = model_version_id
            run.finished_at = run.updated_at = utcnow()
            await session.flush()
            return snapshot(TrainingRunRecord, run)

    async def get_training_run(self, run_id: int) -> TrainingRunRecord | None:
        """The training run with this id, or None."""
        async with self._read() as session:
            run = await session.get(TrainingRun, run_id)
            return snapshot(TrainingRunRecord, run) if run else None

    async def training_runs(self, *, limit: int = 20) -> list[TrainingRunRecord]:
        """The newest ``limit`` training runs, newest first."""
        async with self._read() as session:
            rows = await session.scalars(
                select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)
            )
            return [snapshot(TrainingRunRecord, row) for row in rows]

    async def running_training_run(self) -> TrainingRunRecord | None:
        """The run holding the training slot (not finished), or None when it is free."""
        async with self._read() as session:
            run = await session.scalar(select(TrainingRun).where(TrainingRun.is_running))
            return snapshot(TrainingRunRecord, run) if run else None


def _percentiles(values: list[int], *quantiles: float) -> list[int | None]:
    """The nearest-rank quantiles of ``values`` (None each when there are none)."""
    if not values:
        return [None for _ in quantiles]
    ordered = sorted(values)
    return [ordered[max(0, math.ceil(q * len(ordered)) - 1)] for q in quantiles]


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (the owner checks of exchanges,
    inbox entries and training runs)."""
    if pid <= 0:  # os.kill would signal a whole group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, run by another user
    return True


@contextlib.asynccontextmanager
async def _unavailable_as_store_unavailable() -> AsyncIterator[None]:
    """A database that cannot be used becomes `StoreUnavailable`; other errors pass as they are."""
    try:
        yield
    except StoreUnavailable:
        raise
    except Exception as error:
        if not is_connection_failure(error):
            raise
        raise StoreUnavailable(f"the database is unavailable: {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
