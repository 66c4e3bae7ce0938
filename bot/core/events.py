"""What chat adapters hand to the dialog: plain, platform-neutral descriptions of what a user did.

Adapters translate a platform update into one of these and call `Dialog.handle`. Ids are
the platform's own (as text); core never looks inside them beyond comparing them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Person:
    """Who did something: a user of one platform."""

    platform: str  # "telegram", "discord"
    user_id: str
    display_name: str | None = None
    language: str | None = None  # the platform's language code (e.g. "zh-hans", "en-US")
    # A chat speaking as itself (Telegram's anonymous group admins, posts as a channel): whoever
    # is behind it, there is no one person to confirm /forget.
    is_chat: bool = False


@dataclass(frozen=True, slots=True)
class Place:
    """Where it happened: a chat, channel or DM.

    ``context`` is the adapter's own, opaque to core, handed back with every reply to this
    place (e.g. a Discord interaction to answer through).
    """

    chat_id: str
    private: bool
    context: object = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class PhotoFile:
    """A photo the user sent, not yet downloaded.

    ``size`` is what the platform declared (None when unknown); ``fetch`` downloads it,
    so a file over the size limit is refused before a byte of it is fetched.
    """

    fetch: Callable[[], Awaitable[bytes]]
    size: int | None = None
    filename: str | None = None
    content_type: str | None = None


@dataclass(frozen=True, slots=True)
class PhotoQuestion:
    """A photo, with the question asked about it (the caption; None for none).

    ``addressed`` is whether the message mentions the bot or replies to it; in a group the
    bot answers only then. ``message_id`` is the platform's id of the user's message.
    """

    who: Person
    where: Place
    message_id: str
    photo: PhotoFile
    question: str | None = None
    addressed: bool = False
    reply_to: str | None = None  # the message it replies to, if any


@dataclass(frozen=True, slots=True)
class NotAPhoto:
    """A file that was sent for the bot to look at, but is not something it can use."""

    who: Person
    where: Place
    message_id: str
    reason: str  # e.g. "the file is a PDF document, not a photo"
    addressed: bool = False


@dataclass(frozen=True, slots=True)
class TextMessage:
    """Text with no photo: a follow-up question, a correction, or just chatter."""

    who: Person
    where: Place
    message_id: str
    text: str
    addressed: bool = False
    reply_to: str | None = None  # the message it replies to, if any


@dataclass(frozen=True, slots=True)
class ButtonPress:
    """A press on one of the bot's buttons; ``data`` is what the button was created with.

    ``message_id`` is the message carrying the button. The adapter must be given an answer
    (`ChatPort.acknowledge`) for every press.
    """

    who: Person
    where: Place
    message_id: str
    data: str
    press_id: str = ""


@dataclass(frozen=True, slots=True)
class CorrectionSubmitted:
    """A correction typed into a form bound to an answer (Discord's modal)."""

    who: Person
    where: Place
    exchange_id: int
    text: str
    press_id: str = ""


@dataclass(frozen=True, slots=True)
class Command:
    """A command: ``name`` without the slash (``start``, ``help``, ``cancel``, ``forget``...)."""

    who: Person
    where: Place
    name: str
    argument: str = ""
    message_id: str | None = None


Event = PhotoQuestion | NotAPhoto | TextMessage | ButtonPress | CorrectionSubmitted | Command
