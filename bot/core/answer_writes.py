"""Answers the database would not take: shown already, stored later in the background.

When storing a finished answer fails because the database is down (restarting, locked), the
user still gets the answer; the write waits here, retried with backoff until the database
is back, so the question is not asked again after a restart. The queue is bounded: a long
outage drops the oldest writes (those questions are answered again after a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError, IntegrityError

from bot.errors import AlreadyAnswered, DatabaseUnavailable, NotFound
from bot.store import Store

log = logging.getLogger(__name__)

MAX_WAITING_WRITES = 1000
FIRST_RETRY_S = 0.5
LONGEST_RETRY_S = 30.0


def store_unavailable(error: BaseException) -> bool:
    """Whether ``error`` says the database could not be reached or used just now (worth
    retrying), rather than that the write itself was wrong."""
    if isinstance(error, IntegrityError):
        return False
    return isinstance(error, DatabaseUnavailable | DBAPIError | OSError)


@dataclass(frozen=True, slots=True)
class WaitingAnswer:
    """An answer the user has seen, to store as `Store.finish_exchange` would; ``then`` runs
    once it is stored (the answer's rating buttons go on)."""

    exchange_id: int
    answer: str
    model_version: str | None
    latency_ms: int
    reply_message_id: str | None
    then: Callable[[], Awaitable[None]] | None = None


class AnswerWrites:
    """The answers waiting for the database, written in order by one background task."""

    def __init__(
        self,
        store: Store,
        *,
        capacity: int = MAX_WAITING_WRITES,
        first_retry_s: float = FIRST_RETRY_S,
        longest_retry_s: float = LONGEST_RETRY_S,
    ) -> None:
        self.store = store
        self.capacity = capacity
        self.first_retry_s = first_retry_s
        self.longest_retry_s = longest_retry_s
        self._waiting: OrderedDict[int, WaitingAnswer] = OrderedDict()
        self._worker: asyncio.Task[None] | None = None

    def exchange_ids(self) -> set[int]:
        """The exchanges whose answers are waiting to be stored."""
        return set(self._waiting)

    def add(self, waiting: WaitingAnswer) -> None:
        """Store ``waiting`` as soon as the database takes it."""
        self._waiting[waiting.exchange_id] = waiting
        while len(self._waiting) > self.capacity:
            dropped, _ = self._waiting.popitem(last=False)
            log.error(
                "too many answers wait for the database: the answer to exchange %s is not "
                "stored, and will be asked again after a restart",
                dropped,
            )
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._write_all(), name="answer-writes")

    async def close(self) -> None:
        """Stop retrying; what is still waiting is logged (and asked again after a restart)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._waiting:
            log.error(
                "stopping with %d answers not stored (exchanges %s): they will be asked again",
                len(self._waiting),
                ", ".join(map(str, self._waiting)),
            )

    async def _write_all(self) -> None:
        delay = self.first_retry_s
        while self._waiting:
            waiting = next(iter(self._waiting.values()))
            try:
                stored = await self._write(waiting)
            except Exception as exc:
                if store_unavailable(exc):
                    log.warning(
                        "the database is still unavailable (%s); retry in %.1f s", exc, delay
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.longest_retry_s)
                    continue
                log.exception("could not store the answer to exchange %s", waiting.exchange_id)
                stored = False
            delay = self.first_retry_s
            self._waiting.pop(waiting.exchange_id, None)
            if stored:
                await self._stored(waiting)

    @staticmethod
    async def _stored(waiting: WaitingAnswer) -> None:
        log.info("stored the answer to exchange %s: the database is back", waiting.exchange_id)
        if waiting.then is None:
            return
        try:
            await waiting.then()
        except Exception:
            log.warning(
                "could not update the answer to exchange %s", waiting.exchange_id, exc_info=True
            )

    async def _write(self, waiting: WaitingAnswer) -> bool:
        try:
            await self.store.finish_exchange(
                waiting.exchange_id,
                answer=waiting.answer,
                model_version=waiting.model_version,
                latency_ms=waiting.latency_ms,
                reply_message_id=waiting.reply_message_id,
            )
        except (AlreadyAnswered, NotFound):
            # Answered by another process after all, or forgotten: nothing left to store.
            log.info("exchange %s needs no answer stored any more", waiting.exchange_id)
            return False
        return True
