"""A Discord emulator for tests: the REST API and the gateway over real sockets.

It listens on 127.0.0.1 on a random port and speaks Discord's wire format (API v10, plain
JSON text frames on the gateway), so the real discord.py can run against it:

    async with DiscordEmulator() as emulator:
        monkeypatch.setattr(discord.http.Route, "BASE", emulator.api_base)
        monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(emulator.gateway_url))
        guild_id = emulator.add_guild("Foodies")
        channel_id = emulator.add_channel(guild_id, "dishes")
        ada = emulator.add_user("ada")
        ... start a discord.Client with emulator.token ...
        emulator.send_message(channel_id, ada, "what is this?", mentions_bot=True)
        call = await emulator.wait_for("POST /channels/{channel_id}/messages")

The test plays the platform side (users send messages and attachments, press buttons, submit
modals, run slash commands) and reads what the bot did: every REST call is recorded
(``calls``, ``wait_for``), ``messages_in`` shows the bot's messages as users see them now
(after edits, deletions, interaction responses and follow-ups), and ``fail_next`` scripts
rate limits and other errors, ``hang_next`` a request held past the client's timeout (taken
or not), ``reset_next`` a connection closed without an answer. A message sent with
``enforce_nonce`` and a nonce used before returns the message made then, as Discord's does.
Routes are named ``"METHOD /template"`` as in discord.py's
``Route``, e.g. ``"POST /channels/{channel_id}/messages"``; a concrete path works too.

What it checks, like Discord does, so that adapter bugs show up in tests: content over 2000
characters and empty messages (error 50035 / 50006), component custom_ids over 100
characters or repeated, replies to unknown messages, edits of other users' messages,
uploads over the size limit, interaction callbacks later than 3 seconds or repeated,
follow-ups before the acknowledgement, invalid command names, the message content intent
(guild messages that do not mention the bot arrive without content when the client did not
ask for it) and the privileged intent switch in the developer portal (close code 4014).

Conveniences that Discord does not offer: events dispatched while no client is connected
wait for the next one, and a clean close (code 1000) ends the session so that they do.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import enum
import json
import mimetypes
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from aiohttp import BodyPartReader, WSMsgType, web

ApiObject = dict[str, Any]

API_VERSION = 10
DISCORD_EPOCH_MS = 1_420_070_400_000
WAIT_FOR_TIMEOUT_S = 10.0

# Discord's own limits, enforced so an adapter that ignores them fails in tests.
MESSAGE_CONTENT_LIMIT = 2000
CUSTOM_ID_LIMIT = 100
BUTTON_LABEL_LIMIT = 80
ACTION_ROWS_LIMIT = 5
ROW_COMPONENTS_LIMIT = 5
MODAL_TITLE_LIMIT = 45
MODAL_COMPONENTS_LIMIT = 5
ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024  # what a bot may upload without boosts
INTERACTION_ACK_DEADLINE_S = 3.0
HEARTBEAT_INTERVAL_MS = 41_250
COMMANDS_LIMIT = 100
COMMAND_DESCRIPTION_LIMIT = 100
ALL_PERMISSIONS = (1 << 51) - 1

_COMMAND_NAME = re.compile(r"[-_'\w]{1,32}")
_USER_MENTION = re.compile(r"<@!?(\d+)>")
_UPLOAD_FIELD = re.compile(r"files\[(\d+)\]")


class Intent(enum.IntFlag):
    """The gateway intents the emulator looks at."""

    GUILDS = 1 << 0
    GUILD_MEMBERS = 1 << 1
    GUILD_MESSAGES = 1 << 9
    DIRECT_MESSAGES = 1 << 12
    MESSAGE_CONTENT = 1 << 15


class Op(enum.IntEnum):
    """Gateway opcodes."""

    DISPATCH = 0
    HEARTBEAT = 1
    IDENTIFY = 2
    PRESENCE_UPDATE = 3
    RESUME = 6
    RECONNECT = 7
    REQUEST_GUILD_MEMBERS = 8
    INVALID_SESSION = 9
    HELLO = 10
    HEARTBEAT_ACK = 11


class InteractionType(enum.IntEnum):
    APPLICATION_COMMAND = 2
    MESSAGE_COMPONENT = 3
    MODAL_SUBMIT = 5


class CallbackType(enum.IntEnum):
    """Interaction callback types the emulator accepts."""

    CHANNEL_MESSAGE = 4
    DEFERRED_CHANNEL_MESSAGE = 5
    DEFERRED_UPDATE_MESSAGE = 6
    UPDATE_MESSAGE = 7
    MODAL = 9


_CALLBACKS_ALLOWED = {
    InteractionType.APPLICATION_COMMAND: {4, 5, 9},
    InteractionType.MESSAGE_COMPONENT: {4, 5, 6, 7, 9},
    InteractionType.MODAL_SUBMIT: {4, 5, 6, 7},
}
EPHEMERAL = 1 << 6
LOADING = 1 << 7
CHANNEL_TEXT = 0
CHANNEL_DM = 1
MESSAGE_DEFAULT = 0
MESSAGE_REPLY = 19
MESSAGE_CHAT_INPUT_COMMAND = 20


@dataclass(frozen=True)
class UploadedFile:
    """A file part of a multipart request (``files[n]``)."""

    field: str
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class Call:
    """One REST request the bot made, decoded, with the emulator's answer."""

    method: str
    path: str  # after /api/v10, e.g. "/channels/1234/messages"
    route: str  # "POST /channels/{channel_id}/messages"; "GET /path" for unknown routes
    query: dict[str, str]
    json: Any  # the JSON body, or a multipart request's payload_json
    at: float  # time.monotonic() when the request arrived
    files: list[UploadedFile] = field(default_factory=list)
    status: int = 0
    response: Any = None
    late: bool = False  # taken, and answered after the client's timeout
    recorded: bool = field(default=False, repr=False)


