"""Questions a process that is gone accepted and never answered: found, claimed, answered.

A kill -9, a crash or a stop mid-answer leaves exchanges pending (the platform will not
deliver those updates again). At start, and every so often after, `Recovery.sweep` finds
them (`Store.orphaned_exchanges`), claims each (`Store.claim_exchange`: of processes starting
together one wins), and has the dialog answer it in the background like a new question,
or apologise where that is impossible. No pending row is left behind.

Before that, what such a process had received and not yet stored (the inbox, see
`bot.core.inbox`) is handed to its adapter's `Replayer.replay`, as if it came now; the
dialog does not ask twice a message it stored. After it, answers such a process stored and
never showed (it died between the two) are shown, as stored, with their buttons.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Coroutine, Mapping
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

from bot.core.dialog import Dialog
from bot.core.port import ChatPort
from bot.store import ExchangeRecord, InboxRecord, Store
from bot.store.models import utcnow

log = logging.getLogger(__name__)

# After the engine's request timeout, how much longer an owner on another host may take
# (delivering, storing) before its pending questions count as abandoned.
STALE_GRACE_S = 60.0
# A question older than this is not answered after a restart but apologised for: an answer
# hours late to a photo the user has forgotten about helps nobody.
RESUME_WITHIN = timedelta(hours=6)
# A delivery handled again this often without finishing (each time by a process that then
# died, or its replay failing) is dropped, logged: it may be what kills them.
MAX_REPLAYS = 3
# An answer stored but never shown is shown after a restart only this soon after it was
# stored: later the user has asked again or moved on.
DELIVER_WITHIN = timedelta(minutes=10)


@runtime_checkable
class Replayer(Protocol):
    """An adapter that can handle again what its platform delivered (an inbox entry)."""

    async def replay(self, entry: InboxRecord) -> None:
        """Handle ``entry`` as if it was delivered now; it leaves the inbox when done."""


class Recovery:
    """Answers the orphaned questions of gone processes through ``ports`` (one per platform)."""

    def __init__(
        self,
        store: Store,
        dialog: Dialog,
        ports: Mapping[str, ChatPort],
        *,
        request_timeout_s: float,
        replayers: Mapping[str, Replayer] | None = None,
    ) -> None:
        """``replayers`` (one per platform that keeps an inbox) handle again what a gone
        process received."""
        self.store = store
        self.dialog = dialog
        self.ports = dict(ports)
        self.replayers = dict(replayers or {})
        self.stale_after = timedelta(seconds=request_timeout_s + STALE_GRACE_S)
        self._resuming: dict[int, asyncio.Task[None]] = {}
        # Entries it claimed whose replay failed (Discord's REST down, say): tried again at
        # the next sweep, as this process now owns them and `orphaned_inbox` skips them.
        self._replay_again: list[InboxRecord] = []

    async def sweep(self) -> list[int]:
        """Claim every orphaned question and start answering it; returns their ids.

        The answers stream in the background (see `close`), in the order first asked.
        First the deliveries gone processes received are handled again; last, the answers
        they stored and never showed are shown.
        """
        await self._replay_inbox()
        claimed: list[int] = []
        while True:
            orphans = await self.store.orphaned_exchanges(
                stale_after=self.stale_after, busy=self._busy()
            )
            fresh = [await self._take(orphan) for orphan in orphans]
            taken = [exchange.id for exchange in fresh if exchange is not None]
            claimed.extend(taken)
            if not taken:
                break
        await self._deliver_undelivered()
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
            self._track(exchange.id, self.dialog.resume(exchange, port), "resume")
        return exchange

    def _track(self, exchange_id: int, work: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(work, name=f"{what}-exchange-{exchange_id}")
        self._resuming[exchange_id] = task
        task.add_done_callback(lambda _: self._resuming.pop(exchange_id, None))

    def _busy(self) -> set[int]:
        return self.dialog.busy_exchanges() | set(self._resuming)

    async def _replay_inbox(self) -> None:
        again, self._replay_again = self._replay_again, []
        for failed in again:
            await self._replay(dataclasses.replace(failed, attempts=failed.attempts + 1))
        # Entries it claims become this process's, which `orphaned_inbox` never lists.
        while orphans := await self.store.orphaned_inbox(stale_after=self.stale_after):
            for orphan in orphans:
                entry = await self.store.claim_inbox_entry(orphan)
                if entry is not None:
                    await self._replay(entry)

    async def _replay(self, entry: InboxRecord) -> None:
        replayer = self.replayers.get(entry.platform)
        if entry.attempts > MAX_REPLAYS:
            log.error(
                "%s delivery %s was handled again %d times and never finished: dropped: %s",
                entry.platform,
                entry.key,
                entry.attempts - 1,
                entry.payload,
            )
        elif utcnow() - entry.created_at > RESUME_WITHIN:
            log.warning("%s delivery %s is too old to handle: dropped", entry.platform, entry.key)
        elif replayer is None:
            log.warning("%s is not configured: delivery %s dropped", entry.platform, entry.key)
        else:
            log.info("handling %s delivery %s again", entry.platform, entry.key)
            try:
                await replayer.replay(entry)
            except Exception:
                log.exception("could not handle %s delivery %s again", entry.platform, entry.key)
                self._replay_again.append(entry)
            return
        await self.store.remove_from_inbox(entry.platform, [entry.key])

    async def _deliver_undelivered(self) -> None:
        found = await self.store.undelivered_answers(
            stale_after=self.stale_after, answered_within=DELIVER_WITHIN, busy=self._busy()
        )
        for exchange in found:
            port = self.ports.get(exchange.platform)
            if port is None or await self.store.claim_undelivered_answer(exchange) is None:
                continue
            self._track(exchange.id, self._deliver(exchange, port), "deliver")

    async def _deliver(self, exchange: ExchangeRecord, port: ChatPort) -> None:
        """Show a stored answer as it was stored, with its rating buttons; no new answer."""
        try:
            await self.dialog.show_stored_answer(exchange, port)
        except Exception:
            log.exception("could not show the stored answer to exchange %s", exchange.id)
