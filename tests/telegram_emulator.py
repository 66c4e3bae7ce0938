"""A Telegram Bot API emulator for tests: the real wire format over a real socket.

It listens on 127.0.0.1 on a random port and answers ``/bot<token>/<method>`` the way
api.telegram.org does, so the real python-telegram-bot ``Application`` can run against it:

    async with TelegramEmulator() as telegram:
        app = (
            Application.builder()
            .token(telegram.token)
            .base_url(telegram.base_url)
            .base_file_url(telegram.base_file_url)
            .build()
        )
        ...
        ada = User(42, "Ada")
        telegram.send_text(ada, ada.private_chat, "hello")
        reply = await telegram.wait_for("sendMessage")

The test plays the platform side (users send texts, photos and documents, press buttons) and
reads what the bot did: every call is recorded with its decoded parameters (``calls``,
``wait_for``), and ``messages_in`` shows the bot's messages as a user sees them now, after
edits and deletions. ``fail_next`` scripts flood-control and other errors (5xx too),
``hang_next`` a call held past the client's timeout (taken or not), ``reset_next`` a
connection closed without an answer.

What it checks, like Telegram does, so that adapter bugs show up in tests: unknown chats,
empty or over-long texts and captions, MarkdownV2 / HTML that Telegram would refuse to parse,
callback data over 64 bytes, edits that change nothing ("message is not modified"), replies
to messages that do not exist, files over the 20 MB download limit, webhook secret tokens with
characters Telegram does not allow, and unanswerable or twice-answered callback queries.
Message ids count per chat, as in Telegram.

What users do that bots must not trust is here too: editing a message they sent
(``edit_user_message``), writing as an anonymous group admin or as a channel (``sender_chat``,
with the placeholder users ``GROUP_ANONYMOUS_BOT`` and ``CHANNEL_BOT`` as ``from``), and
callback data a modified client made up (``forge_button_press``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from types import TracebackType
from typing import Any, NoReturn

from aiohttp import web

ApiObject = dict[str, Any]

DEFAULT_TOKEN = "123456789:TEST-dishbot-emulator-token"
DEFAULT_BOT_USERNAME = "dishbot_test_bot"
BOT_USER_ID = 123456789

# Telegram's own limits, enforced so an adapter that ignores them fails in tests.
MESSAGE_TEXT_LIMIT = 4096  # UTF-16 code units of the text after markup is parsed
CAPTION_LIMIT = 1024
CALLBACK_DATA_LIMIT_BYTES = 64
DOWNLOAD_LIMIT_BYTES = 20 * 1024 * 1024  # getFile refuses bigger files for bots
UPLOAD_LIMIT_BYTES = 50 * 1024 * 1024
GET_UPDATES_LIMIT = 100
WEBHOOK_SECRET_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")  # what setWebhook accepts
WAIT_FOR_TIMEOUT_S = 10.0

# Parameters whose values are plain strings on the wire. PTB sends strings as they are and
# everything else JSON-encoded, so without this list a text like "42" would decode to 42.
_STRING_PARAMS = frozenset(
    {
        "action",
        "animation",
        "audio",
        "business_connection_id",
        "callback_query_id",
        "caption",
        "description",
        "document",
        "emoji",
        "file_id",
        "inline_message_id",
        "ip_address",
        "language_code",
        "message_effect_id",
        "name",
        "parse_mode",
        "photo",
        "secret_token",
        "short_description",
        "sticker",
        "text",
        "title",
        "url",
        "video",
        "voice",
    }
)
_CHAT_ACTIONS = frozenset(
    {
        "typing",
        "upload_photo",
        "record_video",
        "upload_video",
        "record_voice",
        "upload_voice",
        "upload_document",
        "choose_sticker",
        "find_location",
        "record_video_note",
        "upload_video_note",
    }
)
_COMMAND_NAME = re.compile(r"[a-z0-9_]{1,32}")
# Telegram marks @usernames (5 to 32 characters) and /commands at a word start.
_MENTION = re.compile(r"(?<![\w@])@[A-Za-z][A-Za-z0-9_]{4,31}(?![\w])")
_BOT_COMMAND = re.compile(r"(?<![\w/])/[A-Za-z0-9_]{1,32}(?:@[A-Za-z][A-Za-z0-9_]{4,31})?(?![\w])")
_NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup "
    "are exactly the same as a current content and reply markup of the message"
)


def utf16_length(text: str) -> int:
    """The length of ``text`` as the Bot API counts it: in UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def detect_entities(text: str) -> list[ApiObject]:
    """The ``mention`` and ``bot_command`` entities Telegram would attach to ``text``."""
    found = [("mention", match) for match in _MENTION.finditer(text)]
    found += [("bot_command", match) for match in _BOT_COMMAND.finditer(text)]
    entities = [
        {
            "type": kind,
            "offset": utf16_length(text[: match.start()]),
            "length": utf16_length(match.group()),
        }
        for kind, match in found
    ]
    return sorted(entities, key=lambda entity: entity["offset"])


@dataclass(frozen=True)
class User:
    """A Telegram user the test plays."""

    id: int
    first_name: str = "Test"
    username: str | None = None
    language_code: str | None = "en"
    is_bot: bool = False

    @property
    def private_chat(self) -> Chat:
        """The user's private chat with the bot (its id is the user's id)."""
        return Chat(self.id, "private", first_name=self.first_name, username=self.username)

    def to_api(self) -> ApiObject:
        """The user as the Bot API writes it."""
        data: ApiObject = {"id": self.id, "is_bot": self.is_bot, "first_name": self.first_name}
        if self.username is not None:
            data["username"] = self.username
        if self.language_code is not None:
            data["language_code"] = self.language_code
        return data


