"""Each chat's calls, budgeted within the platform's limits so that answers go first.

A platform lets a bot make only so many calls to a chat (Telegram: 20 a minute in a group)
and overall (`bot.core.limits`). Calls that carry what the user asked for (answers, replies,
button changes) are *urgent*: they are made at once, and counted. Calls that only decorate a
wait (typing actions, the place in line, partial edits of an answer still streaming) are
*spare*: made only when the chat's window has room beyond what is counted and beyond one call
reserved for every answer still pending there, and when less than half of the platform's
overall rate is in use. So when answers finish, their calls find the platform's limiter
empty and are not queued behind decorations.

Urgent calls are not delayed here: the platform library paces them (PTB's AIORateLimiter,
discord.py's buckets), and counting them here keeps the spare calls out of their way.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from bot.core.events import ButtonPress, Place
from bot.core.limits import CallLimit
from bot.core.port import Button, ChatPort

SPARE_SHARE_OF_OVERALL = 0.5  # of the platform's overall rate; the rest is kept for answers
# For a port that states no limits (one written before `ChatPort.call_limit`, or a web page):
# its calls are counted and nothing is held back.
UNLIMITED = CallLimit(2**31, 1.0)
MAX_IDLE_WINDOWS = 10_000  # chats remembered before idle ones are swept


@dataclass
class _Window:
    limit: CallLimit
    times: deque[float] = field(default_factory=deque)
    reserved: int = 0

    def used(self, now: float) -> int:
        while self.times and self.times[0] <= now - self.limit.per_s:
            self.times.popleft()
        return len(self.times)


class CallBudget:
    """Counts a bot's calls per chat and per platform in sliding windows as long as the
    platform's limits, and says when a spare call fits."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._chats: dict[tuple[str, str], _Window] = {}
        self._overall: dict[str, _Window] = {}

    def spent(self, port: ChatPort, where: Place) -> None:
        """Count an urgent call to ``where`` (made at once, whatever the budget)."""
        now = self._clock()
        self._chat(port, where).times.append(now)
        self._platform(port).times.append(now)

    def spare(self, port: ChatPort, where: Place) -> bool:
        """Whether a spare call to ``where`` fits now; if it does, it is counted."""
        now = self._clock()
        chat, overall = self._chat(port, where), self._platform(port)
        if chat.used(now) + chat.reserved >= chat.limit.calls:
            return False
        if overall.used(now) >= overall.limit.calls * SPARE_SHARE_OF_OVERALL:
            return False
        chat.times.append(now)
        overall.times.append(now)
        return True

    @contextlib.contextmanager
    def reserve(self, port: ChatPort, where: Place) -> Iterator[None]:
        """Keep one call of the chat's window free while inside (an answer pending)."""
        window = self._chat(port, where)
        window.reserved += 1
        try:
            yield
        finally:
            window.reserved -= 1

    def __len__(self) -> int:
        """How many chats are remembered."""
        return len(self._chats)

    def _chat(self, port: ChatPort, where: Place) -> _Window:
        key = (port.platform, where.chat_id)
        window = self._chats.get(key)
        if window is None:
            if len(self._chats) >= MAX_IDLE_WINDOWS:
                self._sweep()
            call_limit = getattr(port, "call_limit", None)
            limit = UNLIMITED if call_limit is None else call_limit(where)
            window = self._chats[key] = _Window(limit)
        return window

    def _platform(self, port: ChatPort) -> _Window:
        window = self._overall.get(port.platform)
        if window is None:
            limit = getattr(port, "overall_call_limit", UNLIMITED)
            window = self._overall[port.platform] = _Window(limit)
        return window

    def _sweep(self) -> None:
        # Chats with no call in their window and no answer pending are forgotten, so memory
        # follows the chats active lately, not every chat ever seen.
        now = self._clock()
        self._chats = {
            key: window
            for key, window in self._chats.items()
            if window.reserved or window.used(now)
        }


def unpaced(port: ChatPort) -> ChatPort:
    """The platform's own port behind a `PacedPort` (the port itself otherwise)."""
    return port.inner if isinstance(port, PacedPort) else port


class PacedPort:
    """A `ChatPort` that counts every call in a `CallBudget` and shows typing only from
    what is spare."""

    def __init__(self, inner: ChatPort, budget: CallBudget) -> None:
        self.inner = inner
        self.budget = budget

    @property
    def platform(self) -> str:
        return self.inner.platform

    @property
    def message_limit(self) -> int:
        return self.inner.message_limit

    @property
    def typing_interval_s(self) -> float:
        return self.inner.typing_interval_s

    @property
    def answers_admin_commands_privately(self) -> bool:
        return self.inner.answers_admin_commands_privately

    @property
    def overall_call_limit(self) -> CallLimit:
        return getattr(self.inner, "overall_call_limit", UNLIMITED)

    def call_limit(self, where: Place) -> CallLimit:
        call_limit = getattr(self.inner, "call_limit", None)
        return UNLIMITED if call_limit is None else call_limit(where)

    def text_length(self, text: str) -> int:
        return self.inner.text_length(text)

    async def send(
        self,
        where: Place,
        text: str,
        *,
        reply_to: str | None = None,
        buttons: Sequence[Button] = (),
    ) -> str:
        self.budget.spent(self.inner, where)
        return await self.inner.send(where, text, reply_to=reply_to, buttons=buttons)

    async def edit(
        self, where: Place, message_id: str, text: str, *, buttons: Sequence[Button] = ()
    ) -> None:
        self.budget.spent(self.inner, where)
        await self.inner.edit(where, message_id, text, buttons=buttons)

    async def set_buttons(self, where: Place, message_id: str, buttons: Sequence[Button]) -> None:
        self.budget.spent(self.inner, where)
        await self.inner.set_buttons(where, message_id, buttons)

    async def typing(self, where: Place) -> None:
        if self.budget.spare(self.inner, where):
            await self.inner.typing(where)

    async def acknowledge(self, press: ButtonPress, text: str) -> None:
        await self.inner.acknowledge(press, text)

    async def ask_for_correction(
        self, press: ButtonPress, exchange_id: int, prompt: str
    ) -> str | None:
        self.budget.spent(self.inner, press.where)
        return await self.inner.ask_for_correction(press, exchange_id, prompt)