class DiscordError(Exception):
    """An error answer in Discord's shape: ``{"message", "code", "errors"?}``."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        errors: ApiObject | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors
        self.retry_after = retry_after

    def body(self) -> ApiObject:
        if self.retry_after is not None:
            return {"message": self.message, "retry_after": self.retry_after, "global": False}
        body: ApiObject = {"message": self.message, "code": self.code}
        if self.errors is not None:
            body["errors"] = self.errors
        return body

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        # discord.py treats a 429 without Via as a Cloudflare ban and does not retry it.
        return {
            "Via": "1.1 google",
            "Retry-After": str(max(1, round(self.retry_after))),
            "X-RateLimit-Scope": "user",
        }


def invalid_form(path: str, code: str, message: str) -> DiscordError:
    """Discord's 50035 "Invalid Form Body" for one field; ``path`` is dotted, e.g.
    ``"components.0.components.1.custom_id"``."""
    errors: ApiObject = {"_errors": [{"code": code, "message": message}]}
    for key in reversed(path.split(".")):
        errors = {key: errors}
    return DiscordError(400, 50035, "Invalid Form Body", errors)


def _unknown(what: str, code: int) -> DiscordError:
    return DiscordError(404, code, f"Unknown {what}")


@dataclass
class _ScriptedFailure:
    status: int
    code: int
    message: str
    retry_after: float | None
    times: int
    hang_s: float = 0.0  # held this long, then answered (the client has given up by then)
    processed: bool = False  # a held request takes effect before it hangs
    reset: bool = False  # the connection is closed without an answer


@dataclass
class _Route:
    method: str
    template: str
    pattern: re.Pattern[str]
    handler: Callable[..., tuple[int, Any]]
    needs_auth: bool

    @property
    def name(self) -> str:
        return f"{self.method} {self.template}"


@dataclass(frozen=True)
class _StoredFile:
    attachment: ApiObject
    data: bytes


@dataclass(eq=False)
class _Session:
    session_id: str
    intents: int
    events: list[ApiObject] = field(default_factory=list)  # sequence number = index + 1
    socket: web.WebSocketResponse | None = None
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class _Connection:
    socket: web.WebSocketResponse
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    session: _Session | None = None
    pump: asyncio.Task[None] | None = None
    dropped: bool = False  # the emulator closed it (aiohttp then reports the client's code)

    async def send(self, frame: Mapping[str, Any]) -> None:
        async with self.lock:
            await self.socket.send_str(json.dumps(frame))


@dataclass
class _Interaction:
    payload: ApiObject
    channel_id: int
    created_at: float
    dispatched_at: float | None = None
    acknowledged_at: float | None = None
    original_message_id: int | None = None
    original_is_loading: bool = False  # a thinking deferral the first follow-up replaces
    followup_ids: list[int] = field(default_factory=list)
    responses: list[ApiObject] = field(default_factory=list)


@dataclass
class _OpenModal:
    custom_id: str
    components: list[ApiObject]
    user_id: int
    channel_id: int
    message_id: int | None


class DiscordEmulator:
    """A scriptable Discord on 127.0.0.1; use it as an async context manager."""

    def __init__(
        self,
        *,
        message_content_enabled: bool = True,
        ack_deadline_s: float = INTERACTION_ACK_DEADLINE_S,
    ) -> None:
        """``message_content_enabled`` is the privileged intent switch in the developer
        portal: off, an IDENTIFY asking for MESSAGE_CONTENT is closed with 4014."""
        self.message_content_enabled = message_content_enabled
        self.ack_deadline_s = ack_deadline_s
        self._last_snowflake = 0
        self._port = 0
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()
        self._calls: list[Call] = []
        self._failures: dict[str, deque[_ScriptedFailure]] = {}
        self._nonces: dict[tuple[str, str], str] = {}  # (channel, nonce) -> message id
        self._users: dict[int, ApiObject] = {}
        self._guilds: dict[int, ApiObject] = {}
        self._members: dict[int, dict[int, ApiObject]] = {}
        self._channels: dict[int, ApiObject] = {}
        self._messages: dict[int, ApiObject] = {}
        self._files: dict[int, _StoredFile] = {}
        self._commands: dict[int | None, list[ApiObject]] = {}
        self._interactions: dict[int, _Interaction] = {}
        self._modals: list[_OpenModal] = []
        self._session: _Session | None = None
        self._undelivered: list[tuple[str, ApiObject, int]] = []
        self._received: list[ApiObject] = []
        self._unhandled: list[Call] = []
        self._notifications: set[asyncio.Task[None]] = set()
        self._connections: set[_Connection] = set()
        self.bot_user: ApiObject = {
            **self.add_user("dishbot", bot=True),
            "verified": True,
            "mfa_enabled": False,
            "flags": 0,
        }
        self._users[int(self.bot_user["id"])] = self.bot_user
        self.owner = self.add_user("owner")
        self.application_id = int(self.bot_user["id"])  # a bot's user id is its app id
        encoded_id = base64.b64encode(str(self.application_id).encode()).decode().rstrip("=")
        self.token = f"{encoded_id}.emulated.dishbot-test-token"
        self._routes = self._build_routes()

    # ----------------------------------------------------------------- addresses

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def api_base(self) -> str:
        """For ``discord.http.Route.BASE``."""
        return f"{self.base_url}/api/v{API_VERSION}"

    @property
    def gateway_url(self) -> str:
        """For ``DiscordWebSocket.DEFAULT_GATEWAY`` (wrap it in ``yarl.URL``)."""
        return f"ws://127.0.0.1:{self._port}/"

    @property
    def bot_id(self) -> int:
        return self.application_id

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Listen on a random free port of 127.0.0.1."""
        app = web.Application(client_max_size=2 * ATTACHMENT_SIZE_LIMIT)
        app.router.add_get("/", self._serve_gateway)
        app.router.add_route("*", f"/api/v{API_VERSION}/{{path:.*}}", self._serve_api)
        app.router.add_get("/attachments/{attachment_id}/{filename}", self._serve_file)
        app.router.add_get("/media/attachments/{attachment_id}/{filename}", self._serve_file)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Close gateway connections (1001, going away), then stop listening."""
        for connection in list(self._connections):
            await connection.socket.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> DiscordEmulator:
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

    def add_user(
        self, username: str, *, global_name: str | None = None, bot: bool = False
    ) -> ApiObject:
        """A Discord user (a user object with a snowflake id) the test can play."""
        user: ApiObject = {
            "id": str(self._snowflake()),
            "username": username,
            "discriminator": "0",
            "global_name": global_name,
            "avatar": None,
            "public_flags": 0,
        }
        if bot:
            user["bot"] = True
        self._users[int(user["id"])] = user
        return dict(user)

    def add_guild(self, name: str) -> int:
        """A server the bot is in; its @everyone role has the guild's id. Returns the id."""
        guild_id = self._snowflake()
        self._guilds[guild_id] = {
            "id": str(guild_id),
            "name": name,
            "icon": None,
            "owner_id": self.owner["id"],
            "roles": [
                {
                    "id": str(guild_id),
                    "name": "@everyone",
                    "permissions": str(ALL_PERMISSIONS),
                    "position": 0,
                    "color": 0,
                    "hoist": False,
                    "managed": False,
                    "mentionable": False,
                    "flags": 0,
                }
            ],
            "features": [],
            "emojis": [],
            "stickers": [],
            "preferred_locale": "en-US",
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "system_channel_id": None,
            "system_channel_flags": 0,
        }
        self._members[guild_id] = {}
        self._join(guild_id, self.bot_user)
        session = self._session
        if session is not None:  # otherwise the GUILD_CREATEs after READY carry it
            guild = self._guild_create(guild_id, session.intents)
            self._append(session, "GUILD_CREATE", guild, Intent.GUILDS)
        return guild_id

    def add_channel(self, guild_id: int, name: str, *, channel_type: int = CHANNEL_TEXT) -> int:
        """A channel in a server (a text channel by default); returns its id."""
        channel_id = self._snowflake()
        self._channels[channel_id] = {
            "id": str(channel_id),
            "type": channel_type,
            "guild_id": str(guild_id),
            "name": name,
            "position": sum(1 for c in self._channels.values() if c.get("guild_id")),
            "permission_overwrites": [],
            "parent_id": None,
            "topic": None,
            "nsfw": False,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "flags": 0,
        }
        if self._session is not None:  # otherwise the GUILD_CREATEs after READY carry it
            channel = copy.deepcopy(self._channels[channel_id])
            self._append(self._session, "CHANNEL_CREATE", channel, Intent.GUILDS)
        return channel_id

    def add_dm_channel(self, user: Mapping[str, Any]) -> int:
        """The direct-message channel (type 1, no guild) between ``user`` and the bot."""
        for channel in self._channels.values():
            if channel["type"] == CHANNEL_DM and channel["recipients"][0]["id"] == user["id"]:
                return int(channel["id"])
        channel_id = self._snowflake()
        self._channels[channel_id] = {
            "id": str(channel_id),
            "type": CHANNEL_DM,
            "last_message_id": None,
            "flags": 0,
            "recipients": [dict(user)],
        }
        return channel_id

    def add_file(
        self,
        data: bytes,
        filename: str = "dish.jpg",
        content_type: str | None = None,
        *,
        size: int | None = None,
    ) -> ApiObject:
        """An attachment object for a file users can send, served at its ``url``.

        ``size`` overrides the size Discord reports (to test a size limit without allocating
        it); downloads still serve ``data``.
        """
        if self._runner is None:
            raise RuntimeError("start the emulator first: attachment URLs name its port")
        attachment_id = self._snowflake()
        url = f"{self.base_url}/attachments/{attachment_id}/{filename}"
        attachment: ApiObject = {
            "id": str(attachment_id),
            "filename": filename,
            "size": len(data) if size is None else size,
            "url": url,
            "proxy_url": url.replace("/attachments/", "/media/attachments/", 1),
            "content_type": content_type or mimetypes.guess_type(filename)[0],
        }
        self._files[attachment_id] = _StoredFile(attachment, data)
        return dict(attachment)

    def file_data(self, attachment: Mapping[str, Any]) -> bytes:
        """The bytes of an attachment (one a test added or one the bot uploaded)."""
        return self._files[int(attachment["id"])].data

    def send_message(
        self,
        channel_id: int,
        author: Mapping[str, Any],
        content: str = "",
        attachments: Sequence[Mapping[str, Any]] = (),
        *,
        mentions_bot: bool = False,
        reply_to: int | None = None,
    ) -> ApiObject:
        """A user posts a message; it is dispatched as MESSAGE_CREATE and returned.

        ``mentions_bot`` puts ``<@bot>`` in front of the text. ``<@id>`` mentions of known
        users are listed in ``mentions``; a reply mentions the replied author, as by default.
        """
        channel = self._channel(channel_id)
        if mentions_bot:
            content = f"<@{self.bot_id}> {content}".rstrip()
        message = self._new_message(channel, author, content)
        message["attachments"] = [dict(a) for a in attachments]
        if reply_to is not None:
            referenced = self._messages.get(reply_to)
            if referenced is None or referenced["channel_id"] != str(channel_id):
                raise ValueError(f"no message {reply_to} in channel {channel_id} to reply to")
            self._make_reply(message, referenced)
        self._publish(message)
        return copy.deepcopy(message)

    def forget_undelivered(self) -> int:
        """Drop the events kept for the next connection (see `_dispatch`), as if a client
        now gone had received them: Discord never delivers those to a new session. Returns
        how many there were."""
        dropped = len(self._undelivered)
        self._undelivered.clear()
        return dropped

    def press_button(self, message_id: int, custom_id: str, user: Mapping[str, Any]) -> ApiObject:
        """A user presses the component ``custom_id`` on a bot message as it is now;
        returns the INTERACTION_CREATE payload (its ``id`` and ``token``)."""
        message = self._messages.get(message_id)
        if message is None or message["author"]["id"] != self.bot_user["id"]:
            raise ValueError("users can press buttons only on messages the bot sent")
        component = next(
            (c for c in _walk(message.get("components", [])) if c.get("custom_id") == custom_id),
            None,
        )
        if component is None:
            raise ValueError(f"message {message_id} has no component {custom_id!r}")
        if component.get("disabled"):
            raise ValueError(f"component {custom_id!r} is disabled")
        data: ApiObject = {"custom_id": custom_id, "component_type": component["type"]}
        if "id" in component:
            data["id"] = component["id"]
        return self._start_interaction(
            InteractionType.MESSAGE_COMPONENT, data, user, int(message["channel_id"]), message
        )

    def submit_modal(
        self,
        custom_id: str,
        values: Mapping[str, str],
        user: Mapping[str, Any],
        message_id: int | None = None,
    ) -> ApiObject:
        """A user submits the modal ``custom_id`` the bot opened for them, with a value per
        text input custom_id; returns the INTERACTION_CREATE payload.

        The submission carries the message the modal was opened from, if any, unless
        ``message_id`` names another.
        """
        modal = next(
            (
                m
                for m in reversed(self._modals)
                if m.custom_id == custom_id and m.user_id == int(user["id"])
            ),
            None,
        )
        if modal is None:
            raise ValueError(f"no open modal {custom_id!r} for user {user['id']}")
        unused = set(values)
        components = [_submitted(c, values, unused) for c in modal.components]
        if unused:
            raise ValueError(f"modal {custom_id!r} has no text inputs {sorted(unused)}")
        self._modals.remove(modal)
        source_id = message_id if message_id is not None else modal.message_id
        source = None if source_id is None else self._messages[source_id]
        data = {"custom_id": custom_id, "components": components}
        return self._start_interaction(
            InteractionType.MODAL_SUBMIT, data, user, modal.channel_id, source
        )

    def forge_interaction(
        self,
        interaction_type: InteractionType,
        data: Mapping[str, Any],
        user: Mapping[str, Any],
        channel_id: int,
        message_id: int | None = None,
    ) -> ApiObject:
        """An interaction a modified client makes up: any ``data`` (a custom_id no button or
        form has, another channel's), on any message, as the attacker tests do."""
        message = None if message_id is None else self._messages[message_id]
        return self._start_interaction(interaction_type, dict(data), user, channel_id, message)

    def redeliver(self, message: Mapping[str, Any]) -> None:
        """Dispatch a user's message again, as MESSAGE_CREATE, as a gateway replaying events
        after a reconnect may."""
        self._dispatch_message("MESSAGE_CREATE", self._messages[int(message["id"])])

    def slash_command(
        self,
        name: str,
        options: Mapping[str, Any],
        user: Mapping[str, Any],
        channel_id: int,
    ) -> ApiObject:
        """A user runs a registered slash command; returns the INTERACTION_CREATE payload.

        The guild's command wins over a global one of the same name. An attachment option
        takes an attachment object from ``add_file`` and arrives in ``data.resolved``.
        """
        channel = self._channel(channel_id)
        command = self._registered_command(name, channel.get("guild_id"))
        definitions = {option["name"]: option for option in command.get("options", [])}
        missing = [n for n, o in definitions.items() if o.get("required") and n not in options]
        if missing or not set(options) <= set(definitions):
            raise ValueError(
                f"/{name} takes {sorted(definitions)}; missing {missing}, got {sorted(options)}"
            )
        data: ApiObject = {"id": command["id"], "name": name, "type": 1}
        resolved: ApiObject = {}
        data_options = []
        for option_name, value in options.items():
            option_type = definitions[option_name]["type"]
            if option_type == 11:  # ATTACHMENT
                resolved.setdefault("attachments", {})[value["id"]] = dict(value)
                value = value["id"]
            data_options.append({"name": option_name, "type": option_type, "value": value})
        if data_options:
            data["options"] = data_options
        if resolved:
            data["resolved"] = resolved
        if "guild_id" in command:
            data["guild_id"] = command["guild_id"]
        return self._start_interaction(InteractionType.APPLICATION_COMMAND, data, user, channel_id)

    def fail_next(
        self,
        route: str,
        status: int = 429,
        *,
        retry_after: float = 0.05,
        code: int = 0,
        message: str | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` requests of ``route`` with an error instead.

        ``route`` is ``"METHOD /template"`` or ``"METHOD /concrete/path"``. A 429 carries
        ``Via`` and a JSON ``retry_after`` as Discord's do, so discord.py waits and retries;
        other statuses carry ``code`` and ``message``.
        """
        if message is None:
            message = "You are being rate limited." if status == 429 else "Scripted failure"
        failure = _ScriptedFailure(
            status, code, message, retry_after if status == 429 else None, times
        )
        self._failures.setdefault(route, deque()).append(failure)

    def hang_next(
        self, route: str, seconds: float, *, processed: bool = False, times: int = 1
    ) -> None:
        """Hold the next ``times`` requests of ``route`` for ``seconds`` before answering (set
        it past the client's timeout). With ``processed`` the request takes effect first (the
        message is posted; only the answer is late); without, it never does."""
        failure = _ScriptedFailure(0, 0, "", None, times, hang_s=seconds, processed=processed)
        self._failures.setdefault(route, deque()).append(failure)

    def reset_next(self, route: str, times: int = 1, *, processed: bool = False) -> None:
        """Close the connection of the next ``times`` requests of ``route`` without an
        answer, before the request takes effect; with ``processed``, after it did (the
        message is posted, as when a proxy drops the connection while Discord answers)."""
        failure = _ScriptedFailure(0, 0, "", None, times, processed=processed, reset=True)
        self._failures.setdefault(route, deque()).append(failure)

    async def disconnect(self, code: int = 4000) -> None:
        """Drop the gateway connection the way Discord does; the session stays resumable,
        and events dispatched meanwhile are replayed on RESUME."""
        socket = None if self._session is None else self._session.socket
        connection = next((c for c in self._connections if c.socket is socket), None)
        if socket is None or connection is None:
            raise RuntimeError("no client is connected to the gateway")
        connection.dropped = True
        await connection.socket.close(code=code)

    # ----------------------------------------------------------------- what the bot did

    def calls(self, route: str | None = None) -> list[Call]:
        """Every recorded REST call, or those of one route (template or concrete path)."""
        if route is None:
            return list(self._calls)
        return [c for c in self._calls if route in (c.route, f"{c.method} {c.path}")]

    @property
    def unhandled(self) -> list[Call]:
        """Calls to routes the emulator does not know (answered 404)."""
        return list(self._unhandled)

    async def wait_for(
        self,
        route: str,
        predicate: Callable[[Call], bool] | None = None,
        # A guard against a hung test, not a measurement; named as callers expect.
        timeout: float = WAIT_FOR_TIMEOUT_S,  # noqa: ASYNC109
    ) -> Call:
        """The first call of ``route`` matching ``predicate``, waiting until one arrives.

        Calls already recorded count, so a test cannot miss a call that beat it here.
        """
        return (await self.wait_for_calls(route, 1, predicate, timeout))[0]

    async def wait_for_calls(
        self,
        route: str,
        count: int,
        predicate: Callable[[Call], bool] | None = None,
        timeout: float = WAIT_FOR_TIMEOUT_S,  # noqa: ASYNC109
    ) -> list[Call]:
        """The first ``count`` calls of ``route`` matching ``predicate``, waiting for them."""

        def matching() -> list[Call]:
            return [c for c in self.calls(route) if predicate is None or predicate(c)]

        try:
            await self.wait_until(lambda: len(matching()) >= count, timeout)
        except TimeoutError:
            seen = ", ".join(c.route for c in self._calls[-20:])
            raise TimeoutError(
                f"{count} matching {route} call(s) did not arrive within {timeout}s "
                f"(got {len(matching())}; last calls: {seen})"
            ) from None
        return matching()[:count]

    async def wait_until(
        self,
        condition: Callable[[], bool],
        timeout: float = WAIT_FOR_TIMEOUT_S,  # noqa: ASYNC109
    ) -> None:
        """Wait until ``condition()`` holds; it is checked whenever the emulator's state
        changes (a REST call, a gateway frame in either direction)."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(condition), timeout)
            except TimeoutError:
                raise TimeoutError(f"the condition did not hold within {timeout}s") from None

    def messages_in(self, channel_id: int) -> list[ApiObject]:
        """The bot's messages in a channel as users see them now: edited, not deleted,
        including interaction responses and follow-ups (ephemeral ones too)."""
        return [
            copy.deepcopy(m)
            for m in self._messages.values()
            if m["channel_id"] == str(channel_id) and m["author"]["id"] == self.bot_user["id"]
        ]

    def message(self, message_id: int) -> ApiObject:
        """Any stored message (the bot's or a user's) in its current state."""
        return copy.deepcopy(self._messages[message_id])

    def interaction_responses(self, interaction_id: int | str) -> list[ApiObject]:
        """The callback bodies (``{"type", "data"}``) the bot sent for an interaction."""
        return copy.deepcopy(self._interactions[int(interaction_id)].responses)

    def acknowledgement_delay(self, interaction_id: int | str) -> float | None:
        """Seconds from the INTERACTION_CREATE frame leaving to its accepted callback."""
        record = self._interactions[int(interaction_id)]
        if record.acknowledged_at is None or record.dispatched_at is None:
            return None
        return record.acknowledged_at - record.dispatched_at

    def commands(self, guild_id: int | None = None) -> list[ApiObject]:
        """The application commands registered globally, or for one guild."""
        return copy.deepcopy(self._commands.get(guild_id, []))

    def received_frames(self, op: int | None = None) -> list[ApiObject]:
        """Gateway frames the client sent (IDENTIFY, RESUME, heartbeats, ...)."""
        return [copy.deepcopy(f) for f in self._received if op is None or f.get("op") == op]

    @property
    def connected(self) -> bool:
        """Whether a client holds an identified or resumed gateway session now."""
        return self._session is not None and self._session.socket is not None

    # ----------------------------------------------------------------- REST plumbing

    def _build_routes(self) -> list[_Route]:
        table: list[tuple[str, str, Callable[..., tuple[int, Any]], bool]] = [
            ("GET", "/gateway", self._get_gateway, False),
            ("GET", "/gateway/bot", self._get_gateway_bot, True),
            ("GET", "/users/@me", self._get_me, True),
            ("GET", "/oauth2/applications/@me", self._get_application, True),
            ("POST", "/users/@me/channels", self._create_dm, True),
            ("GET", "/channels/{channel_id}", self._get_channel, True),
            ("POST", "/channels/{channel_id}/typing", self._trigger_typing, True),
            ("POST", "/channels/{channel_id}/messages", self._create_message, True),
            ("GET", "/channels/{channel_id}/messages", self._get_messages, True),
            ("GET", "/channels/{channel_id}/messages/{message_id}", self._get_message, True),
            ("PATCH", "/channels/{channel_id}/messages/{message_id}", self._edit_message, True),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}", self._delete_message, True),
            ("POST", "/interactions/{interaction_id}/{token}/callback", self._callback, False),
            ("POST", "/webhooks/{application_id}/{token}", self._execute_webhook, False),
        ]
        for message in ("@original", "{message_id}"):
            path = f"/webhooks/{{application_id}}/{{token}}/messages/{message}"
            table += [
                ("GET", path, self._get_webhook_message, False),
                ("PATCH", path, self._edit_webhook_message, False),
                ("DELETE", path, self._delete_webhook_message, False),
            ]
        for scope in ("", "/guilds/{guild_id}"):
            path = f"/applications/{{application_id}}{scope}/commands"
            table += [
                ("PUT", path, self._overwrite_commands, True),
                ("GET", path, self._get_commands, True),
            ]
        return [
            _Route(method, template, _template_pattern(template), handler, needs_auth)
            for method, template, handler, needs_auth in table
        ]

    async def _serve_api(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        call = Call(
            request.method,
            path,
            f"{request.method} {path}",
            dict(request.query),
            None,
            time.monotonic(),
        )
        headers: dict[str, str] = {}
        try:
            call.json, call.files = await _read_body(request)
            route, params = self._match(request.method, path)
            if route is None:
                self._unhandled.append(call)
                raise DiscordError(404, 0, "404: Not Found")
            call.route = route.name
            if route.needs_auth and request.headers.get("Authorization") != f"Bot {self.token}":
                raise DiscordError(401, 0, "401: Unauthorized")
            failure = self._scripted_failure(call)
            if failure is not None and failure.reset and not failure.processed:
                call.status, call.response = 0, "the connection was closed without an answer"
                self._record(call)
                if request.transport is not None:
                    request.transport.abort()
                return web.Response()
            if failure is not None and failure.hang_s and not failure.processed:
                call.status, call.response = 0, "held past the client's timeout, not processed"
                self._record(call)
                await asyncio.sleep(failure.hang_s)
                return web.Response(status=504)
            if failure is not None and not failure.hang_s and not failure.reset:
                raise DiscordError(
                    failure.status, failure.code, failure.message, retry_after=failure.retry_after
                )
            try:
                call.status, call.response = route.handler(call, **params)
            except (KeyError, TypeError, ValueError, AttributeError) as malformed:
                # A payload of the wrong shape: Discord answers 400, never a 500 (which
                # discord.py would retry for seconds).
                raise DiscordError(400, 50035, f"Invalid Form Body ({malformed!r})") from None
            if failure is not None and failure.reset:  # processed, and now no answer comes
                call.late = True
                self._record(call)
                if request.transport is not None:
                    request.transport.abort()
                return web.Response()
            if failure is not None:  # processed, and now the answer is late
                call.late = True
                self._record(call)
                await asyncio.sleep(failure.hang_s)
        except DiscordError as error:
            call.status, call.response, headers = error.status, error.body(), error.headers()
        self._record(call)
        return _json_response(call.status, call.response, headers)

    def _record(self, call: Call) -> None:
        if call.recorded:
            return
        call.recorded = True
        self._calls.append(call)
        self._notify()

    def _match(self, method: str, path: str) -> tuple[_Route | None, dict[str, str]]:
        for route in self._routes:
            found = route.pattern.fullmatch(path)
            if route.method == method and found:
                return route, found.groupdict()
        return None, {}

    def _scripted_failure(self, call: Call) -> _ScriptedFailure | None:
        for key in (call.route, f"{call.method} {call.path}"):
            queue = self._failures.get(key)
            if not queue:
                continue
            failure = queue[0]
            failure.times -= 1
            if failure.times <= 0:
                queue.popleft()
            return failure
        return None

    async def _serve_file(self, request: web.Request) -> web.StreamResponse:
        stored = self._files.get(int(request.match_info["attachment_id"]))
        call = Call(
            "GET",
            request.path,
            "GET /attachments/{attachment_id}/{filename}",
            {},
            None,
            time.monotonic(),
        )
        self._calls.append(call)
        if stored is None or stored.attachment["filename"] != request.match_info["filename"]:
            call.status = 404
            self._notify()
            return web.Response(status=404, text="Not Found")
        call.status = 200
        self._notify()
        content_type = stored.attachment.get("content_type") or "application/octet-stream"
        return web.Response(body=stored.data, headers={"Content-Type": content_type})

    def _notify(self) -> None:
        # From a task of its own: a waiter must wake even when the caller is being
        # cancelled (aiohttp cancels the handler of a connection the client dropped).
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        task = asyncio.get_running_loop().create_task(notify())
        self._notifications.add(task)  # a reference, so it is not collected before it runs
        task.add_done_callback(self._notifications.discard)

    # ----------------------------------------------------------------- REST: basics

    def _get_gateway(self, call: Call) -> tuple[int, Any]:
        return 200, {"url": self.gateway_url}

    def _get_gateway_bot(self, call: Call) -> tuple[int, Any]:
        limit = {"total": 1000, "remaining": 999, "reset_after": 14_400_000, "max_concurrency": 1}
        return 200, {"url": self.gateway_url, "shards": 1, "session_start_limit": limit}

    def _get_me(self, call: Call) -> tuple[int, Any]:
        return 200, dict(self.bot_user)

    def _get_application(self, call: Call) -> tuple[int, Any]:
        return 200, {
            "id": str(self.application_id),
            "name": self.bot_user["username"],
            "icon": None,
            "description": "",
            "summary": "",
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": "0" * 64,
            "owner": dict(self.owner),
            "team": None,
            "flags": self._application_flags(),
            "bot": dict(self.bot_user),
            "interactions_endpoint_url": None,
            "redirect_uris": [],
            "tags": [],
            "approximate_guild_count": len(self._guilds),
        }

    def _application_flags(self) -> int:
        # GATEWAY_MESSAGE_CONTENT_LIMITED: the switch is on for an unverified bot.
        return 1 << 19 if self.message_content_enabled else 0

    def _create_dm(self, call: Call) -> tuple[int, Any]:
        recipient = self._users.get(int((call.json or {}).get("recipient_id", 0)))
        if recipient is None:
            raise invalid_form("recipient_id", "NUMBER_TYPE_COERCE", "Value is not snowflake.")
        return 200, self._channels[self.add_dm_channel(recipient)]

    def _get_channel(self, call: Call, channel_id: str) -> tuple[int, Any]:
        return 200, copy.deepcopy(self._channel_or_404(channel_id))

    def _trigger_typing(self, call: Call, channel_id: str) -> tuple[int, Any]:
        self._channel_or_404(channel_id)
        return 204, None

    # ----------------------------------------------------------------- REST: messages

    def _create_message(self, call: Call, channel_id: str) -> tuple[int, Any]:
        channel = self._channel_or_404(channel_id)
        payload = call.json or {}
        nonce = payload.get("nonce") if payload.get("enforce_nonce") else None
        if nonce is not None and (channel["id"], nonce) in self._nonces:
            # As Discord does for a few minutes: the same nonce gets the message it made.
            earlier = self._messages.get(int(self._nonces[channel["id"], nonce]))
            if earlier is not None:
                return 200, copy.deepcopy(earlier)
        message = self._new_message(channel, self.bot_user, "")
        if nonce is not None:
            message["nonce"] = nonce
            self._nonces[channel["id"], nonce] = message["id"]
        reference = payload.get("message_reference")
        if reference is not None:
            referenced = self._messages.get(int(reference.get("message_id", 0)))
            if referenced is not None and referenced["channel_id"] == channel["id"]:
                self._make_reply(message, referenced)
            elif reference.get("fail_if_not_exists", True):
                raise invalid_form(
                    "message_reference",
                    "MESSAGE_REFERENCE_UNKNOWN_MESSAGE",
                    "Unknown message",
                )
        self._apply_content(message, payload, call.files)
        self._publish(message)
        return 200, copy.deepcopy(message)

    def _get_messages(self, call: Call, channel_id: str) -> tuple[int, Any]:
        """A channel's history, newest first as Discord sends it: with ``after``, the oldest
        ``limit`` (1 to 100, default 50) messages after it; else the newest before ``before``."""
        self._channel_or_404(channel_id)
        limit = int(call.query.get("limit", 50))
        if not 1 <= limit <= 100:
            raise invalid_form("limit", "NUMBER_TYPE_MAX", "limit must be between 1 and 100")
        after, before = int(call.query.get("after", 0)), call.query.get("before")
        found = sorted(
            id_
            for id_, message in self._messages.items()
            if message["channel_id"] == channel_id
            and not message.get("flags", 0) & EPHEMERAL
            and id_ > after
            and (before is None or id_ < int(before))
        )
        chosen = found[:limit] if "after" in call.query else found[-limit:]
        return 200, [copy.deepcopy(self._messages[id_]) for id_ in reversed(chosen)]

    def _get_message(self, call: Call, channel_id: str, message_id: str) -> tuple[int, Any]:
        return 200, copy.deepcopy(self._message_or_404(channel_id, message_id))

    def _edit_message(self, call: Call, channel_id: str, message_id: str) -> tuple[int, Any]:
        message = self._message_or_404(channel_id, message_id)
        if message["author"]["id"] != self.bot_user["id"]:
            raise DiscordError(403, 50005, "Cannot edit a message authored by another user")
        self._edit(message, call.json or {}, call.files)
        return 200, copy.deepcopy(message)

    def _delete_message(self, call: Call, channel_id: str, message_id: str) -> tuple[int, Any]:
        self._delete(self._message_or_404(channel_id, message_id))
        return 204, None

    def _new_message(
        self, channel: Mapping[str, Any], author: Mapping[str, Any], content: str
    ) -> ApiObject:
        return {
            "id": str(self._snowflake()),
            "channel_id": channel["id"],
            "author": dict(author),
            "content": content,
            "timestamp": _now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": self._mentioned_users(content),
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "components": [],
            "pinned": False,
            "type": MESSAGE_DEFAULT,
            "flags": 0,
        }

    def _make_reply(self, message: ApiObject, referenced: Mapping[str, Any]) -> None:
        channel = self._channels[int(referenced["channel_id"])]
        message["type"] = MESSAGE_REPLY
        message["message_reference"] = {
            "type": 0,
            "message_id": referenced["id"],
            "channel_id": referenced["channel_id"],
            **({"guild_id": channel["guild_id"]} if "guild_id" in channel else {}),
        }
        message["referenced_message"] = {
            k: copy.deepcopy(v) for k, v in referenced.items() if k != "referenced_message"
        }
        if all(user["id"] != referenced["author"]["id"] for user in message["mentions"]):
            message["mentions"].append(dict(referenced["author"]))

    def _mentioned_users(self, content: str) -> list[ApiObject]:
        ids = dict.fromkeys(int(found) for found in _USER_MENTION.findall(content))
        return [dict(self._users[i]) for i in ids if i in self._users]

    def _apply_content(
        self, message: ApiObject, payload: Mapping[str, Any], files: Sequence[UploadedFile]
    ) -> None:
        """Set what ``payload`` sends, checked as Discord checks it."""
        if "content" in payload:
            content = payload["content"] or ""
            if len(content) > MESSAGE_CONTENT_LIMIT:
                raise invalid_form(
                    "content",
                    "BASE_TYPE_MAX_LENGTH",
                    f"Must be {MESSAGE_CONTENT_LIMIT} or fewer in length.",
                )
            message["content"] = content
            message["mentions"] = self._mentioned_users(content)
        if "embeds" in payload:
            message["embeds"] = list(payload["embeds"] or [])
        if "components" in payload:
            message["components"] = _checked_components(payload["components"] or [])
        if "attachments" in payload or files:
            message["attachments"] = self._attachments(payload, files, message["attachments"])
        if "flags" in payload:
            keep = message["flags"] & (EPHEMERAL | LOADING)
            message["flags"] = keep | (int(payload["flags"] or 0) & ~(EPHEMERAL | LOADING))
        if not any(message[key] for key in ("content", "embeds", "components", "attachments")):
            raise DiscordError(400, 50006, "Cannot send an empty message")

    def _attachments(
        self,
        payload: Mapping[str, Any],
        files: Sequence[UploadedFile],
        current: Sequence[ApiObject],
    ) -> list[ApiObject]:
        uploads: dict[int, UploadedFile] = {}
        for upload in files:
            found = _UPLOAD_FIELD.fullmatch(upload.field)
            if found:
                uploads[int(found.group(1))] = upload
        if "attachments" not in payload:
            return [*current, *(self._store_upload(u, {}) for u in uploads.values())]
        result = []
        for index, entry in enumerate(payload["attachments"] or []):
            key = int(entry["id"])
            kept = next((a for a in current if int(a["id"]) == key), None)
            if key in uploads:
                result.append(self._store_upload(uploads[key], entry))
            elif kept is not None:
                result.append(kept)
            else:
                raise invalid_form(
                    f"attachments.{index}", "ATTACHMENT_NOT_FOUND", "Unknown attachment"
                )
        return result

    def _store_upload(self, upload: UploadedFile, entry: Mapping[str, Any]) -> ApiObject:
        if len(upload.data) > ATTACHMENT_SIZE_LIMIT:
            raise DiscordError(413, 40005, "Request entity too large")
        filename = entry.get("filename") or upload.filename or "file"
        attachment = self.add_file(upload.data, filename)
        if entry.get("description"):
            attachment["description"] = entry["description"]
        return attachment

    def _edit(
        self, message: ApiObject, payload: Mapping[str, Any], files: Sequence[UploadedFile]
    ) -> None:
        self._apply_content(message, payload, files)
        if message["flags"] & LOADING:
            message["flags"] &= ~LOADING  # the deferral's "thinking..." is replaced
        else:
            message["edited_timestamp"] = _now()
        if not message["flags"] & EPHEMERAL:
            self._dispatch_message("MESSAGE_UPDATE", message)

    def _delete(self, message: ApiObject) -> None:
        del self._messages[int(message["id"])]
        if message["flags"] & EPHEMERAL:
            return
        data = {"id": message["id"], "channel_id": message["channel_id"]}
        self._dispatch_message("MESSAGE_DELETE", data)

    def _publish(self, message: ApiObject) -> None:
        self._messages[int(message["id"])] = message
        self._channels[int(message["channel_id"])]["last_message_id"] = message["id"]
        guild_id = self._channels[int(message["channel_id"])].get("guild_id")
        if guild_id is not None:
            self._join(int(guild_id), message["author"])
        if not message["flags"] & EPHEMERAL:  # ephemeral messages reach only the user
            self._dispatch_message("MESSAGE_CREATE", message)

    # ----------------------------------------------------------------- REST: interactions

    def _callback(self, call: Call, interaction_id: str, token: str) -> tuple[int, Any]:
        record = self._interactions.get(int(interaction_id))
        if record is None or record.payload["token"] != token:
            raise _unknown("interaction", 10062)
        if record.acknowledged_at is not None:
            raise DiscordError(400, 40060, "Interaction has already been acknowledged.")
        now = time.monotonic()
        if now - (record.dispatched_at or record.created_at) > self.ack_deadline_s:
            raise _unknown("interaction", 10062)  # the 3-second window has passed
        body = call.json or {}
        callback_type = body.get("type")
        if callback_type not in _CALLBACKS_ALLOWED[record.payload["type"]]:
            raise invalid_form("type", "BASE_TYPE_CHOICES", "Value must be one of a valid type.")
        if callback_type in (6, 7) and "message" not in record.payload:
            raise invalid_form("type", "INTERACTION_NO_MESSAGE", "This interaction has no message.")
        data = body.get("data") or {}
        resource = self._respond(record, callback_type, data, call.files)
        record.acknowledged_at = now
        record.responses.append(copy.deepcopy(body))
        original = (
            None
            if record.original_message_id is None
            else self._messages.get(record.original_message_id)
        )
        answer: ApiObject = {
            "interaction": {
                "id": str(record.payload["id"]),
                "type": record.payload["type"],
                "response_message_loading": callback_type == 5,
                "response_message_ephemeral": bool(original and original["flags"] & EPHEMERAL),
            }
        }
        if original is not None:
            answer["interaction"]["response_message_id"] = original["id"]
        if resource is not None:
            answer["resource"] = {"type": callback_type, "message": copy.deepcopy(resource)}
        return 200, answer

    def _respond(
        self,
        record: _Interaction,
        callback_type: int,
        data: Mapping[str, Any],
        files: Sequence[UploadedFile],
    ) -> ApiObject | None:
        if callback_type == CallbackType.MODAL:
            self._open_modal(record, data)
            return None
        if callback_type in (CallbackType.DEFERRED_UPDATE_MESSAGE, CallbackType.UPDATE_MESSAGE):
            message = self._messages[int(record.payload["message"]["id"])]
            record.original_message_id = int(message["id"])
            if callback_type == CallbackType.DEFERRED_UPDATE_MESSAGE:
                return None
            self._edit(message, data, files)
            return message
        loading = callback_type == CallbackType.DEFERRED_CHANNEL_MESSAGE
        message = self._interaction_message(record, data, files, loading=loading)
        if loading:
            message["flags"] |= LOADING
            record.original_is_loading = True
        if record.payload["type"] == InteractionType.APPLICATION_COMMAND:
            message["type"] = MESSAGE_CHAT_INPUT_COMMAND
        record.original_message_id = int(message["id"])
        self._publish(message)
        return message

    def _interaction_message(
        self,
        record: _Interaction,
        data: Mapping[str, Any],
        files: Sequence[UploadedFile],
        *,
        loading: bool = False,
    ) -> ApiObject:
        message = self._new_message(self._channels[record.channel_id], self.bot_user, "")
        message["flags"] = int(data.get("flags") or 0) & EPHEMERAL
        message["webhook_id"] = str(self.application_id)
        message["application_id"] = str(self.application_id)
        message["interaction_metadata"] = {
            "id": str(record.payload["id"]),
            "type": record.payload["type"],
            "user": _interaction_user(record.payload),
            "authorizing_integration_owners": record.payload["authorizing_integration_owners"],
        }
        if not loading:
            self._apply_content(message, data, files)
        return message

    def _open_modal(self, record: _Interaction, data: Mapping[str, Any]) -> None:
        custom_id = str(data.get("custom_id") or "")
        if not 1 <= len(custom_id) <= CUSTOM_ID_LIMIT:
            raise invalid_form(
                "data.custom_id", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
            )
        if not 1 <= len(str(data.get("title") or "")) <= MODAL_TITLE_LIMIT:
            raise invalid_form(
                "data.title", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 45 in length."
            )
        components = list(data.get("components") or [])
        if not 1 <= len(components) <= MODAL_COMPONENTS_LIMIT:
            raise invalid_form(
                "data.components", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length."
            )
        message = record.payload.get("message")
        self._modals.append(
            _OpenModal(
                custom_id,
                copy.deepcopy(components),
                int(_interaction_user(record.payload)["id"]),
                record.channel_id,
                None if message is None else int(message["id"]),
            )
        )

    def _execute_webhook(self, call: Call, application_id: str, token: str) -> tuple[int, Any]:
        record = self._interaction_for_webhook(application_id, token)
        payload = call.json or {}
        if record.original_is_loading and record.original_message_id is not None:
            # The first follow-up after a thinking deferral replaces the "thinking..." message.
            message = self._messages[record.original_message_id]
            record.original_is_loading = False
            self._edit(message, payload, call.files)
        else:
            message = self._interaction_message(record, payload, call.files)
            self._publish(message)
            record.followup_ids.append(int(message["id"]))
        if call.query.get("wait", "").lower() not in ("1", "true"):
            return 204, None
        return 200, copy.deepcopy(message)

    def _get_webhook_message(
        self, call: Call, application_id: str, token: str, message_id: str = "@original"
    ) -> tuple[int, Any]:
        return 200, copy.deepcopy(self._webhook_message(application_id, token, message_id))

    def _edit_webhook_message(
        self, call: Call, application_id: str, token: str, message_id: str = "@original"
    ) -> tuple[int, Any]:
        record = self._interaction_for_webhook(application_id, token)
        message = self._webhook_message(application_id, token, message_id)
        if int(message["id"]) == record.original_message_id:
            record.original_is_loading = False
        self._edit(message, call.json or {}, call.files)
        return 200, copy.deepcopy(message)

    def _delete_webhook_message(
        self, call: Call, application_id: str, token: str, message_id: str = "@original"
    ) -> tuple[int, Any]:
        self._delete(self._webhook_message(application_id, token, message_id))
        return 204, None

    def _interaction_for_webhook(self, application_id: str, token: str) -> _Interaction:
        record = next((r for r in self._interactions.values() if r.payload["token"] == token), None)
        if record is None or application_id != str(self.application_id):
            raise _unknown("Webhook", 10015)
        if record.acknowledged_at is None:
            raise _unknown("Webhook", 10015)  # no follow-ups before the acknowledgement
        return record

    def _webhook_message(self, application_id: str, token: str, message_id: str) -> ApiObject:
        record = self._interaction_for_webhook(application_id, token)
        wanted = record.original_message_id if message_id == "@original" else int(message_id)
        allowed = {record.original_message_id, *record.followup_ids}
        if wanted is None or wanted not in allowed or wanted not in self._messages:
            raise _unknown("Message", 10008)
        return self._messages[wanted]

    def _start_interaction(
        self,
        interaction_type: InteractionType,
        data: ApiObject,
        user: Mapping[str, Any],
        channel_id: int,
        message: Mapping[str, Any] | None = None,
    ) -> ApiObject:
        channel = self._channel(channel_id)
        guild_id = channel.get("guild_id")
        payload: ApiObject = {
            "id": str(self._snowflake()),
            "application_id": str(self.application_id),
            "type": int(interaction_type),
            "data": data,
            "channel": copy.deepcopy(channel),
            "channel_id": channel["id"],
            "token": f"emulated.{secrets.token_urlsafe(24)}",
            "version": 1,
            "app_permissions": str(ALL_PERMISSIONS),
            "locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": guild_id or "0"},
            "context": 0 if guild_id else 1,  # GUILD or BOT_DM
            "attachment_size_limit": ATTACHMENT_SIZE_LIMIT,
        }
        if guild_id is not None:
            member = self._join(int(guild_id), user)
            payload["guild_id"] = guild_id
            payload["guild"] = {"id": guild_id, "locale": "en-US", "features": []}
            payload["guild_locale"] = "en-US"
            payload["member"] = {**member, "user": dict(user), "permissions": str(ALL_PERMISSIONS)}
        else:
            payload["user"] = dict(user)
        if message is not None:
            payload["message"] = copy.deepcopy(dict(message))
        self._interactions[int(payload["id"])] = _Interaction(payload, channel_id, time.monotonic())
        self._dispatch("INTERACTION_CREATE", payload, 0)
        return copy.deepcopy(payload)

    # ----------------------------------------------------------------- REST: commands

    def _overwrite_commands(
        self, call: Call, application_id: str, guild_id: str | None = None
    ) -> tuple[int, Any]:
        scope = self._command_scope(application_id, guild_id)
        commands = call.json
        if not isinstance(commands, list) or len(commands) > COMMANDS_LIMIT:
            raise invalid_form("_root", "BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer in length.")
        existing = {(c["name"], c["type"]): c for c in self._commands.get(scope, [])}
        registered = []
        for index, command in enumerate(commands):
            _check_command(command, str(index))
            command_type = command.get("type", 1)
            kept = existing.get((command["name"], command_type))
            entry: ApiObject = {
                "default_member_permissions": None,
                "nsfw": False,
                **command,
                "id": kept["id"] if kept else str(self._snowflake()),
                "application_id": str(self.application_id),
                "type": command_type,
                "version": str(self._snowflake()),
            }
            if scope is not None:
                entry["guild_id"] = str(scope)
            registered.append(entry)
        self._commands[scope] = registered
        return 200, copy.deepcopy(registered)

    def _get_commands(
        self, call: Call, application_id: str, guild_id: str | None = None
    ) -> tuple[int, Any]:
        return 200, self.commands(self._command_scope(application_id, guild_id))

    def _command_scope(self, application_id: str, guild_id: str | None) -> int | None:
        if application_id != str(self.application_id):
            raise DiscordError(403, 50001, "Missing Access")
        if guild_id is None:
            return None
        if int(guild_id) not in self._guilds:
            raise DiscordError(403, 50001, "Missing Access")
        return int(guild_id)

    def _registered_command(self, name: str, guild_id: str | None) -> ApiObject:
        scopes: list[int | None] = [None] if guild_id is None else [int(guild_id), None]
        for scope in scopes:
            for command in self._commands.get(scope, []):
                if command["name"] == name and command["type"] == 1:
                    return command
        raise ValueError(f"no slash command /{name} is registered for this channel")

    # ----------------------------------------------------------------- lookups

    def _channel(self, channel_id: int) -> ApiObject:
        channel = self._channels.get(channel_id)
        if channel is None:
            raise ValueError(f"no channel {channel_id}; add it with add_channel first")
        return channel

    def _channel_or_404(self, channel_id: str) -> ApiObject:
        channel = self._channels.get(int(channel_id))
        if channel is None:
            raise _unknown("Channel", 10003)
        return channel

    def _message_or_404(self, channel_id: str, message_id: str) -> ApiObject:
        self._channel_or_404(channel_id)
        message = self._messages.get(int(message_id))
        if message is None or message["channel_id"] != channel_id:
            raise _unknown("Message", 10008)
        return message

    def _join(self, guild_id: int, user: Mapping[str, Any]) -> ApiObject:
        members = self._members[guild_id]
        member = members.get(int(user["id"]))
        if member is None:
            member = {
                "user": dict(user),
                "roles": [],
                "nick": None,
                "joined_at": _now(),
                "deaf": False,
                "mute": False,
                "pending": False,
                "flags": 0,
            }
            members[int(user["id"])] = member
        return {k: copy.deepcopy(v) for k, v in member.items() if k != "user"}

    def _snowflake(self) -> int:
        now = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last_snowflake = max(self._last_snowflake + 1, now)
        return self._last_snowflake

    # ----------------------------------------------------------------- gateway

    async def _serve_gateway(self, request: web.Request) -> web.StreamResponse:
        # discord.py asks for compress=zlib-stream, but it decompresses only binary frames;
        # text frames are read as plain JSON, so the emulator sends only those.
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        connection = _Connection(socket)
        self._connections.add(connection)
        try:
            hello = {"heartbeat_interval": HEARTBEAT_INTERVAL_MS, "_trace": ["emulator"]}
            await connection.send({"op": Op.HELLO, "s": None, "t": None, "d": hello})
            async for received in socket:
                if received.type is not WSMsgType.TEXT:
                    continue
                frame = json.loads(received.data)
                self._received.append(frame)
                await self._handle_frame(connection, frame)
                self._notify()
        finally:
            self._end_connection(connection)
        return socket

    async def _handle_frame(self, connection: _Connection, frame: Mapping[str, Any]) -> None:
        op, data = frame.get("op"), frame.get("d")
        if op == Op.HEARTBEAT:
            await connection.send({"op": Op.HEARTBEAT_ACK, "s": None, "t": None, "d": None})
        elif op == Op.IDENTIFY:
            await self._identify(connection, data or {})
        elif op == Op.RESUME:
            await self._resume(connection, data or {})
        elif op == Op.REQUEST_GUILD_MEMBERS and connection.session is not None:
            guild_id = int((data or {})["guild_id"])
            chunk = {
                "guild_id": str(guild_id),
                "members": [copy.deepcopy(m) for m in self._members.get(guild_id, {}).values()],
                "chunk_index": 0,
                "chunk_count": 1,
                "nonce": (data or {}).get("nonce"),
            }
            self._append(connection.session, "GUILD_MEMBERS_CHUNK", chunk, Intent.GUILD_MEMBERS)

    async def _identify(self, connection: _Connection, data: Mapping[str, Any]) -> None:
        if data.get("token") != self.token:
            await connection.socket.close(code=4004, message=b"Authentication failed.")
            return
        if connection.session is not None:
            await connection.socket.close(code=4005, message=b"Already authenticated.")
            return
        intents = int(data.get("intents", 0))
        if intents & Intent.MESSAGE_CONTENT and not self.message_content_enabled:
            await connection.socket.close(code=4014, message=b"Disallowed intent(s).")
            return
        if self._session is not None:
            self._session.wakeup.set()  # its pump, if any, sees it is replaced and stops
        session = _Session(secrets.token_hex(16), intents, socket=connection.socket)
        self._session = session
        ready: ApiObject = {
            "v": API_VERSION,
            "user": dict(self.bot_user),
            "guilds": [{"id": str(g), "unavailable": True} for g in self._guilds],
            "session_id": session.session_id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": self._application_flags()},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
            "user_settings": {},
            "_trace": ["emulator"],
        }
        if "shard" in data:
            ready["shard"] = data["shard"]
        self._append(session, "READY", ready, 0)
        for guild_id in self._guilds:
            # unavailable=False: a guild from READY becoming available, not a new join.
            guild = {**self._guild_create(guild_id, intents), "unavailable": False}
            self._append(session, "GUILD_CREATE", guild, Intent.GUILDS)
        undelivered, self._undelivered = self._undelivered, []
        for event, event_data, intent in undelivered:
            self._append(session, event, event_data, intent)
        self._start_pump(connection, session, 0)

    async def _resume(self, connection: _Connection, data: Mapping[str, Any]) -> None:
        session = self._session
        if (
            session is None
            or data.get("session_id") != session.session_id
            or data.get("token") != self.token
        ):
            frame = {"op": Op.INVALID_SESSION, "s": None, "t": None, "d": False}
            await connection.send(frame)
            return
        session.socket = connection.socket
        session.wakeup.set()  # a previous connection's pump stops
        cursor = min(int(data.get("seq") or 0), len(session.events))
        self._append(session, "RESUMED", {"_trace": ["emulator"]}, 0)
        self._start_pump(connection, session, cursor)

    def _start_pump(self, connection: _Connection, session: _Session, cursor: int) -> None:
        connection.session = session
        connection.pump = asyncio.create_task(self._pump(connection, session, cursor))

    async def _pump(self, connection: _Connection, session: _Session, cursor: int) -> None:
        """Send the session's events from ``cursor`` on, in order, as they are appended."""
        while self._session is session and session.socket is connection.socket:
            while cursor < len(session.events):
                frame = session.events[cursor]
                if frame["t"] == "INTERACTION_CREATE":
                    record = self._interactions[int(frame["d"]["id"])]
                    record.dispatched_at = record.dispatched_at or time.monotonic()
                try:
                    await connection.send(frame)
                except ConnectionError:
                    return
                cursor += 1
                self._notify()
            session.wakeup.clear()
            await session.wakeup.wait()

    def _end_connection(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        if connection.pump is not None:
            connection.pump.cancel()
        session = connection.session
        if session is not None and session.socket is connection.socket:
            session.socket = None
            # A clean close ends the session: it cannot be resumed, and later events wait
            # for the next IDENTIFY.
            clean = not connection.dropped and connection.socket.close_code in (1000, 1001)
            if clean and self._session is session:
                self._session = None
        self._notify()

    def _dispatch(self, event: str, data: ApiObject, intent: int) -> None:
        """Send an event to the connected client, or keep it for the next one."""
        if self._session is None:
            self._undelivered.append((event, copy.deepcopy(data), intent))
            return
        self._append(self._session, event, data, intent)

    def _dispatch_message(self, event: str, message: Mapping[str, Any]) -> None:
        channel = self._channels[int(message["channel_id"])]
        data = copy.deepcopy(dict(message))
        guild_id = channel.get("guild_id")
        if guild_id is None:
            self._dispatch(event, data, Intent.DIRECT_MESSAGES)
            return
        data["guild_id"] = guild_id
        if "author" in data:
            data["member"] = self._join(int(guild_id), data["author"])
        self._dispatch(event, data, Intent.GUILD_MESSAGES)

    def _append(self, session: _Session, event: str, data: ApiObject, intent: int) -> None:
        if intent and not session.intents & intent:
            return
        if event in ("MESSAGE_CREATE", "MESSAGE_UPDATE"):
            data = self._as_seen_by(session.intents, data)
        sequence = len(session.events) + 1
        session.events.append({"op": Op.DISPATCH, "s": sequence, "t": event, "d": data})
        session.wakeup.set()

    def _guild_create(self, guild_id: int, intents: int) -> ApiObject:
        members = list(self._members[guild_id].values())
        visible = (
            members
            if intents & Intent.GUILD_MEMBERS
            else [m for m in members if m["user"]["id"] == self.bot_user["id"]]
        )
        channels = [
            {k: v for k, v in c.items() if k != "guild_id"}
            for c in self._channels.values()
            if c.get("guild_id") == str(guild_id)
        ]
        return copy.deepcopy(
            {
                **self._guilds[guild_id],
                "large": False,
                "member_count": len(members),
                "joined_at": _now(),
                "channels": channels,
                "members": visible,
                "threads": [],
                "presences": [],
                "voice_states": [],
                "stage_instances": [],
                "guild_scheduled_events": [],
                "soundboard_sounds": [],
            }
        )

    def _as_seen_by(self, intents: int, message: ApiObject) -> ApiObject:
        """Without MESSAGE_CONTENT, a guild message that is not the bot's and does not
        mention it arrives without content, embeds, attachments or components."""
        if intents & Intent.MESSAGE_CONTENT or "guild_id" not in message:
            return message
        author_id = message.get("author", {}).get("id")
        mentioned = any(u["id"] == self.bot_user["id"] for u in message.get("mentions", []))
        if author_id == self.bot_user["id"] or mentioned:
            return message
        return {**message, "content": "", "embeds": [], "attachments": [], "components": []}


# --------------------------------------------------------------------- wire format


def _template_pattern(template: str) -> re.Pattern[str]:
    parts = []
    for segment in template.split("/"):
        name = segment[1:-1] if segment.startswith("{") else None
        if name is None:
            parts.append(re.escape(segment))
        else:
            parts.append(f"(?P<{name}>\\d+)" if name.endswith("_id") else f"(?P<{name}>[^/]+)")
    return re.compile("/".join(parts))


def _json_response(status: int, body: Any, headers: Mapping[str, str]) -> web.Response:
    if status == 204:
        return web.Response(status=204, headers=headers)
    # Exactly "application/json": discord.py decodes JSON only on that exact header, and
    # aiohttp's json_response would add "; charset=utf-8".
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        headers={**headers, "Content-Type": "application/json"},
    )


async def _read_body(request: web.Request) -> tuple[Any, list[UploadedFile]]:
    """The JSON body, or a multipart body's ``payload_json`` and file parts."""
    if request.content_type == "multipart/form-data":
        payload, files = None, []
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):  # a nested multipart; Discord has none
                continue
            data = bytes(await part.read())
            if part.name == "payload_json":
                payload = json.loads(data)
            else:
                content_type = part.headers.get("Content-Type")
                files.append(UploadedFile(part.name or "", part.filename, content_type, data))
        return payload, files
    if not request.can_read_body:
        return None, []
    text = await request.text()
    try:
        return json.loads(text), []
    except ValueError:
        raise DiscordError(400, 50109, "The request body contains invalid JSON.") from None


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _walk(components: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    """Every component, nested ones included (rows, sections, containers, labels)."""
    for component in components:
        yield component
        yield from _walk(component.get("components", []))
        for key in ("accessory", "component"):
            if key in component:
                yield from _walk([component[key]])


def _checked_components(components: Sequence[Mapping[str, Any]]) -> list[ApiObject]:
    """Components as sent, after Discord's checks on rows, custom_ids and labels."""
    if len(components) > ACTION_ROWS_LIMIT and all(c.get("type") == 1 for c in components):
        raise invalid_form("components", "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
    seen: set[str] = set()
    for row_index, row in enumerate(components):
        children = row.get("components", [])
        if row.get("type") == 1 and not 1 <= len(children) <= ROW_COMPONENTS_LIMIT:
            raise invalid_form(
                f"components.{row_index}.components",
                "BASE_TYPE_BAD_LENGTH",
                "Must be between 1 and 5 in length.",
            )
        for index, component in enumerate(_walk(children)):
            where = f"components.{row_index}.components.{index}"
            custom_id = component.get("custom_id")
            if custom_id is not None:
                if not 1 <= len(custom_id) <= CUSTOM_ID_LIMIT:
                    raise invalid_form(
                        f"{where}.custom_id",
                        "BASE_TYPE_BAD_LENGTH",
                        f"Must be between 1 and {CUSTOM_ID_LIMIT} in length.",
                    )
                if custom_id in seen:
                    raise invalid_form(
                        f"{where}.custom_id",
                        "COMPONENT_CUSTOM_ID_DUPLICATED",
                        "Component custom id cannot be duplicated",
                    )
                seen.add(custom_id)
            if len(component.get("label") or "") > BUTTON_LABEL_LIMIT:
                raise invalid_form(
                    f"{where}.label", "BASE_TYPE_MAX_LENGTH", "Must be 80 or fewer in length."
                )
    return [copy.deepcopy(dict(c)) for c in components]


def _submitted(
    component: Mapping[str, Any], values: Mapping[str, str], unused: set[str]
) -> ApiObject:
    """A modal component as its submission carries it, with the user's values."""
    kind = component["type"]
    out: ApiObject = {"type": kind}
    if "id" in component:
        out["id"] = component["id"]
    if kind == 1:
        out["components"] = [_submitted(c, values, unused) for c in component["components"]]
    elif kind == 18:  # a label wrapping one input
        out["component"] = _submitted(component["component"], values, unused)
    elif kind == 4:  # a text input
        custom_id = component["custom_id"]
        value = values.get(custom_id, "")
        unused.discard(custom_id)
        if component.get("required", True) and not value:
            raise ValueError(f"text input {custom_id!r} is required")
        if not component.get("min_length", 0) <= len(value) <= component.get("max_length", 4000):
            raise ValueError(f"text input {custom_id!r} does not allow {len(value)} characters")
        out.update(custom_id=custom_id, value=value)
    return out


def _check_command(command: Mapping[str, Any], where: str) -> None:
    name = str(command.get("name", ""))
    if not _COMMAND_NAME.fullmatch(name) or name != name.lower():
        raise invalid_form(
            f"{where}.name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid"
        )
    if command.get("type", 1) == 1:
        description = str(command.get("description", ""))
        if not 1 <= len(description) <= COMMAND_DESCRIPTION_LIMIT:
            raise invalid_form(
                f"{where}.description",
                "BASE_TYPE_BAD_LENGTH",
                "Must be between 1 and 100 in length.",
            )
    for index, option in enumerate(command.get("options", [])):
        # Options need a name and a description like chat-input commands.
        _check_command({**option, "type": 1}, f"{where}.options.{index}")


def _interaction_user(payload: Mapping[str, Any]) -> ApiObject:
    return dict(payload["member"]["user"] if "member" in payload else payload["user"])
