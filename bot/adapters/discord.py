"""The Discord bot: discord.py 2.7 translating messages and interactions to and from `bot.core`.

People ask with a photo in a DM, or in a server channel when the message mentions or replies
to the bot, or with `/dish`. Discord wants every interaction answered within 3 seconds:
slash commands and the ✏️ form are deferred at once and answered with follow-ups; a button
press is answered by core (an ephemeral notice, or the ✏️ form) and deferred by the adapter
only if core is about to miss the deadline. Buttons are `DynamicItem`s whose custom_id is
core's button data, and the form is routed by its custom_id, so both keep working on
messages sent before a restart. discord.py itself waits out and retries a 429, and a 500,
502, 504 or 524 (five tries, seconds apart); the port retries what still fails on the way
(other 5xx, resets, timeouts) where that cannot show a message twice: edits always, channel
messages under a nonce Discord enforces, interaction follow-ups only when they surely did
not arrive.

A message that reaches the bot is kept in the store's inbox (its channel and id) until its
handling ends: the gateway never delivers it again, so the next start `replay`s what a
process that died left there, fetching the message over REST. Interactions (slash commands,
presses, the form) are not kept: their tokens expire after 15 minutes, and the user sees
Discord's "the application did not respond" and can try again.

A message the gateway wrote to a connection that died before the bot read it never reached
the inbox, and Discord does not deliver it to the next session. So once connected, the bot
`catch_up`s in the background: it reads the channels it was asked in within the last hour
for photos from people sent after the newest question it stored there, and handles them.
The dialog does not ask twice what it stored, so one read twice is answered once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mimetypes
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket

from bot.core import buttons
from bot.core.admin import ADMIN_COMMANDS
from bot.core.dialog import MAX_CORRECTION_LENGTH, Dialog
from bot.core.events import (
    ButtonPress,
    Command,
    CorrectionSubmitted,
    Event,
    NotAPhoto,
    Person,
    PhotoFile,
    PhotoQuestion,
    Place,
    TextMessage,
)
from bot.core.i18n import language_of, say
from bot.core.inbox import Inbox
from bot.core.limits import (
    DISCORD_ACK_SECONDS,
    DISCORD_CHANNEL_CALLS,
    DISCORD_MESSAGE_LENGTH,
    DISCORD_OVERALL_CALLS,
    CallLimit,
)
from bot.core.port import Button, DeliveryUnknown, MessageGone
from bot.errors import ConfigError, DishbotError
from bot.settings import DiscordSettings
from bot.store import InboxRecord

log = logging.getLogger(__name__)

PLATFORM = "discord"
TYPING_INTERVAL_S = 8.0  # Discord shows "typing…" for ten seconds
ACK_MARGIN_S = 1.0  # a slow button press is deferred this long before Discord's deadline
READY_TIMEOUT_S = 60.0  # from connecting to the gateway until the servers are loaded
STOP_GRACE_S = 10.0  # how long answers in progress may take to finish when the bot stops
CORRECTION_FIELD = "correction"  # custom_id of the ✏️ form's one text field
# discord.py has no timeout of its own for a REST call (aiohttp's is five minutes). This one
# covers the whole call, discord.py's own retries of a 5xx included (1 + 3 + 5 + 7 + 9 s), so
# a follow-up is not taken for lost while discord.py is still waiting to try it again.
REQUEST_TIMEOUT_S = 40.0
CALL_RETRY_PAUSES_S = (0.5, 1.0, 2.0, 4.0)  # after a call failed on the way
# Catching up at start (`DiscordAdapter.catch_up`): the channels asked in this recently, at
# most this many of them (the most recent first), and this many messages read in each.
CATCH_UP_WINDOW = timedelta(hours=1)
CATCH_UP_CHANNELS = 50
CATCH_UP_MESSAGES = 50

# Slash commands besides /dish; each becomes the core `Command` of the same name.
COMMANDS = {
    "help": "How to use dishbot",
    "cancel": "Drop your questions still waiting",
    "forget": "Delete everything stored about you",
    # Listed for everyone; core refuses them to anyone not named in DISHBOT_ADMINS.
    "stats": "Admins: the engine's queue, load and latency",
    "export": "Admins: export the feedback as XTuner training data",
    "models": "Admins: the model versions and their evaluation",
    "rollback": "Admins: serve the previous model version again",
}
RETRAIN_ACTIONS = ("force", "cancel")
# An answer notifies the person it replies to; nothing in an answer's text pings anyone.
ALLOWED_MENTIONS = discord.AllowedMentions(
    everyone=False, users=False, roles=False, replied_user=True
)
MESSAGE_CONTENT_OFF = (
    'Discord refused the message content intent: turn on "Message Content Intent" on the Bot '
    "tab of this application in the Discord Developer Portal "
    "(https://discord.com/developers/applications), then start dishbot again"
)

PressHandler = Callable[["discord.Interaction[Any]", str], Awaitable[None]]
T = TypeVar("T")
# Failures on the way, not refusals: a 5xx (after discord.py's own retries), a connection
# refused, reset or closed before an answer, and no answer in time.
TRANSIENT = (discord.DiscordServerError, aiohttp.ClientError, TimeoutError)
# Of those, the ones that surely did not take effect: a 5xx answer, and no connection made.
# A connection reset or closed once the request may have been written (aiohttp cannot tell
# when), or no answer in time, leaves it unknown: Discord may be carrying it out.
NOT_DELIVERED = (
    discord.DiscordServerError,
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
)


async def _retrying(call: Callable[[], Awaitable[T]], *, repeatable: bool, timeout_s: float) -> T:
    """``call`` within ``timeout_s``, made again after transient failures: always when it is
    ``repeatable`` (an edit, a send under a nonce), else only when it surely did not take
    effect (`NOT_DELIVERED`); a send whose outcome is unknown raises `DeliveryUnknown`."""
    for pause in (*CALL_RETRY_PAUSES_S, None):
        try:
            return await asyncio.wait_for(call(), timeout_s)
        except TRANSIENT as error:
            if not repeatable and not isinstance(error, NOT_DELIVERED):
                raise DeliveryUnknown(f"no answer from Discord: {error!r}") from error
            if pause is None:
                raise
            log.warning("discord: %r; trying again in %g s", error, pause)
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")


class DiscordUnavailable(DishbotError):
    """The Discord gateway could not be reached."""


class DishbotClient(discord.Client):
    """discord.py's client, knowing where presses on dishbot's buttons go."""

    def __init__(self, press_handler: PressHandler, **options: Any) -> None:
        super().__init__(**options)
        self.press_handler = press_handler


class DishbotButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=re.escape(buttons.PREFIX) + r":.+",
):
    """One of core's buttons. Its custom_id is the button's data, so any message's buttons
    are recognised by pattern, whichever process sent them."""

    def __init__(self, label: str, data: str) -> None:
        super().__init__(
            discord.ui.Button(label=label, custom_id=data, style=discord.ButtonStyle.secondary)
        )
        self.data = data

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> DishbotButton:
        label = item.label if isinstance(item, discord.ui.Button) else None
        return cls(label or buttons.PREFIX, match.string)

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        client = interaction.client
        if isinstance(client, DishbotClient):
            await client.press_handler(interaction, self.data)


class CorrectionForm(discord.ui.Modal):
    """The ✏️ form: one text field. Its custom_id is the ✏️ button's data (naming the answer);
    the adapter reads submissions by custom_id, so they arrive even after a restart."""

    def __init__(self, exchange_id: int, title: str, label: str) -> None:
        super().__init__(title=title, custom_id=buttons.encode(buttons.Correct(exchange_id)))
        self.add_item(
            discord.ui.TextInput(
                label=label, custom_id=CORRECTION_FIELD, max_length=MAX_CORRECTION_LENGTH
            )
        )


class InteractionReply:
    """An interaction that replies go through (the `Place.context` of its events).

    Discord takes one response per interaction, then follow-ups through the interaction's
    webhook. The lock keeps a deferral and core's own response from both being sent.
    """

    def __init__(
        self,
        interaction: discord.Interaction[Any],
        *,
        ephemeral: bool,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.interaction = interaction
        self.ephemeral = ephemeral
        self.timeout_s = timeout_s
        self.sent: set[int] = set()  # follow-ups sent through it; edited through its webhook
        self._lock = asyncio.Lock()

    async def defer(self) -> None:
        """Acknowledge with "thinking…", unless it has been responded to already."""
        async with self._lock:
            if not self.interaction.response.is_done():
                await self.interaction.response.defer(ephemeral=self.ephemeral, thinking=True)

    async def notice(self, text: str) -> None:
        """A message only the user sees: the response, or a follow-up when too late for it."""
        async with self._lock:
            if not self.interaction.response.is_done():
                await self.interaction.response.send_message(text, ephemeral=True)
                return
        await self.interaction.followup.send(text, ephemeral=True)

    async def open_form(self, form: discord.ui.Modal) -> bool:
        """Respond with ``form``; False when it was responded to (a form must come first)."""
        async with self._lock:
            if self.interaction.response.is_done():
                return False
            await self.interaction.response.send_modal(form)
            return True

    async def send(self, text: str, view: discord.ui.View | None) -> int:
        """A follow-up; the first one after the deferral replaces its "thinking…"."""
        await self.defer()
        extra: dict[str, Any] = {} if view is None else {"view": view}
        # A webhook takes no nonce: a follow-up is sent again only if it surely did not arrive.
        message = await _retrying(
            lambda: self.interaction.followup.send(
                text, ephemeral=self.ephemeral, wait=True, **extra
            ),
            repeatable=False,
            timeout_s=self.timeout_s,
        )
        self.sent.add(message.id)
        return message.id


class DiscordPort:
    """`bot.core.port.ChatPort` over a discord.py client."""

    platform = PLATFORM
    message_limit = DISCORD_MESSAGE_LENGTH
    typing_interval_s = TYPING_INTERVAL_S
    answers_admin_commands_privately = True  # `DiscordAdapter._on_command`: ephemeral
    overall_call_limit = DISCORD_OVERALL_CALLS

    def __init__(self, client: discord.Client, *, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self._client = client
        self._timeout_s = timeout_s

    def text_length(self, text: str) -> int:
        return len(_plain(text))

    def call_limit(self, where: Place) -> CallLimit:
        return DISCORD_CHANNEL_CALLS

    async def send(
        self,
        where: Place,
        text: str,
        *,
        reply_to: str | None = None,
        buttons: Sequence[Button] = (),
    ) -> str:
        reply = _reply_of(where)
        if reply is not None:
            return str(await reply.send(_plain(text), _view(buttons)))
        options: dict[str, Any] = {}
        if reply_to is not None:
            # The user may have deleted their message meanwhile; answer anyway.
            options["reference"] = discord.MessageReference(
                message_id=int(reply_to), channel_id=int(where.chat_id), fail_if_not_exists=False
            )
        view = _view(buttons)
        if view is not None:
            options["view"] = view
        # Discord answers a send repeated under the same nonce with the message it made, so
        # a send whose answer was lost can be made again.
        nonce = secrets.randbits(63)
        message = await _retrying(
            lambda: self._channel(where).send(_plain(text), nonce=nonce, **options),
            repeatable=True,
            timeout_s=self._timeout_s,
        )
        return str(message.id)

    async def edit(
        self, where: Place, message_id: str, text: str, *, buttons: Sequence[Button] = ()
    ) -> None:
        await self._edit(where, message_id, content=_plain(text), view=_view(buttons))

    async def set_buttons(self, where: Place, message_id: str, buttons: Sequence[Button]) -> None:
        await self._edit(where, message_id, view=_view(buttons))

    async def typing(self, where: Place) -> None:
        if _reply_of(where) is not None:
            return  # the deferral's "thinking…" shows already
        await asyncio.wait_for(self._channel(where).typing(), self._timeout_s)

    async def acknowledge(self, press: ButtonPress, text: str) -> None:
        await _press_reply(press).notice(_plain(text))

    async def ask_for_correction(
        self, press: ButtonPress, exchange_id: int, prompt: str
    ) -> str | None:
        reply = _press_reply(press)
        language = language_of(press.who.language)
        title = say("ask_correction_title", language)
        form = CorrectionForm(exchange_id, title, say("correction_field", language))
        if not await reply.open_form(form):
            # The press was deferred, and a form must be the first response: offer a ✏️
            # that opens the form at once.
            pencil = Button(buttons.PENCIL, buttons.encode(buttons.Correct(exchange_id)))
            await reply.send(_plain(title), _view([pencil]))
        return None  # the form's submission arrives as CorrectionSubmitted

    def _channel(self, where: Place) -> discord.PartialMessageable:
        return self._client.get_partial_messageable(int(where.chat_id))

    async def _edit(self, where: Place, message_id: str, **changes: Any) -> None:
        reply = _reply_of(where)

        async def edit() -> None:
            if reply is not None and int(message_id) in reply.sent:
                await reply.interaction.followup.edit_message(int(message_id), **changes)
            else:
                await self._channel(where).get_partial_message(int(message_id)).edit(**changes)

        try:
            await _retrying(edit, repeatable=True, timeout_s=self._timeout_s)
        except discord.NotFound as exc:
            raise MessageGone(str(exc)) from exc


def _plain(text: str) -> str:
    # Core sends plain text; Discord would read * _ ~ ` | and more as markdown.
    return discord.utils.escape_markdown(text)


def _view(buttons: Sequence[Button]) -> discord.ui.View | None:
    if not buttons:
        return None
    view = discord.ui.View(timeout=None)
    for button in buttons:
        view.add_item(DishbotButton(button.label, button.data))
    return view


def _reply_of(where: Place) -> InteractionReply | None:
    return where.context if isinstance(where.context, InteractionReply) else None


def _press_reply(press: ButtonPress) -> InteractionReply:
    reply = _reply_of(press.where)
    if reply is None:
        raise TypeError("a Discord button press carries its interaction")
    return reply


class DiscordAdapter:
    """Runs a discord.py client that hands messages and interactions to the dialog."""

    def __init__(
        self,
        settings: DiscordSettings,
        dialog: Dialog,
        *,
        guild_ready_timeout: float = 2.0,
        ack_after_s: float = DISCORD_ACK_SECONDS - ACK_MARGIN_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        """``guild_ready_timeout`` is how long discord.py waits for more servers after the
        last one arrives; ``ack_after_s`` how long core may take before a press is deferred;
        ``request_timeout_s`` how long a REST call that sends or edits may take."""
        if settings.token is None:
            raise ValueError("the Discord adapter needs a token")
        self.settings = settings
        self.dialog = dialog
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: switched on in the developer portal
        self.client = DishbotClient(
            self._on_press,
            intents=intents,
            allowed_mentions=ALLOWED_MENTIONS,
            guild_ready_timeout=guild_ready_timeout,
        )
        self.tree = app_commands.CommandTree(self.client)
        self.port = DiscordPort(self.client, timeout_s=request_timeout_s)
        self._request_timeout_s = request_timeout_s
        self._ack_after_s = ack_after_s
        self._gateway: asyncio.Task[None] | None = None
        self._in_hand: set[asyncio.Task[Any]] = set()
        self._replaying: set[asyncio.Task[None]] = set()
        self.catching_up: asyncio.Task[None] | None = None  # `catch_up`, started by `start`
        self.inbox = Inbox(dialog.store, PLATFORM)
        self._register_handlers()

    def _register_handlers(self) -> None:
        client, tree = self.client, self.tree

        @client.event
        async def on_message(message: discord.Message) -> None:
            await self._on_message(message)

        @client.event
        async def on_interaction(interaction: discord.Interaction[Any]) -> None:
            if interaction.type is discord.InteractionType.modal_submit:
                await self._on_form(interaction)

        @app_commands.describe(
            photo="A photo of the dish", question="What you want to know (default: what it is)"
        )
        async def dish(
            interaction: discord.Interaction[Any],
            photo: discord.Attachment,
            question: str | None = None,
        ) -> None:
            await self._on_dish(interaction, photo, question)

        async def command(interaction: discord.Interaction[Any]) -> None:
            await self._on_command(interaction)

        @app_commands.describe(
            action="force: promote whatever the evaluation says; cancel: stop the run going"
        )
        @app_commands.choices(
            action=[app_commands.Choice(name=name, value=name) for name in RETRAIN_ACTIONS]
        )
        async def retrain(interaction: discord.Interaction[Any], action: str | None = None) -> None:
            await self._on_command(interaction, action or "")

        tree.add_command(
            app_commands.Command(name="dish", description="Ask about a dish photo", callback=dish)
        )
        for name, description in COMMANDS.items():
            tree.add_command(
                app_commands.Command(name=name, description=description, callback=command)
            )
        tree.add_command(
            app_commands.Command(
                name="retrain",
                description="Admins: retrain the model on the feedback, evaluate, promote",
                callback=retrain,
            )
        )
        client.add_dynamic_items(DishbotButton)  # button presses: `_on_press`

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Log in, register the slash commands, connect, and wait until the servers are in."""
        assert self.settings.token is not None
        self._use_endpoints()
        client = self.client
        try:
            await client.login(self.settings.token.get_secret_value())
            await self._sync_commands()
        except discord.LoginFailure:
            await client.close()
            raise ConfigError(
                "Discord rejected the bot token: set discord.token to the token on the Bot tab "
                "of the Developer Portal"
            ) from None
        except BaseException:
            await client.close()
            raise
        self._gateway = asyncio.create_task(client.connect(), name="discord-gateway")
        ready = asyncio.create_task(client.wait_until_ready())
        try:
            await asyncio.wait(
                {self._gateway, ready}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
        if not client.is_ready():
            await self._fail_to_connect(self._gateway)
        self._gateway.add_done_callback(_log_gateway_end)
        assert client.user is not None
        log.info("discord: serving as %s in %d server(s)", client.user, len(client.guilds))
        self.catching_up = asyncio.create_task(self.catch_up(), name="discord-catch-up")

    async def _fail_to_connect(self, gateway: asyncio.Task[None]) -> None:
        timed_out = not gateway.done()
        await self.client.close()
        with contextlib.suppress(Exception):
            await gateway
        if timed_out:
            raise DiscordUnavailable(
                f"could not connect to Discord's gateway within {READY_TIMEOUT_S:g} s"
            )
        error = gateway.exception()
        if isinstance(error, discord.PrivilegedIntentsRequired):
            raise ConfigError(MESSAGE_CONTENT_OFF) from None
        raise DiscordUnavailable(f"the Discord gateway connection failed: {error}") from error

    async def stop(self) -> None:
        """Let answers in progress finish (for a while), then disconnect."""
        if self.catching_up is not None:
            self.catching_up.cancel()  # what it handed over already is in `_in_hand`
            await asyncio.gather(self.catching_up, return_exceptions=True)
        if self._in_hand:
            _, late = await asyncio.wait(set(self._in_hand), timeout=STOP_GRACE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.client.close()
        if self._gateway is not None:
            with contextlib.suppress(Exception):
                await self._gateway
            self._gateway = None

    def _use_endpoints(self) -> None:
        # discord.py reads both from class attributes, for every client in the process.
        if self.settings.api_base:
            discord.http.Route.BASE = self.settings.api_base.rstrip("/")
        if self.settings.gateway_url:
            DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.settings.gateway_url)

    async def _sync_commands(self) -> None:
        """Register the slash commands: in the configured servers at once, else globally."""
        if not self.settings.guild_ids:
            await self.tree.sync()
            log.info("discord: slash commands registered globally")
            return
        for guild_id in self.settings.guild_ids:
            guild = discord.Object(id=guild_id)
            self.tree.copy_global_to(guild=guild)
            try:
                await self.tree.sync(guild=guild)
            except discord.Forbidden:
                raise ConfigError(
                    f"cannot register slash commands in Discord server {guild_id}: invite the "
                    "bot there with the applications.commands scope, or remove the server from "
                    "discord.guild_ids"
                ) from None
        log.info("discord: slash commands registered in %d server(s)", len(self.settings.guild_ids))

    # -- messages and interactions --------------------------------------------------------

    async def _hand_over(self, event: Event) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._in_hand.add(task)
        try:
            await self.dialog.handle(event, self.port)
        finally:
            if task is not None:
                self._in_hand.discard(task)

    async def _on_message(self, message: discord.Message) -> None:
        if message.author.bot:  # the bot's own messages come back too
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return
        # Discord tells the user's language with interactions only.
        who = Person(PLATFORM, str(message.author.id), message.author.display_name)
        where = Place(str(message.channel.id), private=message.guild is None)
        message_id, addressed = str(message.id), self._addressed(message)
        text, reply_to = self._without_mention(message), _replied_id(message)
        # Only what the dialog may act on: chatter in a server is neither kept nor answered.
        kept = where.private or addressed or reply_to is not None
        key = f"{message.channel.id}:{message.id}"
        if kept:
            payload = {"channel_id": str(message.channel.id), "message_id": message_id}
            await self.inbox.receive(key, json.dumps(payload))
        if message.attachments:
            event: Event = _attachment_event(
                who,
                where,
                message_id,
                message.attachments,
                text,
                addressed=addressed,
                reply_to=reply_to,
            )
        else:
            event = TextMessage(who, where, message_id, text, addressed, reply_to)
        await self._hand_over(event)
        # Not when cancelled (the bot stopping): the next start handles it again, and the
        # dialog does not ask twice what it stored.
        if kept:
            await self.inbox.settle(key)

    async def replay(self, entry: InboxRecord) -> None:
        """Handle again, in the background, a message a process that is gone kept in the
        inbox and never finished (see `bot.core.recovery`): fetched anew by its id."""
        ids = json.loads(entry.payload)
        channel_id, message_id = int(ids["channel_id"]), int(ids["message_id"])
        try:
            channel = self.client.get_channel(channel_id) or await self.client.fetch_channel(
                channel_id
            )
            assert isinstance(channel, discord.abc.Messageable)
            message = await channel.fetch_message(message_id)
        except (discord.NotFound, discord.Forbidden) as gone:
            log.warning("discord: message %s can no longer be read: %s", entry.key, gone)
            await self.inbox.settle(entry.key)
            return
        task = asyncio.create_task(self._on_message(message), name=f"replay {entry.key}")
        self._replaying.add(task)
        task.add_done_callback(self._replaying.discard)

    async def catch_up(self, since: datetime | None = None) -> None:
        """Handle the photos people sent in channels asked in since ``since`` (by default
        `CATCH_UP_WINDOW` ago) after the newest question stored there, which the gateway may
        have written to a connection that died unread. Never raises: a start goes on
        without it."""
        since = since or datetime.now(UTC) - CATCH_UP_WINDOW
        try:
            chats = await self.dialog.store.recent_chats(PLATFORM, since)
        except Exception:
            log.exception("discord: could not catch up on messages missed while away")
            return
        for chat_id, newest in chats[:CATCH_UP_CHANNELS]:
            try:
                await self._catch_up_in(int(chat_id), int(newest))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("discord: could not catch up in channel %s: %r", chat_id, error)

    async def _catch_up_in(self, channel_id: int, newest: int) -> None:
        channel = self.client.get_channel(channel_id) or await self.client.fetch_channel(channel_id)
        if not isinstance(channel, discord.abc.Messageable):
            return
        after = discord.Object(id=newest)
        history = channel.history(after=after, oldest_first=True, limit=CATCH_UP_MESSAGES)
        async for message in history:
            # Photo questions only: a hint or a command's reply shown again would puzzle.
            if message.author.bot or not any(
                _content_type(a).startswith("image/") for a in message.attachments
            ):
                continue
            log.info("discord: handling message %s missed while away", message.id)
            task = asyncio.create_task(self._on_message(message), name=f"catch up {message.id}")
            self._replaying.add(task)
            task.add_done_callback(self._replaying.discard)

    async def _on_dish(
        self, interaction: discord.Interaction[Any], photo: discord.Attachment, question: str | None
    ) -> None:
        reply = InteractionReply(interaction, ephemeral=False, timeout_s=self._request_timeout_s)
        if not await self._defer(reply):
            return
        who, where = _interaction_person(interaction), _interaction_place(interaction, reply)
        message_id = str(interaction.id)  # there is no message of the user's to reply to
        event = _attachment_event(
            who, where, message_id, [photo], question, addressed=True, reply_to=None
        )
        await self._hand_over(event)

    async def _on_command(self, interaction: discord.Interaction[Any], argument: str = "") -> None:
        if interaction.command is None:
            return
        # Admin replies (and their refusals) are for the one who asked: an export's summary
        # names a path on the server, and /stats is nobody else's business.
        private = interaction.command.name in ADMIN_COMMANDS
        reply = InteractionReply(interaction, ephemeral=private, timeout_s=self._request_timeout_s)
        if not await self._defer(reply):
            return
        await self._hand_over(
            Command(
                who=_interaction_person(interaction),
                where=_interaction_place(interaction, reply),
                name=interaction.command.name,
                argument=argument,
                message_id=str(interaction.id),
            )
        )

    async def _on_press(self, interaction: discord.Interaction[Any], data: str) -> None:
        if interaction.message is None:
            return
        reply = InteractionReply(interaction, ephemeral=True, timeout_s=self._request_timeout_s)
        press = ButtonPress(
            who=_interaction_person(interaction),
            where=_interaction_place(interaction, reply),
            message_id=str(interaction.message.id),
            data=data,
            press_id=str(interaction.id),
        )
        # Core answers a press itself (with a notice or the ✏️ form, which must be the
        # first response), so it is deferred only when core is about to miss the deadline.
        handling = asyncio.ensure_future(self._hand_over(press))
        try:
            done, _ = await asyncio.wait({handling}, timeout=self._ack_after_s)
            if not done:
                await self._defer(reply)
            await handling
        finally:
            handling.cancel()

    async def _on_form(self, interaction: discord.Interaction[Any]) -> None:
        data: dict[str, Any] = dict(interaction.data or {})
        action = buttons.decode(str(data.get("custom_id", "")))
        if not isinstance(action, buttons.Correct):
            return
        reply = InteractionReply(interaction, ephemeral=True, timeout_s=self._request_timeout_s)
        if not await self._defer(reply):
            return
        await self._hand_over(
            CorrectionSubmitted(
                who=_interaction_person(interaction),
                where=_interaction_place(interaction, reply),
                exchange_id=action.exchange_id,
                text=_form_value(data.get("components", []), CORRECTION_FIELD),
                press_id=str(interaction.id),
            )
        )

    async def _defer(self, reply: InteractionReply) -> bool:
        try:
            await reply.defer()
        except discord.HTTPException as exc:
            log.warning("discord: an interaction could not be acknowledged: %s", exc)
            return False
        return True

    # -- helpers --------------------------------------------------------------------------

    def _my_mentions(self, message: discord.Message) -> list[str]:
        """The mention markups that address the bot: its user, and its role in the server."""
        me = self.client.user
        if me is None:
            return []
        mentions = [f"<@{me.id}>", f"<@!{me.id}>"]
        role = message.guild.self_role if message.guild is not None else None
        if role is not None:
            mentions.append(role.mention)
        return mentions

    def _addressed(self, message: discord.Message) -> bool:
        me = self.client.user
        if me is None:
            return False
        if me in message.mentions:  # a reply to the bot mentions it too, unless switched off
            return True
        role = message.guild.self_role if message.guild is not None else None
        if role is not None and role in message.role_mentions:
            return True
        replied = message.reference.resolved if message.reference is not None else None
        return isinstance(replied, discord.Message) and replied.author.id == me.id

    def _without_mention(self, message: discord.Message) -> str:
        """The text with the bot's own mention taken out (it is not part of the question)."""
        text = message.content
        for mention in self._my_mentions(message):
            text = text.replace(mention, " ")
        return " ".join(text.split())


def _log_gateway_end(gateway: asyncio.Task[None]) -> None:
    # discord.py reconnects by itself; the connection ends for good only on a fatal error.
    if not gateway.cancelled() and gateway.exception() is not None:
        log.error("discord: the gateway connection ended", exc_info=gateway.exception())


def _attachment_event(
    who: Person,
    where: Place,
    message_id: str,
    attachments: Sequence[discord.Attachment],
    question: str | None,
    *,
    addressed: bool,
    reply_to: str | None,
) -> PhotoQuestion | NotAPhoto:
    """The question about the first image among ``attachments``, or why there is none."""
    image = next((a for a in attachments if _content_type(a).startswith("image/")), None)
    if image is None:
        first = attachments[0]
        kind = _content_type(first) or "unknown"
        return NotAPhoto(
            who,
            where,
            message_id,
            reason=f"{first.filename} is a {kind} file, not a photo",
            addressed=addressed,
        )
    photo = PhotoFile(
        fetch=image.read,
        size=image.size,  # declared by Discord: core refuses a photo too big before fetching
        filename=image.filename,
        content_type=_content_type(image),
    )
    return PhotoQuestion(
        who,
        where,
        message_id,
        photo,
        question=question or None,
        addressed=addressed,
        reply_to=reply_to,
    )


def _content_type(attachment: discord.Attachment) -> str:
    declared = attachment.content_type or mimetypes.guess_type(attachment.filename)[0] or ""
    return declared.split(";")[0].strip().lower()


def _interaction_person(interaction: discord.Interaction[Any]) -> Person:
    user = interaction.user
    return Person(PLATFORM, str(user.id), user.display_name, interaction.locale.value)


def _interaction_place(interaction: discord.Interaction[Any], reply: InteractionReply) -> Place:
    return Place(str(interaction.channel_id), private=interaction.guild_id is None, context=reply)


def _replied_id(message: discord.Message) -> str | None:
    reference = message.reference
    if reference is None or reference.type is not discord.MessageReferenceType.reply:
        return None  # a forward is not a reply
    return None if reference.message_id is None else str(reference.message_id)


def _form_value(components: Any, custom_id: str) -> str:
    """The value of the text input ``custom_id`` in a form submission's components."""
    for component in components or ():
        if component.get("custom_id") == custom_id:
            return str(component.get("value") or "")
        nested = list(component.get("components", ()))
        if "component" in component:  # a label around its input
            nested.append(component["component"])
        value = _form_value(nested, custom_id)
        if value:
            return value
    return ""
