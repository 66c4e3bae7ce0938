"""An answer as the user sees it: one or more messages, edited as the text streams in.

Partial edits and the place-in-line notice are paced per chat (about one a second) and made
only from the chat's spare call budget (`bot.core.budget`); the final text goes out at once.
The text is split at the platform's length limit on a paragraph or sentence boundary, and
the rating buttons go on the last message once the answer is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from bot.core.budget import CallBudget, unpaced
from bot.core.events import Place
from bot.core.port import Button, ChatPort, DeliveryUnknown, MessageGone
from bot.core.text import split_message

log = logging.getLogger(__name__)

PLACEHOLDER = "…"


async def send_long(port: ChatPort, where: Place, text: str, *, reply_to: str | None) -> None:
    """Send ``text`` in as many messages as the platform's length limit needs."""
    for index, part in enumerate(split_message(text, port.message_limit, port.text_length)):
        await port.send(where, part, reply_to=reply_to if index == 0 else None)


class EditPacer:
    """Hands out slots for partial edits per chat, ``interval_s`` apart, first come first
    served; and holds the call budget that decides whether a slot may be used."""

    def __init__(self, interval_s: float, budget: CallBudget | None = None) -> None:
        self.interval_s = interval_s
        self.budget = budget or CallBudget()
        self._next_slot: dict[str, float] = {}

    async def wait_turn(self, chat_id: str) -> None:
        """Wait for this chat's next free slot, and take it."""
        now = time.monotonic()
        slot = max(now, self._next_slot.get(chat_id, now))
        self._next_slot[chat_id] = slot + self.interval_s
        if slot > now:
            await asyncio.sleep(slot - now)
        self._forget_idle_chats(now)

    def _forget_idle_chats(self, now: float) -> None:
        if len(self._next_slot) > 10_000:
            self._next_slot = {c: t for c, t in self._next_slot.items() if t > now}


class StreamingReply:
    """The messages showing one answer (or the notice that replaced it)."""

    def __init__(
        self, port: ChatPort, where: Place, pacer: EditPacer, *, reply_to: str | None
    ) -> None:
        self._port = unpaced(port)  # calls are counted here, each as urgent or spare
        self._where = where
        self._pacer = pacer
        self._budget = pacer.budget
        self._reply_to = reply_to
        # None: a message sent whose id never came back (`DeliveryUnknown`).
        self._message_ids: list[str | None] = []
        self._shown: list[tuple[str, tuple[Button, ...]]] = []
        self._text = ""
        self._notice = ""  # shown until the answer's text starts
        self._dirty = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def last_message_id(self) -> str | None:
        """The id of the last message shown (the one with the buttons); None when nothing was
        shown or its id was lost (`DeliveryUnknown`): never an earlier message's."""
        return self._message_ids[-1] if self._message_ids else None

    def status(self, text: str) -> None:
        """A notice (e.g. the place in the queue) until the answer starts; shown at the
        chat's next free edit slot, like the answer so far. Only the latest notice is shown:
        waiting for a slot for each would hold up the answer behind notices long stale."""
        if self._text:
            return
        self._notice = text
        self._show_soon()

    def stream(self, text: str) -> None:
        """The answer so far; shown at the chat's next free edit slot."""
        self._text = text
        self._show_soon()

    def _show_soon(self) -> None:
        self._dirty.set()
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_forever())

    async def finish(self, text: str, buttons: Sequence[Button] = ()) -> str | None:
        """Show the final text, with ``buttons`` on its last message; returns that message's
        id (`last_message_id`)."""
        await self._stop_flushing()
        self._text = text
        await self._render(text, tuple(buttons), urgent=True)
        return self.last_message_id

    async def abandon(self) -> None:
        """Stop showing the answer as it streams (it will not be finished here)."""
        await self._stop_flushing()

    async def _flush_forever(self) -> None:
        while True:
            await self._dirty.wait()
            await self._pacer.wait_turn(self._where.chat_id)
            self._dirty.clear()
            try:
                # Shielded: cancelling the flusher must not cut a send short, or a message
                # could reach the chat without us knowing its id.
                shown = self._text or self._notice
                if not await asyncio.shield(self._render(shown, (), urgent=False)):
                    self._dirty.set()  # no spare call now: try again at the next slot
            except asyncio.CancelledError:
                raise
            except Exception:
                # A failed intermediate edit is not worth losing the answer over: the
                # final render tries again.
                log.warning("could not show a partial answer", exc_info=True)

    async def _stop_flushing(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None

    async def _render(self, text: str, buttons: tuple[Button, ...], *, urgent: bool) -> bool:
        """Show ``text``; False when a spare call did not fit and the rest is not shown."""
        async with self._lock:
            parts = split_message(
                text or PLACEHOLDER, self._port.message_limit, self._port.text_length
            )
            for index, part in enumerate(parts):
                last = index == len(parts) - 1
                if not await self._show(index, part, buttons if last else (), urgent):
                    return False
            return True

    def _may_call(self, urgent: bool) -> bool:
        if urgent:
            self._budget.spent(self._port, self._where)
            return True
        return self._budget.spare(self._port, self._where)

    async def _show(self, index: int, text: str, buttons: tuple[Button, ...], urgent: bool) -> bool:
        if index < len(self._message_ids):
            if self._shown[index] == (text, buttons):
                return True  # platforms refuse an edit that changes nothing
            if not self._may_call(urgent):
                return False
            await self._replace(index, text, buttons)
            return True
        if not self._may_call(urgent):
            return False
        reply_to = self._reply_to if index == 0 else None
        self._message_ids.append(await self._send(text, buttons, reply_to))
        self._shown.append((text, buttons))
        return True

    async def _replace(self, index: int, text: str, buttons: tuple[Button, ...]) -> None:
        message_id = self._message_ids[index]
        if message_id is not None:
            try:
                await self._port.edit(self._where, message_id, text, buttons=buttons)
                self._shown[index] = (text, buttons)
                return
            except MessageGone:
                log.info("a message of an answer was deleted; sending that part again")
                self._budget.spent(self._port, self._where)
        self._message_ids[index] = await self._send(text, buttons, None)
        self._shown[index] = (text, buttons)

    async def _send(
        self, text: str, buttons: tuple[Button, ...], reply_to: str | None
    ) -> str | None:
        try:
            return await self._port.send(self._where, text, reply_to=reply_to, buttons=buttons)
        except DeliveryUnknown:
            # Probably shown, so not sent again; a later change of this part goes out as a
            # new message (the one whose id was lost stays as it was).
            log.warning("a message of an answer may not have arrived; not sending it twice")
            return None
