"""What a chat adapter offers the dialog: send, edit, buttons, typing, acknowledgements.

An adapter implements `ChatPort` over its platform library. Core calls it with the `Place`
an event came from, and never sees a platform object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from bot.core.events import ButtonPress, Place
from bot.core.limits import CallLimit


@dataclass(frozen=True, slots=True)
class Button:
    """A button under a message. ``data`` comes back in `ButtonPress.data` when pressed;
    it is short enough for every platform (see `bot.core.buttons`)."""

    label: str
    data: str


class MessageGone(Exception):
    """The message to edit no longer exists (a user or moderator deleted it)."""


class DeliveryUnknown(Exception):
    """A message was sent, and no answer came back (a read timeout, or the connection closed,
    after the request went out): it is probably in the chat, but its id is unknown. Ports do
    not send it again, as the platforms have no way to tell a second copy from a new
    message."""


class ChatPort(Protocol):
    """A chat platform, as the dialog uses it."""

    @property
    def platform(self) -> str:
        """The platform's name, as stored with users and exchanges ("telegram", "discord")."""
        ...

    @property
    def message_limit(self) -> int:
        """The longest message text, measured by `text_length`."""
        ...

    @property
    def typing_interval_s(self) -> float:
        """How often the typing indicator must be renewed to stay visible."""
        ...

    @property
    def answers_admin_commands_privately(self) -> bool:
        """Whether the reply to an admin command in a group is seen by the admin alone
        (Discord's ephemeral replies); where not, admin commands are for private chats."""
        ...

    @property
    def overall_call_limit(self) -> CallLimit:
        """How many calls the bot may make to the platform in all (`bot.core.budget`)."""
        ...

    def call_limit(self, where: Place) -> CallLimit:
        """How many calls the bot may make to one chat (typing and edits count too)."""
        ...

    def text_length(self, text: str) -> int:
        """The length of ``text`` as the platform counts it against `message_limit`."""
        ...

    async def send(
        self,
        where: Place,
        text: str,
        *,
        reply_to: str | None = None,
        buttons: Sequence[Button] = (),
    ) -> str:
        """Send plain text (never interpreted as markup); returns the new message's id.

        Raises `DeliveryUnknown` when the platform may have taken the message without the
        port learning its id (a send that surely did not arrive is retried by the port)."""
        ...

    async def edit(
        self, where: Place, message_id: str, text: str, *, buttons: Sequence[Button] = ()
    ) -> None:
        """Replace a message's text and buttons; raises `MessageGone` if it was deleted."""
        ...

    async def set_buttons(self, where: Place, message_id: str, buttons: Sequence[Button]) -> None:
        """Replace only a message's buttons."""
        ...

    async def typing(self, where: Place) -> None:
        """Show that the bot is typing."""
        ...

    async def acknowledge(self, press: ButtonPress, text: str) -> None:
        """Answer a button press with a short notice only the presser sees."""
        ...

    async def ask_for_correction(
        self, press: ButtonPress, exchange_id: int, prompt: str
    ) -> str | None:
        """Ask the presser what the dish actually is; this also acknowledges the press.

        Returns the id of a prompt message the user is to reply to (the reply then arrives
        as a `TextMessage` with ``reply_to`` set to it), or None when the platform collects
        the text in a form of its own, which arrives as `CorrectionSubmitted`.
        """
        ...
