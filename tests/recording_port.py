"""A `ChatPort` that keeps what the dialog said, for driving `Dialog` directly in core tests.

It is a chat as a user sees it: messages by id with their latest text, and the notices shown
to a presser. Adapters are tested against the platform emulators; this is for the dialog's
own races, where a test must hold a download or a database at a chosen moment.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bot.core.events import ButtonPress, Person, Place
from bot.core.port import Button

GUARD_S = 15.0  # how long a test waits for the dialog; a guard against hangs, not a measurement


@dataclass
class Shown:
    chat_id: str
    text: str
    buttons: tuple[Button, ...] = ()
    reply_to: str | None = None


@dataclass
class RecordingPort:
    platform: str = "telegram"
    message_limit: int = 4096
    typing_interval_s: float = 4.5
    answers_admin_commands_privately: bool = False
    messages: dict[str, Shown] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def text_length(self, text: str) -> int:
        return len(text)

    async def send(
        self,
        where: Place,
        text: str,
        *,
        reply_to: str | None = None,
        buttons: Sequence[Button] = (),
    ) -> str:
        message_id = str(next(self._ids))
        self.messages[message_id] = Shown(where.chat_id, text, tuple(buttons), reply_to)
        self._changed.set()
        return message_id

    async def edit(
        self, where: Place, message_id: str, text: str, *, buttons: Sequence[Button] = ()
    ) -> None:
        self.messages[message_id] = Shown(
            where.chat_id, text, tuple(buttons), self.messages[message_id].reply_to
        )
        self._changed.set()

    async def set_buttons(self, where: Place, message_id: str, buttons: Sequence[Button]) -> None:
        self.messages[message_id].buttons = tuple(buttons)

    async def typing(self, where: Place) -> None:
        return None

    async def acknowledge(self, press: ButtonPress, text: str) -> None:
        self.notices.append(text)
        self._changed.set()

    async def ask_for_correction(
        self, press: ButtonPress, exchange_id: int, prompt: str
    ) -> str | None:
        return await self.send(press.where, prompt)

    def texts(self, chat_id: str) -> list[str]:
        """What the chat shows now, oldest message first."""
        return [shown.text for shown in self.messages.values() if shown.chat_id == chat_id]

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition`` holds (checked whenever the chat changes)."""

        async def poll() -> None:
            while not condition():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(poll(), GUARD_S)


def person(user_id: str, language: str = "en") -> Person:
    return Person("telegram", user_id, f"user {user_id}", language)


def private_chat(user_id: str) -> Place:
    return Place(user_id, private=True)
