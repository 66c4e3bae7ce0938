"""Questions a process that is gone accepted and never answered: found, claimed, answered.

A kill -9, a crash or a stop mid-answer leaves exchanges pending (the platform will not
deliver those updates again). At start, and every so often after, `Recovery.sweep` finds
them (`Store.orphaned_exchanges`), claims each (`Store.claim_exchange`: of processes starting
together one wins), and has the dialog answer it in the background like a new question,
or apologise where that is impossible. No pending row is left behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import timedelta

from bot.core.dialog import Dialog
from bot.core.port import ChatPort
from bot.store import ExchangeRecord, Store
from bot.store.models import utcnow

log = logging.getLogger(__name__)

# After the engine's request timeout, how much longer an owner on another host may take
# (delivering, storing) before its pending questions count as abandoned.
STALE_GRACE_S = 60.0
# A question older than this is not answered after a restart but apologised for: an answer
# hours late to a photo the user has forgotten about helps nobody.
RESUME_WITHIN = timedelta(hours=6)


class Recovery:
    """Answers the orphaned questions of gone processes through ``ports`` (one per platform)."""

    def __init__(
        self,
        store: Store,
        dialog: Dialog,
        ports: Mapping[str, ChatPort],
        *,
        request_timeout_s: float,
    ) -> None:
        self.store = store
        self.dialog = dialog
        self.ports = dict(ports)
        self.stale_after = timedelta(seconds=request_timeout_s + STALE_GRACE_S)
        self._resuming: dict[int, asyncio.Task[None]] = {}

    async def sweep(self) -> list[int]:
        """Claim every orphaned question and start answering it; returns their ids.

        The answers stream in the background (see `close`), in the order first asked.
        """
        claimed: list[int] = []
        while True:
            orphans = await self.store.orphaned_exchanges(
                stale_after=self.stale_after, busy=self._busy()
            )
            fresh = [await self._take(orphan) for orphan in orphans]
            taken = [exchange.id for exchange in fresh if exchange is not None]
            claimed.extend(taken)
            if not taken:
                return claimed

    @property
    def busy(self) -> bool:
        """Whether questions it took are still being answered."""
        return bool(self._resuming)

    async def close(self) -> None:
        """Stop answering: what is unfinished stays pending for the next start."""
        tasks = list(self._resuming.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _take(self, orphan: ExchangeRecord) -> ExchangeRecord | None:
        exchange = await self.store.claim_exchange(orphan)
        if exchange is None:
            return None  # another process took it, or it ended meanwhile
        port = self.ports.get(exchange.platform)
        if port is None:
            await self.dialog.give_up(exchange, f"{exchange.platform} is not configured", None)
        elif utcnow() - exchange.created_at > RESUME_WITHIN:
            await self.dialog.give_up(exchange, "it was asked too long ago", port)
        else:
            task = asyncio.create_task(
                self.dialog.resume(exchange, port), name=f"resume-exchange-{exchange.id}"
            )
            self._resuming[exchange.id] = task
            task.add_done_callback(lambda _: self._resuming.pop(exchange.id, None))
        return exchange

    def _busy(self) -> set[int]:
        return self.dialog.busy_exchanges() | set(self._resuming)