# The placeholder users Telegram puts in ``from`` when a message is sent on behalf of a chat
# (its ``sender_chat``): an anonymous group admin, or a user writing as a channel.
GROUP_ANONYMOUS_BOT = User(
    1087968824, "Group", username="GroupAnonymousBot", language_code=None, is_bot=True
)
CHANNEL_BOT = User(136817688, "Channel", username="Channel_Bot", language_code=None, is_bot=True)


@dataclass(frozen=True)
class Chat:
    """A chat: private (id == user id) or a group (negative id, with a title)."""

    id: int
    type: str = "private"
    title: str | None = None
    first_name: str | None = None
    username: str | None = None

    @classmethod
    def group(cls, chat_id: int, title: str, chat_type: str = "supergroup") -> Chat:
        """A group chat; ``chat_type`` is "group" or "supergroup"."""
        if chat_id >= 0:
            raise ValueError("group chat ids are negative in the Bot API")
        return cls(chat_id, chat_type, title=title)

    @classmethod
    def channel(cls, chat_id: int, title: str) -> Chat:
        """A channel (negative id, with a title)."""
        if chat_id >= 0:
            raise ValueError("channel ids are negative in the Bot API")
        return cls(chat_id, "channel", title=title)

    def to_api(self) -> ApiObject:
        """The chat as the Bot API writes it."""
        data: ApiObject = {"id": self.id, "type": self.type}
        for name in ("title", "first_name", "username"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return data


@dataclass(frozen=True)
class UploadedFile:
    """A file the bot uploaded in a multipart request."""

    field: str
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class Call:
    """One Bot API call the bot made, with its decoded parameters and the emulator's answer."""

    method: str
    params: dict[str, Any]
    at: float  # time.monotonic() when the request arrived
    files: dict[str, UploadedFile] = field(default_factory=dict)
    ok: bool = True
    result: Any = None
    error_code: int | None = None
    description: str | None = None
    recorded: bool = field(default=False, repr=False)


@dataclass(frozen=True)
class _StoredFile:
    file_id: str
    file_unique_id: str
    file_path: str
    data: bytes
    file_size: int


@dataclass
class _ScriptedFailure:
    error_code: int
    description: str
    retry_after: int | None
    times: int
    hang_s: float = 0.0  # held this long, then answered (the client has given up by then)
    processed: bool = False  # a held call takes effect before it hangs
    reset: bool = False  # the connection is closed without an answer


class ApiError(Exception):
    """An error answer, ``{"ok": false, ...}``, with the HTTP status equal to the error code."""

    def __init__(self, error_code: int, description: str, retry_after: int | None = None):
        super().__init__(description)
        self.error_code = error_code
        self.description = description
        self.retry_after = retry_after

    def to_response(self) -> web.Response:
        """The HTTP answer Telegram gives; PTB maps its status code to an exception type."""
        body: ApiObject = {
            "ok": False,
            "error_code": self.error_code,
            "description": self.description,
        }
        if self.retry_after is not None:
            body["parameters"] = {"retry_after": self.retry_after}
        return web.json_response(body, status=self.error_code)


def _hang_up(request: web.Request, description: str) -> NoReturn:
    """Close the client's connection without an answer."""
    if request.transport is not None:
        request.transport.abort()
    raise ApiError(0, description)


def _bad_request(reason: str) -> ApiError:
    return ApiError(400, f"Bad Request: {reason}")


Handler = Callable[[dict[str, Any], dict[str, UploadedFile]], Any]


class TelegramEmulator:
    """A scriptable Bot API server on 127.0.0.1; use it as an async context manager."""

    def __init__(
        self, token: str = DEFAULT_TOKEN, bot_username: str = DEFAULT_BOT_USERNAME
    ) -> None:
        self.token = token
        self.bot_user: ApiObject = {
            "id": BOT_USER_ID,
            "is_bot": True,
            "first_name": "dishbot test",
            "username": bot_username,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }
        self._calls: list[Call] = []
        self._changed = asyncio.Condition()
        self._stopping = False
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._update_ids = itertools.count(100_000)
        self._updates: deque[ApiObject] = deque()
        self._poll_generation = 0
        self._chats: dict[int, ApiObject] = {}
        self._messages: dict[int, dict[int, ApiObject]] = {}
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._files: dict[str, _StoredFile] = {}
        self._files_by_path: dict[str, _StoredFile] = {}
        self._file_counter = itertools.count(1)
        self._callback_ids = itertools.count(7_000_000_000_000_000_000)
        self._open_callback_queries: set[str] = set()
        self._commands: dict[str, list[ApiObject]] = {}
        self._webhook_url = ""
        self._webhook_secret: str | None = None
        self._failures: dict[str, deque[_ScriptedFailure]] = {}
        self._waiting_polls = 0
        self._notifications: set[asyncio.Task[None]] = set()
        self._handlers: dict[str, Handler] = {
            "getme": self._get_me,
            "deletewebhook": self._delete_webhook,
            "setwebhook": self._set_webhook,
            "getwebhookinfo": self._get_webhook_info,
            "setmycommands": self._set_my_commands,
            "getmycommands": self._get_my_commands,
            "deletemycommands": self._delete_my_commands,
            "sendmessage": self._send_message,
            "sendphoto": self._send_photo,
            "senddocument": self._send_document,
            "editmessagetext": self._edit_message_text,
            "editmessagecaption": self._edit_message_caption,
            "editmessagereplymarkup": self._edit_message_reply_markup,
            "deletemessage": self._delete_message,
            "sendchataction": self._send_chat_action,
            "answercallbackquery": self._answer_callback_query,
            "getfile": self._get_file,
        }

    # ----------------------------------------------------------------- addresses

    @property
    def base_url(self) -> str:
        """For ``ApplicationBuilder().base_url``: PTB appends the token, then ``/<method>``."""
        return f"http://127.0.0.1:{self._port}/bot"

    @property
    def base_file_url(self) -> str:
        """For ``ApplicationBuilder().base_file_url``: files live at ``<this><token>/<path>``."""
        return f"http://127.0.0.1:{self._port}/file/bot"

    def file_url(self, file_id: str) -> str:
        """The full download URL of a registered file, as PTB builds it after getFile."""
        return f"{self.base_file_url}{self.token}/{self._files[file_id].file_path}"

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Listen on a random free port of 127.0.0.1."""
        app = web.Application(client_max_size=UPLOAD_LIMIT_BYTES + 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._serve_method)
        app.router.add_get("/file/bot{token}/{file_path:.+}", self._serve_file)
        # handler_cancellation: a long poll the client abandoned (PTB cancels it on stop)
        # ends at once instead of lingering until its timeout.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Answer pending long polls with no updates, then stop listening."""
        async with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> TelegramEmulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # ----------------------------------------------------------------- the platform side

    def add_file(self, data: bytes, *, file_size: int | None = None, suffix: str = "jpg") -> str:
        """Store a file users can send; returns its file_id.

        ``file_size`` overrides the size Telegram reports (to test the 20 MB limit without
        allocating 20 MB); downloads still serve ``data``.
        """
        number = next(self._file_counter)
        stored = _StoredFile(
            file_id=f"BQACAgIAAxkBAAI{number:06d}emulated",
            file_unique_id=f"AgAD{number:06d}",
            file_path=f"files/file_{number}.{suffix}",
            data=data,
            file_size=len(data) if file_size is None else file_size,
        )
        self._files[stored.file_id] = stored
        self._files_by_path[stored.file_path] = stored
        return stored.file_id

    def add_chat(self, chat: Chat) -> None:
        """Make a chat known without a message from it (Telegram answers "chat not found"
        for chats the bot has never seen)."""
        self._chats[chat.id] = chat.to_api()

    def file_data(self, file_id: str) -> bytes:
        """The bytes of a stored file (one a test added or one the bot uploaded)."""
        return self._files[file_id].data

    def push_update(self, update: Mapping[str, Any]) -> ApiObject:
        """Queue a raw update for getUpdates; an ``update_id`` is assigned if missing."""
        queued = dict(update)
        queued.setdefault("update_id", next(self._update_ids))
        self._updates.append(queued)
        self._notify()
        return queued

    def send_text(
        self,
        user: User,
        chat: Chat,
        text: str,
        reply_to_message_id: int | None = None,
        entities: Sequence[Mapping[str, Any]] | None = None,
        sender_chat: Chat | None = None,
    ) -> ApiObject:
        """A user sends a text message; mentions and /commands get their entities.

        ``sender_chat`` sends it on behalf of a chat: ``user`` is then the placeholder
        Telegram shows (``GROUP_ANONYMOUS_BOT`` for the group itself, ``CHANNEL_BOT`` for a
        channel).
        """
        if not text.strip() or utf16_length(text) > MESSAGE_TEXT_LIMIT:
            raise ValueError("Telegram clients send texts of 1-4096 characters")
        message = self._user_message(user, chat, reply_to_message_id, sender_chat)
        message["text"] = text
        found = detect_entities(text) if entities is None else [dict(e) for e in entities]
        if found:
            message["entities"] = found
        return self._deliver_message(message)

    def send_photo_message(
        self,
        user: User,
        chat: Chat,
        photo: str | Sequence[str],
        caption: str | None = None,
        reply_to: int | Mapping[str, Any] | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
        sender_chat: Chat | None = None,
    ) -> ApiObject:
        """A user sends a photo; ``photo`` is one file_id or several, smallest first.

        ``sizes`` gives each file's (width, height); by default they grow with the index.
        ``sender_chat`` is as for `send_text`.
        """
        file_ids = [photo] if isinstance(photo, str) else list(photo)
        dimensions = list(sizes) if sizes is not None else _default_sizes(len(file_ids))
        message = self._user_message(user, chat, _message_id_of(reply_to), sender_chat)
        message["photo"] = [
            {
                "file_id": self._files[file_id].file_id,
                "file_unique_id": self._files[file_id].file_unique_id,
                "file_size": self._files[file_id].file_size,
                "width": width,
                "height": height,
            }
            for file_id, (width, height) in zip(file_ids, dimensions, strict=True)
        ]
        self._add_caption(message, caption)
        return self._deliver_message(message)

    def send_document(
        self,
        user: User,
        chat: Chat,
        file_id: str,
        file_name: str = "dish.jpg",
        mime_type: str = "image/jpeg",
        caption: str | None = None,
        reply_to: int | Mapping[str, Any] | None = None,
        sender_chat: Chat | None = None,
    ) -> ApiObject:
        """A user sends a file as a document (for example an uncompressed photo);
        ``sender_chat`` is as for `send_text`."""
        stored = self._files[file_id]
        message = self._user_message(user, chat, _message_id_of(reply_to), sender_chat)
        message["document"] = {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_name": file_name,
            "mime_type": mime_type,
            "file_size": stored.file_size,
        }
        self._add_caption(message, caption)
        return self._deliver_message(message)

    def press_button(self, user: User, message: Mapping[str, Any], data: str) -> str:
        """A user presses the inline button carrying ``data`` on a message the bot sent.

        The button must be on the message as it is now (after edits); returns the
        callback_query id the bot is expected to answer.
        """
        chat_id = message["chat"]["id"]
        current = self._messages.get(chat_id, {}).get(message["message_id"])
        if current is None or current["from"]["id"] != BOT_USER_ID:
            raise ValueError("users can press buttons only on messages the bot sent")
        if data not in _callback_data_of(current.get("reply_markup")):
            raise ValueError(f"message {current['message_id']} has no button with data {data!r}")
        return self._push_callback_query(user, current, data)

    def _push_callback_query(self, user: User, message: ApiObject, data: str) -> str:
        query_id = str(next(self._callback_ids))
        self._open_callback_queries.add(query_id)
        self.push_update(
            {
                "callback_query": {
                    "id": query_id,
                    "from": user.to_api(),
                    "message": copy.deepcopy(message),
                    "chat_instance": str(abs(message["chat"]["id"]) * 7 + 1),
                    "data": data,
                }
            }
        )
        return query_id

    def forge_button_press(self, user: User, message: Mapping[str, Any], data: str) -> str:
        """A modified client sends a callback query with ``data`` made up, for a message the
        bot sent: Telegram passes such data on without checking it against the buttons.

        Returns the callback_query id the bot is expected to answer.
        """
        chat_id = message["chat"]["id"]
        current = self._messages.get(chat_id, {}).get(message["message_id"])
        if current is None or current["from"]["id"] != BOT_USER_ID:
            raise ValueError("callback queries name a message the bot sent")
        if not data or len(data.encode()) > CALLBACK_DATA_LIMIT_BYTES:
            raise ValueError("Telegram carries 1-64 bytes of callback data")
        return self._push_callback_query(user, current, data)

    def edit_user_message(
        self, chat: Chat, message_id: int, *, text: str | None = None, caption: str | None = None
    ) -> ApiObject:
        """The user edits a message they sent: its new text or caption arrives as an
        ``edited_message`` update (``edited_channel_post`` in a channel) with ``edit_date``."""
        message = self._messages.get(chat.id, {}).get(message_id)
        if message is None or message["from"]["id"] == BOT_USER_ID:
            raise ValueError("users can edit only messages they sent")
        if text is not None:
            if "text" not in message:
                raise ValueError("only a text message has a text to edit")
            message["text"] = text
            message.pop("entities", None)
            if found := detect_entities(text):
                message["entities"] = found
        if caption is not None:
            message.pop("caption_entities", None)
            self._add_caption(message, caption)
        message["edit_date"] = int(time.time())
        kind = "edited_channel_post" if chat.type == "channel" else "edited_message"
        return self.push_update({kind: copy.deepcopy(message)})

    def fail_next(
        self,
        method: str,
        error_code: int = 429,
        retry_after: int = 1,
        times: int = 1,
        description: str | None = None,
    ) -> None:
        """Answer the next ``times`` calls of ``method`` with an error instead (the call does
        not take effect).

        A 429 carries ``parameters.retry_after`` (what AIORateLimiter waits for); other codes
        carry only ``description`` (for example a 400 "Bad Request: ...").
        """
        if description is None:
            description = (
                f"Too Many Requests: retry after {retry_after}"
                if error_code == 429
                else "Bad Gateway"
                if error_code >= 500
                else "Bad Request: scripted failure"
            )
        failure = _ScriptedFailure(
            error_code, description, retry_after if error_code == 429 else None, times
        )
        self._failures.setdefault(method.lower(), deque()).append(failure)

    def hang_next(
        self, method: str, seconds: float, *, processed: bool = False, times: int = 1
    ) -> None:
        """Hold the next ``times`` calls of ``method`` for ``seconds`` before answering (set it
        past the client's read timeout). With ``processed`` the call takes effect first (the
        message is sent; only the answer to the bot is late), as when Telegram is slow;
        without, it never does, as when Telegram's front end is stuck."""
        failure = _ScriptedFailure(0, "", None, times, hang_s=seconds, processed=processed)
        self._failures.setdefault(method.lower(), deque()).append(failure)

    def reset_next(self, method: str, times: int = 1, *, processed: bool = False) -> None:
        """Close the connection of the next ``times`` calls of ``method`` without an answer,
        before the call takes effect; with ``processed``, after it did (the message is sent,
        as when a proxy drops the connection while Telegram answers)."""
        failure = _ScriptedFailure(0, "", None, times, processed=processed, reset=True)
        self._failures.setdefault(method.lower(), deque()).append(failure)

    # ----------------------------------------------------------------- what the bot did

    def calls(self, method: str | None = None) -> list[Call]:
        """Every recorded call, or those of one method, in arrival order."""
        if method is None:
            return list(self._calls)
        return [call for call in self._calls if call.method.lower() == method.lower()]

    async def wait_for(
        self,
        method: str,
        predicate: Callable[[Call], bool] | None = None,
        # A guard against a hung test, not a measurement; named as callers expect.
        timeout: float = WAIT_FOR_TIMEOUT_S,  # noqa: ASYNC109
    ) -> Call:
        """The first call of ``method`` matching ``predicate``, waiting until one arrives.

        Calls already recorded count, so a test cannot miss a call that beat it here.
        """
        return (await self.wait_for_calls(method, 1, predicate, timeout))[0]

    async def wait_for_calls(
        self,
        method: str,
        count: int,
        predicate: Callable[[Call], bool] | None = None,
        timeout: float = WAIT_FOR_TIMEOUT_S,  # noqa: ASYNC109
    ) -> list[Call]:
        """The first ``count`` calls of ``method`` matching ``predicate``, waiting for them."""

        def matching() -> list[Call]:
            return [call for call in self.calls(method) if predicate is None or predicate(call)]

        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: len(matching()) >= count), timeout
                )
            except TimeoutError:
                seen = ", ".join(call.method for call in self._calls[-20:])
                raise TimeoutError(
                    f"{count} matching {method} call(s) did not arrive within {timeout}s "
                    f"(got {len(matching())}; last calls: {seen})"
                ) from None
        return matching()[:count]

    def messages_in(self, chat_id: int) -> list[ApiObject]:
        """The bot's messages in a chat as the user sees them now (edited, not deleted)."""
        messages = self._messages.get(chat_id, {}).values()
        return [copy.deepcopy(m) for m in messages if m["from"]["id"] == BOT_USER_ID]

    def message(self, chat_id: int, message_id: int) -> ApiObject:
        """Any stored message (the bot's or a user's) in its current state."""
        return copy.deepcopy(self._messages[chat_id][message_id])

    async def wait_for_long_poll(
        self,
        timeout: float = WAIT_FOR_TIMEOUT_S,  # noqa: ASYNC109
    ) -> None:
        """Wait until a getUpdates request is held open, waiting for updates."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self._waiting_polls > 0), timeout)

    @property
    def pending_updates(self) -> int:
        """Updates queued and not yet acknowledged by a getUpdates offset."""
        return len(self._updates)

    @property
    def webhook_secret(self) -> str | None:
        """The secret_token of the last setWebhook (None when it set none)."""
        return self._webhook_secret

    def commands(self, scope_type: str = "default", language_code: str = "") -> list[ApiObject]:
        """The commands set with setMyCommands for a scope type and language."""
        return list(self._commands.get(f"{scope_type}:{language_code}", []))

    # ----------------------------------------------------------------- HTTP

    async def _serve_method(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        method = request.match_info["method"]
        params, files = await _read_parameters(request)
        call = Call(method, params, arrived, files)
        # A long poll is recorded when it arrives (its offset acknowledges updates at once);
        # every other call once answered, so the emulator's state already shows its effect.
        long_poll = method.lower() == "getupdates"
        if long_poll:
            self._record(call)
        try:
            result = await self._answer(call, request.match_info["token"], request)
        except ApiError as error:
            call.ok, call.error_code, call.description = False, error.error_code, error.description
            response = error.to_response()
        except asyncio.CancelledError:
            # The client hung up (PTB abandons its long poll on stop, a read timeout gives up
            # on a held call); still a call it made, and one held after it took effect counts.
            if call.result is None:
                call.ok, call.description = False, "the client went away before the answer"
            raise
        else:
            call.result = result
            response = web.json_response({"ok": True, "result": result})
        finally:
            if not long_poll:
                self._record(call)
        return response

    async def _answer(self, call: Call, token: str, request: web.Request) -> Any:
        if token != self.token:
            raise ApiError(401, "Unauthorized")
        failure = self._scripted_failure(call.method)
        if failure is not None and failure.reset and not failure.processed:
            _hang_up(request, "the connection was closed without an answer")
        if failure is not None and failure.hang_s and not failure.processed:
            await asyncio.sleep(failure.hang_s)
            raise ApiError(504, "Gateway Timeout")
        if failure is not None and not failure.hang_s and not failure.reset:
            raise ApiError(failure.error_code, failure.description, failure.retry_after)
        if call.method.lower() == "getupdates":
            return await self._get_updates(call.params)
        handler = self._handlers.get(call.method.lower())
        if handler is None:
            raise ApiError(404, "Not Found: method not found")
        result = handler(call.params, call.files)
        if failure is not None and failure.reset:  # processed, and now no answer comes
            call.result = result
            _hang_up(request, "the call took effect, then the connection was closed")
        if failure is not None:  # processed, and now the answer is late
            call.result, call.description = result, "answered after the client's timeout"
            self._record(call)
            await asyncio.sleep(failure.hang_s)
        return result

    async def _serve_file(self, request: web.Request) -> web.StreamResponse:
        stored = self._files_by_path.get(request.match_info["file_path"])
        if request.match_info["token"] != self.token or stored is None:
            return web.json_response(
                {"ok": False, "error_code": 404, "description": "Not Found"}, status=404
            )
        return web.Response(body=stored.data, content_type="application/octet-stream")

    def _record(self, call: Call) -> None:
        if call.recorded:
            return
        call.recorded = True
        self._calls.append(call)
        self._notify()

    def _notify(self) -> None:
        # Scripting methods are synchronous; wake the waiters from a task on the loop.
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        task = asyncio.get_running_loop().create_task(notify())
        # Hold a reference so the task is not garbage-collected before it runs.
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    def _scripted_failure(self, method: str) -> _ScriptedFailure | None:
        queue = self._failures.get(method.lower())
        if not queue:
            return None
        failure = queue[0]
        failure.times -= 1
        if failure.times <= 0:
            queue.popleft()
        return failure

    # ----------------------------------------------------------------- updates

    async def _get_updates(self, params: Mapping[str, Any]) -> list[ApiObject]:
        self._acknowledge(params.get("offset"))
        limit = min(int(params.get("limit") or GET_UPDATES_LIMIT), GET_UPDATES_LIMIT)
        timeout = float(params.get("timeout") or 0)
        # Like Telegram, a newer getUpdates ends an older one still waiting with a 409.
        self._poll_generation += 1
        generation = self._poll_generation
        self._waiting_polls += 1
        try:
            async with self._changed:
                self._changed.notify_all()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._changed.wait_for(
                            lambda: (
                                bool(self._updates)
                                or self._stopping
                                or generation != self._poll_generation
                            )
                        ),
                        timeout,
                    )
        finally:
            self._waiting_polls -= 1
        if generation != self._poll_generation:
            raise ApiError(
                409,
                "Conflict: terminated by other getUpdates request; make sure that only one "
                "bot instance is running",
            )
        return [copy.deepcopy(update) for update in itertools.islice(self._updates, limit)]

    def _acknowledge(self, offset: int | None) -> None:
        if offset is None:
            return
        if offset < 0:
            # A negative offset keeps only the last -offset updates.
            while len(self._updates) > -offset:
                self._updates.popleft()
            return
        while self._updates and self._updates[0]["update_id"] < offset:
            self._updates.popleft()

    # ----------------------------------------------------------------- messages

    def _user_message(
        self,
        user: User,
        chat: Chat,
        reply_to_message_id: int | None,
        sender_chat: Chat | None = None,
    ) -> ApiObject:
        self._chats[chat.id] = chat.to_api()
        message: ApiObject = {
            "message_id": self._next_message_id(chat.id),
            "from": user.to_api(),
            "chat": chat.to_api(),
            "date": int(time.time()),
        }
        if sender_chat is not None:
            message["sender_chat"] = sender_chat.to_api()
        if reply_to_message_id is not None:
            message["reply_to_message"] = self._replied(chat.id, reply_to_message_id)
        return message

    def _add_caption(self, message: ApiObject, caption: str | None) -> None:
        if caption is None:
            return
        if utf16_length(caption) > CAPTION_LIMIT:
            raise ValueError("Telegram clients send captions of at most 1024 characters")
        message["caption"] = caption
        entities = detect_entities(caption)
        if entities:
            message["caption_entities"] = entities

    def _deliver_message(self, message: ApiObject) -> ApiObject:
        self._store(message)
        return self.push_update({"message": copy.deepcopy(message)})

    def _store(self, message: ApiObject) -> None:
        self._messages.setdefault(message["chat"]["id"], {})[message["message_id"]] = message

    def _next_message_id(self, chat_id: int) -> int:
        return next(self._message_ids.setdefault(chat_id, itertools.count(1)))

    def _replied(self, chat_id: int, message_id: int) -> ApiObject:
        replied = self._messages.get(chat_id, {}).get(message_id)
        if replied is None:
            raise _bad_request("message to be replied not found")
        # Telegram nests one level only.
        return {key: value for key, value in replied.items() if key != "reply_to_message"}

    def _chat(self, params: Mapping[str, Any]) -> ApiObject:
        chat_id = params.get("chat_id")
        if chat_id is None:
            raise _bad_request("chat_id is empty")
        chat = self._chats.get(chat_id) if isinstance(chat_id, int) else None
        if chat is None:
            raise _bad_request("chat not found")
        return chat

    def _bot_message(self, params: Mapping[str, Any]) -> ApiObject:
        if "inline_message_id" in params:
            raise _bad_request("the emulator does not support inline messages")
        chat = self._chat(params)
        message = self._messages.get(chat["id"], {}).get(int(params.get("message_id", 0)))
        if message is None:
            raise _bad_request("message to edit not found")
        if message["from"]["id"] != BOT_USER_ID:
            raise _bad_request("message can't be edited")
        return message

    def _new_bot_message(self, params: Mapping[str, Any]) -> ApiObject:
        chat = self._chat(params)
        message: ApiObject = {
            "message_id": 0,  # assigned once the request is known to be valid
            "from": dict(self.bot_user),
            "chat": dict(chat),
            "date": int(time.time()),
        }
        reply_to = _reply_target(params)
        if reply_to is not None:
            try:
                message["reply_to_message"] = self._replied(chat["id"], reply_to)
            except ApiError:
                if not _allows_missing_reply(params):
                    raise
        markup = params.get("reply_markup")
        if markup is not None:
            _check_reply_markup(markup)
            # Messages carry only inline keyboards; a force-reply or reply keyboard acts on
            # the user's client and is not part of the message Telegram returns.
            if "inline_keyboard" in markup:
                message["reply_markup"] = markup
        return message

    def _send_message(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> ApiObject:
        message = self._new_bot_message(params)
        text = _render(params.get("text", ""), params.get("parse_mode"))
        if not text.strip():
            raise _bad_request("message text is empty")
        if utf16_length(text) > MESSAGE_TEXT_LIMIT:
            raise _bad_request("message is too long")
        message["text"] = text
        if params.get("entities"):
            message["entities"] = params["entities"]
        return self._publish(message)

    def _send_photo(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> ApiObject:
        message = self._new_bot_message(params)
        stored = self._sent_file(params, files, "photo")
        message["photo"] = [
            {
                "file_id": stored.file_id,
                "file_unique_id": stored.file_unique_id,
                "file_size": stored.file_size,
                "width": 1280,
                "height": 960,
            }
        ]
        self._set_caption(message, params)
        return self._publish(message)

    def _send_document(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> ApiObject:
        message = self._new_bot_message(params)
        stored = self._sent_file(params, files, "document")
        upload = files.get("document")
        message["document"] = {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_name": (upload.filename if upload else None) or stored.file_path.split("/")[-1],
            "mime_type": (upload.content_type if upload else None) or "application/octet-stream",
            "file_size": stored.file_size,
        }
        self._set_caption(message, params)
        return self._publish(message)

    def _sent_file(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile], name: str
    ) -> _StoredFile:
        reference = params.get(name)
        upload = files.get(name)
        if upload is None and isinstance(reference, str) and reference.startswith("attach://"):
            upload = files.get(reference.removeprefix("attach://"))
        if upload is not None:
            if not upload.data:
                raise _bad_request("file must be non-empty")
            return self._files[self.add_file(upload.data)]
        if isinstance(reference, str) and reference in self._files:
            return self._files[reference]
        raise _bad_request(f"there is no {name} in the request")

    def _set_caption(self, message: ApiObject, params: Mapping[str, Any]) -> None:
        if "caption" not in params:
            return
        caption = _render(params["caption"], params.get("parse_mode"))
        if utf16_length(caption) > CAPTION_LIMIT:
            raise _bad_request("message caption is too long")
        message["caption"] = caption

    def _publish(self, message: ApiObject) -> ApiObject:
        message["message_id"] = self._next_message_id(message["chat"]["id"])
        self._store(message)
        return copy.deepcopy(message)

    def _edit_message_text(
        self, params: dict[str, Any], files: dict[str, UploadedFile]
    ) -> ApiObject:
        message = self._bot_message(params)
        if "text" not in message:
            raise _bad_request("there is no text in the message to edit")
        text = _render(params.get("text", ""), params.get("parse_mode"))
        if not text.strip():
            raise _bad_request("message text is empty")
        if utf16_length(text) > MESSAGE_TEXT_LIMIT:
            raise _bad_request("MESSAGE_TOO_LONG")
        return self._apply_edit(message, "text", text, params.get("reply_markup"))

    def _edit_message_caption(
        self, params: dict[str, Any], files: dict[str, UploadedFile]
    ) -> ApiObject:
        message = self._bot_message(params)
        caption = _render(params.get("caption", ""), params.get("parse_mode"))
        if utf16_length(caption) > CAPTION_LIMIT:
            raise _bad_request("message caption is too long")
        return self._apply_edit(message, "caption", caption, params.get("reply_markup"))

    def _edit_message_reply_markup(
        self, params: dict[str, Any], files: dict[str, UploadedFile]
    ) -> ApiObject:
        message = self._bot_message(params)
        return self._apply_edit(message, None, None, params.get("reply_markup"))

    def _apply_edit(
        self, message: ApiObject, key: str | None, value: str | None, markup: Any
    ) -> ApiObject:
        # As in Telegram, an edit without reply_markup removes the inline keyboard.
        if markup is not None:
            _check_reply_markup(markup)
        same_content = key is None or message.get(key) == value
        if same_content and message.get("reply_markup") == markup:
            raise _bad_request(_NOT_MODIFIED.removeprefix("Bad Request: "))
        if key is not None:
            message[key] = value
        if markup is None:
            message.pop("reply_markup", None)
        else:
            message["reply_markup"] = markup
        message["edit_date"] = int(time.time())
        return copy.deepcopy(message)

    def _delete_message(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> bool:
        chat = self._chat(params)
        chat_messages = self._messages.get(chat["id"], {})
        if chat_messages.pop(int(params.get("message_id", 0)), None) is None:
            raise _bad_request("message to delete not found")
        return True

    # ----------------------------------------------------------------- the rest

    def _get_me(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> ApiObject:
        return dict(self.bot_user)

    def _delete_webhook(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> bool:
        self._webhook_url = ""
        self._webhook_secret = None
        if params.get("drop_pending_updates"):
            self._updates.clear()
        return True

    def _set_webhook(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> bool:
        secret = params.get("secret_token")
        if secret is not None and not WEBHOOK_SECRET_TOKEN.fullmatch(str(secret)):
            raise _bad_request("secret token contains unallowed characters")
        self._webhook_url = str(params.get("url", ""))
        self._webhook_secret = None if secret is None else str(secret)
        if params.get("drop_pending_updates"):
            self._updates.clear()
        return True

    def _get_webhook_info(
        self, params: dict[str, Any], files: dict[str, UploadedFile]
    ) -> ApiObject:
        return {
            "url": self._webhook_url,
            "has_custom_certificate": False,
            "pending_update_count": len(self._updates),
        }

    def _set_my_commands(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> bool:
        commands = params.get("commands")
        if not isinstance(commands, list) or len(commands) > 100:
            raise _bad_request("commands must be a list of at most 100 commands")
        for command in commands:
            if not _COMMAND_NAME.fullmatch(str(command.get("command", ""))):
                raise _bad_request("BOT_COMMAND_INVALID")
            if not 1 <= len(str(command.get("description", ""))) <= 256:
                raise _bad_request("command description must be 1-256 characters long")
        self._commands[_commands_key(params)] = commands
        return True

    def _get_my_commands(
        self, params: dict[str, Any], files: dict[str, UploadedFile]
    ) -> list[ApiObject]:
        return list(self._commands.get(_commands_key(params), []))

    def _delete_my_commands(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> bool:
        self._commands.pop(_commands_key(params), None)
        return True

    def _send_chat_action(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> bool:
        self._chat(params)
        if params.get("action") not in _CHAT_ACTIONS:
            raise _bad_request("wrong parameter action in request")
        return True

    def _answer_callback_query(
        self, params: dict[str, Any], files: dict[str, UploadedFile]
    ) -> bool:
        query_id = params.get("callback_query_id")
        if query_id not in self._open_callback_queries:
            raise _bad_request(
                "query is too old and response timeout expired or query ID is invalid"
            )
        self._open_callback_queries.discard(query_id)
        return True

    def _get_file(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> ApiObject:
        stored = self._files.get(str(params.get("file_id")))
        if stored is None:
            raise _bad_request("invalid file_id")
        if stored.file_size > DOWNLOAD_LIMIT_BYTES:
            raise _bad_request("file is too big")
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": stored.file_size,
            "file_path": stored.file_path,
        }


# --------------------------------------------------------------------- wire format


async def _read_parameters(
    request: web.Request,
) -> tuple[dict[str, Any], dict[str, UploadedFile]]:
    """Parameters from the query string and a form, multipart or JSON body, decoded."""
    raw: dict[str, Any] = dict(request.query)
    files: dict[str, UploadedFile] = {}
    if request.content_type == "application/json" and request.can_read_body:
        # A JSON body already carries typed values; nothing to decode.
        body = await request.json()
        return {**{k: _decode(k, v) for k, v in raw.items()}, **body}, files
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        for name, value in form.items():
            if isinstance(value, web.FileField):
                files[name] = UploadedFile(
                    name, value.filename, value.content_type, value.file.read()
                )
            else:
                raw[name] = value
    return {name: _decode(name, value) for name, value in raw.items()}, files


def _decode(name: str, value: str) -> Any:
    # PTB sends str values as they are and JSON-encodes the rest (numbers, booleans, lists,
    # objects); a chat_id may also be an "@username" string.
    if name in _STRING_PARAMS:
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _reply_target(params: Mapping[str, Any]) -> int | None:
    reply_parameters = params.get("reply_parameters")
    if isinstance(reply_parameters, Mapping) and "message_id" in reply_parameters:
        return int(reply_parameters["message_id"])
    if params.get("reply_to_message_id") is not None:
        return int(params["reply_to_message_id"])
    return None


def _allows_missing_reply(params: Mapping[str, Any]) -> bool:
    reply_parameters = params.get("reply_parameters")
    if isinstance(reply_parameters, Mapping) and reply_parameters.get(
        "allow_sending_without_reply"
    ):
        return True
    return bool(params.get("allow_sending_without_reply"))


def _callback_data_of(markup: Any) -> list[str]:
    if not isinstance(markup, Mapping):
        return []
    rows: Iterable[Iterable[Mapping[str, Any]]] = markup.get("inline_keyboard", [])
    return [button["callback_data"] for row in rows for button in row if "callback_data" in button]


def _check_reply_markup(markup: Any) -> None:
    if not isinstance(markup, Mapping):
        raise _bad_request("can't parse reply keyboard markup JSON object")
    for data in _callback_data_of(markup):
        if not data or len(data.encode()) > CALLBACK_DATA_LIMIT_BYTES:
            raise _bad_request("BUTTON_DATA_INVALID")


def _commands_key(params: Mapping[str, Any]) -> str:
    scope = params.get("scope") or {}
    return f"{scope.get('type', 'default')}:{params.get('language_code', '')}"


def _message_id_of(reply_to: int | Mapping[str, Any] | None) -> int | None:
    if reply_to is None or isinstance(reply_to, int):
        return reply_to
    return int(reply_to["message_id"])


def _default_sizes(count: int) -> list[tuple[int, int]]:
    # Telegram lists a photo's sizes smallest first; the last is the original.
    return [(320 * (index + 1), 240 * (index + 1)) for index in range(count)]


# --------------------------------------------------------------------- markup parsing


def _render(text: str, parse_mode: str | None) -> str:
    """The text a user sees, or the 400 Telegram answers for markup it cannot parse."""
    if not parse_mode:
        return text
    mode = parse_mode.lower()
    if mode == "html":
        return _HtmlRenderer.render(text)
    if mode == "markdownv2":
        return _render_markdown_v2(text)
    if mode == "markdown":
        # Legacy Markdown is lenient; dropping its markers is close enough for tests.
        return re.sub(r"[*_`]", "", text)
    raise _bad_request(f"unsupported parse_mode {parse_mode!r}")


def _entity_error(reason: str) -> ApiError:
    return _bad_request(f"can't parse entities: {reason}")


class _HtmlRenderer(HTMLParser):
    """Telegram's HTML subset: known tags only, every tag closed, text unescaped."""

    ALLOWED = frozenset(
        {
            "b",
            "strong",
            "i",
            "em",
            "u",
            "ins",
            "s",
            "strike",
            "del",
            "span",
            "tg-spoiler",
            "a",
            "code",
            "pre",
            "blockquote",
            "tg-emoji",
        }
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.open_tags: list[str] = []

    @classmethod
    def render(cls, text: str) -> str:
        if re.search(r"<(?![a-zA-Z/])", text):
            raise _entity_error("unescaped '<' must be written as &lt;")
        parser = cls()
        parser.feed(text)
        parser.close()
        if parser.open_tags:
            raise _entity_error(
                f'can\'t find end tag corresponding to start tag "{parser.open_tags[-1]}"'
            )
        return "".join(parser.parts)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.ALLOWED:
            raise _entity_error(f'unsupported start tag "{tag}"')
        self.open_tags.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open_tags or self.open_tags[-1] != tag:
            raise _entity_error(f'unexpected end tag "{tag}"')
        self.open_tags.pop()

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


_MARKDOWN_V2_RESERVED = frozenset("_*[]()~`>#+-=|{}.!")
_MARKDOWN_V2_MARKERS = ("||", "__", "*", "_", "~")


def _render_markdown_v2(text: str) -> str:
    """MarkdownV2 as Telegram parses it: reserved characters outside markup must be escaped."""
    out: list[str] = []
    open_markers: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            if index + 1 == len(text):
                raise _entity_error("text must not end with an unescaped '\\'")
            out.append(text[index + 1])
            index += 2
            continue
        if text.startswith("```", index):
            end = text.find("```", index + 3)
            if end < 0:
                raise _entity_error("can't find end of Pre entity")
            block = text[index + 3 : end]
            # The first line names the language when a newline follows it.
            if "\n" in block:
                first, rest = block.split("\n", 1)
                block = rest if re.fullmatch(r"[\w+-]*", first) else block
            out.append(re.sub(r"\\(.)", r"\1", block))
            index = end + 3
            continue
        if char == "`":
            end = text.find("`", index + 1)
            if end < 0:
                raise _entity_error("can't find end of Code entity")
            out.append(re.sub(r"\\(.)", r"\1", text[index + 1 : end]))
            index = end + 1
            continue
        if char == "[":
            open_markers.append("[")
            index += 1
            continue
        if char == "]" and "[" in open_markers:
            open_markers.remove("[")
            link = re.match(r"\]\(((?:\\.|[^)\\])*)\)", text[index:])
            if link is None:
                raise _entity_error("can't find the URL of a text link")
            index += link.end()
            continue
        if char == ">" and (index == 0 or text[index - 1] == "\n"):
            index += 1  # a block quote line
            continue
        marker = next((m for m in _MARKDOWN_V2_MARKERS if text.startswith(m, index)), None)
        if marker is not None:
            if marker in open_markers:
                open_markers.remove(marker)
            else:
                open_markers.append(marker)
            index += len(marker)
            continue
        if char in _MARKDOWN_V2_RESERVED:
            raise _entity_error(
                f"Character '{char}' is reserved and must be escaped with the preceding '\\'"
            )
        out.append(char)
        index += 1
    if open_markers:
        raise _entity_error(f"can't find end of the entity opened by {open_markers[-1]!r}")
    return "".join(out)
