"""The web as a chat platform: each visitor's conversation in memory, pushed to their pages.

`WebPort` is the `ChatPort` the dialog answers web visitors through. A visitor's chat is
their own (``Place.chat_id`` is the visitor id, always private). What the bot sends or edits
is kept (the latest `MAX_MESSAGES` per visitor, for `MAX_VISITORS` visitors) and published
to every page the visitor has open, as plain data the page renders as text, never as markup.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.core.budget import UNLIMITED
from bot.core.dialog import MAX_QUESTION_LENGTH
from bot.core.events import ButtonPress, Place
from bot.core.limits import CallLimit
from bot.core.port import Button, MessageGone

PLATFORM = "web"
# A page shows any length; this only bounds one message (an answer is far shorter).
MESSAGE_LIMIT = 10_000
TYPING_INTERVAL_S = 5.0
MAX_MESSAGES = 100  # per visitor, newest kept: what a reloaded page shows again
MAX_VISITORS = 10_000  # conversations kept, most recently active first
STREAM_BACKLOG = 256  # events a slow page may fall behind before it is made to reconnect

Update = dict[str, Any]


def new_message_id() -> str:
    """A message id no other message in any chat has (ids outlive a restart in the store)."""
    return secrets.token_hex(8)


@dataclass
class Conversation:
    """One visitor's messages, and the queues of the pages showing them."""

    messages: OrderedDict[str, Update] = field(default_factory=OrderedDict)
    pages: set[asyncio.Queue[Update]] = field(default_factory=set)

    def keep(self, message: Update) -> None:
        self.messages[message["id"]] = message
        self.messages.move_to_end(message["id"])
        while len(self.messages) > MAX_MESSAGES:
            self.messages.popitem(last=False)


class Conversations:
    """Every visitor's conversation; the least recently active are forgotten first."""

    def __init__(self) -> None:
        self._chats: OrderedDict[str, Conversation] = OrderedDict()

    def of(self, visitor_id: str) -> Conversation:
        """The visitor's conversation (a new one if none is kept)."""
        chat = self._chats.get(visitor_id)
        if chat is None:
            chat = self._chats[visitor_id] = Conversation()
            self._forget_oldest()
        self._chats.move_to_end(visitor_id)
        return chat

    def _forget_oldest(self) -> None:
        excess = len(self._chats) - MAX_VISITORS
        if excess <= 0:
            return
        # A visitor with a page open is kept: their page still shows the conversation.
        idle = [v for v, chat in self._chats.items() if not chat.pages][:excess]
        for visitor_id in idle:
            del self._chats[visitor_id]

    def publish(self, visitor_id: str, update: Update) -> None:
        """Send ``update`` to every page the visitor has open; keep it if it is a message."""
        chat = self.of(visitor_id)
        if update["kind"] == "message":
            chat.keep(update)
        for page in list(chat.pages):
            try:
                page.put_nowait(update)
            except asyncio.QueueFull:
                # Too far behind: its stream ends, and the page reconnects and catches up.
                chat.pages.discard(page)
                with contextlib.suppress(asyncio.QueueFull):
                    page.put_nowait({"kind": "reconnect"})

    @contextlib.contextmanager
    def page(self, visitor_id: str) -> Iterator[tuple[list[Update], asyncio.Queue[Update]]]:
        """Open a page: the messages so far, and a queue of what happens next."""
        chat = self.of(visitor_id)
        queue: asyncio.Queue[Update] = asyncio.Queue(STREAM_BACKLOG)
        chat.pages.add(queue)
        try:
            yield list(chat.messages.values()), queue
        finally:
            chat.pages.discard(queue)

    def close_pages(self) -> None:
        """End every open page's stream (the server is stopping; pages reconnect later)."""
        for chat in self._chats.values():
            for page in list(chat.pages):
                chat.pages.discard(page)
                with contextlib.suppress(asyncio.QueueFull):
                    page.put_nowait({"kind": "reconnect"})

    def message(self, visitor_id: str, message_id: str) -> Update | None:
        """A kept message of the visitor's, if it is still kept."""
        chat = self._chats.get(visitor_id)
        return None if chat is None else chat.messages.get(message_id)


def _buttons(buttons: Sequence[Button]) -> list[dict[str, str]]:
    return [{"label": button.label, "data": button.data} for button in buttons]


class WebPort:
    """`ChatPort` for web visitors (platform "web")."""

    def __init__(self, conversations: Conversations) -> None:
        self.conversations = conversations

    @property
    def platform(self) -> str:
        return PLATFORM

    @property
    def message_limit(self) -> int:
        return MESSAGE_LIMIT

    @property
    def typing_interval_s(self) -> float:
        return TYPING_INTERVAL_S

    @property
    def answers_admin_commands_privately(self) -> bool:
        return True  # a visitor's chat is theirs alone

    @property
    def overall_call_limit(self) -> CallLimit:
        return UNLIMITED  # the page is served by the bot itself: no platform throttles it

    def call_limit(self, where: Place) -> CallLimit:
        return UNLIMITED

    def text_length(self, text: str) -> int:
        return len(text)

    def say_as_visitor(self, visitor_id: str, text: str, *, photo: bool) -> str:
        """Show what the visitor asked in their chat; returns the message's id. Only the
        first `MAX_QUESTION_LENGTH` characters are kept: the dialog refuses a longer question
        anyway, and a visitor's chat should not hold more than the bot would read."""
        message_id = new_message_id()
        shown = text[:MAX_QUESTION_LENGTH]
        message = {"kind": "message", "id": message_id, "author": "visitor", "text": shown}
        self.conversations.publish(visitor_id, message | {"photo": photo})
        return message_id

    async def send(
        self,
        where: Place,
        text: str,
        *,
        reply_to: str | None = None,
        buttons: Sequence[Button] = (),
    ) -> str:
        message_id = new_message_id()
        message = {
            "kind": "message",
            "id": message_id,
            "author": "bot",
            "text": text,
            "reply_to": reply_to,
            "buttons": _buttons(buttons),
        }
        self.conversations.publish(where.chat_id, message)
        return message_id

    async def edit(
        self, where: Place, message_id: str, text: str, *, buttons: Sequence[Button] = ()
    ) -> None:
        message = self.conversations.message(where.chat_id, message_id)
        if message is None:
            raise MessageGone(message_id)
        self.conversations.publish(
            where.chat_id, message | {"text": text, "buttons": _buttons(buttons)}
        )

    async def set_buttons(self, where: Place, message_id: str, buttons: Sequence[Button]) -> None:
        message = self.conversations.message(where.chat_id, message_id)
        if message is not None:
            self.conversations.publish(where.chat_id, message | {"buttons": _buttons(buttons)})

    async def typing(self, where: Place) -> None:
        self.conversations.publish(where.chat_id, {"kind": "typing"})

    async def acknowledge(self, press: ButtonPress, text: str) -> None:
        self.conversations.publish(press.where.chat_id, {"kind": "notice", "text": text})

    async def ask_for_correction(
        self, press: ButtonPress, exchange_id: int, prompt: str
    ) -> str | None:
        # The page opens a form under the answer; what is typed comes as CorrectionSubmitted.
        update = {
            "kind": "correction",
            "exchange_id": exchange_id,
            "message_id": press.message_id,
            "prompt": prompt,
        }
        self.conversations.publish(press.where.chat_id, update)
        return None
