"""What a platform delivered, kept in the store until its handling ends, so none is lost in a crash.

Telegram forgets an update once the bot acknowledges it, Discord never delivers a gateway
message again: what a process that dies held in memory (a photo still downloading) would be
gone. An adapter calls `Inbox.receive` before it acknowledges (or as soon as a message
arrives) and `Inbox.settle` when the handling has ended; on start, `bot.core.recovery`
hands what a gone process left to the adapter's `replay`.

Writes are grouped: every entry waiting when a write starts goes into the next one, so many
updates at once cost few transactions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from bot.store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")


class GroupWriter(Generic[T]):
    """Calls ``write`` with every item added while the previous call ran; `add` returns
    once its item is written (or raises what the write raised)."""

    def __init__(self, write: Callable[[Sequence[T]], Awaitable[None]]) -> None:
        self._write = write
        self._waiting: list[tuple[T, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def add(self, item: T) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain(), name="inbox-writer")
        await asyncio.shield(future)  # a cancelled caller leaves the batch to the others

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                await self._write([item for item, _ in batch])
            except Exception as error:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                        future.exception()  # retrieved: a caller that left does not warn
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)


class Inbox:
    """One platform's entries in the store's inbox (see the module's docstring)."""

    def __init__(self, store: Store, platform: str) -> None:
        self.store = store
        self.platform = platform
        self._received: GroupWriter[tuple[str, str]] = GroupWriter(self._add)
        self._settled: GroupWriter[str] = GroupWriter(self._remove)

    async def receive(self, key: str, payload: str) -> None:
        """Keep ``payload`` under ``key`` until `settle`. When the store will not take it,
        the delivery is handled all the same (only a crash now would lose it): refusing it
        would stop the bot while the database is down, and the dialog apologises then."""
        try:
            await self._received.add((key, payload))
        except Exception as error:
            log.warning("%s: could not keep %s in the inbox: %s", self.platform, key, error)

    async def settle(self, key: str) -> None:
        """Drop ``key``: its handling has ended. Never raises: an entry left behind is only
        handled again by the next start, where the dialog refuses a message it stored."""
        try:
            await self._settled.add(key)
        except Exception as error:
            log.warning("%s: could not remove %s from the inbox: %s", self.platform, key, error)

    async def _add(self, entries: Sequence[tuple[str, str]]) -> None:
        await self.store.add_to_inbox(self.platform, entries)

    async def _remove(self, keys: Sequence[str]) -> None:
        await self.store.remove_from_inbox(self.platform, set(keys))
