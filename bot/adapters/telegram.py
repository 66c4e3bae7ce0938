"""The Telegram bot: python-telegram-bot v22 translating updates to and from `bot.core`.

Polling by default, webhook mode when configured. Flood control is PTB's `AIORateLimiter`
with retries, so a 429 from Telegram delays a message rather than losing it.

Each update is handled in a task of its own, not in PTB's update slot: PTB runs at most 256
handlers at once, and a question holds its handler for as long as the model takes to answer,
so with the slots taken by answers a /help or a button press would wait for minutes.

Nothing fetched is lost in a crash: PTB puts each update into `Application.update_queue`
before it acknowledges it (polling: the next getUpdates confirms it; a webhook: its 200 is
sent after), so the queue given to PTB (`InboxQueue`) first keeps the update in the store's
inbox; it leaves the inbox when its handling ends, and the next start `replay`s what a
process that died left there.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import httpx
from telegram import (
    BotCommand,
    CallbackQuery,
    ForceReply,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    MessageEntity,
    ReplyParameters,
    Update,
)
from telegram.constants import ChatAction, ChatType
from telegram.error import BadRequest, NetworkError, TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    CallbackQueryHandler,
    ContextTypes,
    MessageHandler,
    TypeHandler,
    filters,
)

from bot.core.dialog import Dialog
from bot.core.events import (
    ButtonPress,
    Command,
    Event,
    NotAPhoto,
    Person,
    PhotoFile,
    PhotoQuestion,
    Place,
    TextMessage,
)
from bot.core.inbox import Inbox
from bot.core.limits import (
    TELEGRAM_BOT_DOWNLOAD_BYTES,
    TELEGRAM_GROUP_CALLS,
    TELEGRAM_MESSAGE_LENGTH,
    TELEGRAM_OVERALL_CALLS,
    TELEGRAM_PRIVATE_CALLS,
    CallLimit,
)
from bot.core.port import Button, DeliveryUnknown, MessageGone
from bot.core.text import utf16_length
from bot.settings import TelegramSettings
from bot.store import InboxRecord

log = logging.getLogger(__name__)

PLATFORM = "telegram"
# Telegram's placeholder senders: a message sent on behalf of a chat (an anonymous group
# admin, someone writing as a channel, a channel post forwarded to its discussion group)
# carries one of these as `from` and the chat as `sender_chat`. Everyone behind one shares
# its id, so it is never taken for a person.
GROUP_ANONYMOUS_BOT_ID = 1087968824  # @GroupAnonymousBot
CHANNEL_BOT_ID = 136817688  # @Channel_Bot
TELEGRAM_SERVICE_ID = 777000  # "Telegram": automatic forwards from a linked channel
PLACEHOLDER_SENDER_IDS = frozenset({GROUP_ANONYMOUS_BOT_ID, CHANNEL_BOT_ID, TELEGRAM_SERVICE_ID})
# A chat that speaks is "chat:<chat id>": never a number, so never equal to a user's id, and
# never one of the `admins` (which are telegram:<digits>).
SENDER_CHAT_PREFIX = "chat:"
TYPING_INTERVAL_S = 4.5  # Telegram shows "typing…" for five seconds
FLOOD_RETRIES = 5  # AIORateLimiter waits out a 429's retry_after and tries again
# A call that failed on the way (5xx, a reset, a timeout) is tried again this often, after
# these pauses; PTB itself tries once.
CALL_RETRY_PAUSES_S = (0.5, 1.0, 2.0, 4.0)
# Long enough that a slow answer from Telegram is rarely taken for a lost one: a send whose
# answer times out is not sent again (see `_retrying`).
REQUEST_TIMEOUT_S = 20.0
STOP_GRACE_S = 10.0  # how long answers in progress may take to finish when the bot stops
# Updates being handled at once. Far above `engine.max_pending`, so the engine's own "busy"
# answer comes first; past it, PTB's update slots wait (and hold the next updates) instead of
# every update of a flood becoming a task.
MAX_UPDATES_IN_HAND = 4096

COMMANDS = {
    "en": [
        BotCommand("help", "How to use dishbot"),
        BotCommand("cancel", "Drop your questions still waiting"),
        BotCommand("forget", "Delete everything stored about you"),
    ],
    "zh": [
        BotCommand("help", "使用帮助"),
        BotCommand("cancel", "取消排队中的问题"),
        BotCommand("forget", "删除关于你的所有数据"),
    ],
}


T = TypeVar("T")


# Failures before the request reached Telegram whole: no connection, no free connection, or
# the request could not be written.
NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.WriteError,
    httpx.WriteTimeout,
)


def _surely_not_delivered(error: NetworkError) -> bool:
    """Whether a failed call surely did not take effect, so it may be made again.

    A 5xx answer, and a request that never reached Telegram whole (`NOT_SENT`), did not.
    Once the request went out, a read timeout or a connection closed before the answer (a
    proxy resetting it) may have: Telegram may be carrying it out.
    """
    cause = _cause_below_ptb(error)
    if cause is None:
        return True  # an HTTP answer PTB turned into an error (a 5xx)
    return isinstance(cause, NOT_SENT)


def _cause_below_ptb(error: BaseException) -> BaseException | None:
    """The first exception in ``error``'s chain that is not PTB's own (httpx's, which PTB
    wraps as `NetworkError` or `TimedOut`); None when PTB raised it from an answer."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        if not isinstance(link, TelegramError):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return None


async def _retrying(call: Callable[[], Awaitable[T]], *, repeatable: bool) -> T:
    """``call``, made again after transient failures: always when it is ``repeatable`` (an
    edit: making it twice shows the same), else only when it surely did not take effect; a
    send whose outcome is unknown raises `DeliveryUnknown`."""
    for pause in (*CALL_RETRY_PAUSES_S, None):
        try:
            return await call()
        except BadRequest:
            raise  # a refusal: the same call would be refused again
        except NetworkError as error:
            if not repeatable and not _surely_not_delivered(error):
                raise DeliveryUnknown(str(error)) from error
            if pause is None:
                raise
            log.warning("telegram: %s; trying again in %g s", error, pause)
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")


class TelegramPort:
    """`bot.core.port.ChatPort` over a PTB bot. Calls that fail on the way are retried when
    that cannot show something twice (`_retrying`)."""

    platform = PLATFORM
    message_limit = TELEGRAM_MESSAGE_LENGTH
    typing_interval_s = TYPING_INTERVAL_S
    answers_admin_commands_privately = False  # a bot's messages in a group are the group's
    overall_call_limit = TELEGRAM_OVERALL_CALLS

    def __init__(self, application: Application[Any, Any, Any, Any, Any, Any]) -> None:
        self._app = application

    @property
    def _bot(self) -> Any:
        return self._app.bot

    def text_length(self, text: str) -> int:
        return utf16_length(text)

    def call_limit(self, where: Place) -> CallLimit:
        return TELEGRAM_PRIVATE_CALLS if where.private else TELEGRAM_GROUP_CALLS

    async def send(
        self,
        where: Place,
        text: str,
        *,
        reply_to: str | None = None,
        buttons: Sequence[Button] = (),
    ) -> str:
        message: Message = await _retrying(
            lambda: self._bot.send_message(
                chat_id=int(where.chat_id),
                text=text,
                reply_parameters=_reply_parameters(reply_to),
                reply_markup=_keyboard(buttons),
            ),
            repeatable=False,
        )
        return str(message.message_id)

    async def edit(
        self, where: Place, message_id: str, text: str, *, buttons: Sequence[Button] = ()
    ) -> None:
        try:
            await _retrying(
                lambda: self._bot.edit_message_text(
                    text=text,
                    chat_id=int(where.chat_id),
                    message_id=int(message_id),
                    reply_markup=_keyboard(buttons),
                ),
                repeatable=True,
            )
        except BadRequest as exc:
            _raise_unless_unchanged(exc)

    async def set_buttons(self, where: Place, message_id: str, buttons: Sequence[Button]) -> None:
        try:
            await _retrying(
                lambda: self._bot.edit_message_reply_markup(
                    chat_id=int(where.chat_id),
                    message_id=int(message_id),
                    reply_markup=_keyboard(buttons),
                ),
                repeatable=True,
            )
        except BadRequest as exc:
            _raise_unless_unchanged(exc)

    async def typing(self, where: Place) -> None:
        await self._bot.send_chat_action(chat_id=int(where.chat_id), action=ChatAction.TYPING)

    async def acknowledge(self, press: ButtonPress, text: str) -> None:
        await _retrying(
            lambda: self._bot.answer_callback_query(press.press_id, text=text), repeatable=False
        )

    async def ask_for_correction(self, press: ButtonPress, exchange_id: int, prompt: str) -> str:
        await _retrying(lambda: self._bot.answer_callback_query(press.press_id), repeatable=False)
        # In a group, `selective` shows the reply field only to the user the prompt
        # replies to: the one who asked (the answer replies to their photo).
        asker = press.where.context if isinstance(press.where.context, str) else None
        message: Message = await _retrying(
            lambda: self._bot.send_message(
                chat_id=int(press.where.chat_id),
                text=prompt,
                reply_parameters=_reply_parameters(asker or press.message_id),
                reply_markup=ForceReply(selective=True),
            ),
            repeatable=False,
        )
        return str(message.message_id)


def _reply_parameters(message_id: str | None) -> ReplyParameters | None:
    if message_id is None:
        return None
    # The user may have deleted their message meanwhile; answer anyway.
    return ReplyParameters(message_id=int(message_id), allow_sending_without_reply=True)


def _keyboard(buttons: Sequence[Button]) -> InlineKeyboardMarkup | None:
    if not buttons:
        return None
    row = [InlineKeyboardButton(b.label, callback_data=b.data) for b in buttons]
    return InlineKeyboardMarkup([row])


def _raise_unless_unchanged(error: BadRequest) -> None:
    message = error.message.lower()
    if "message is not modified" in message:
        return
    if "message to edit not found" in message or "message can't be edited" in message:
        raise MessageGone(error.message) from error
    raise error


class InboxQueue(asyncio.Queue[object]):
    """PTB's update queue: an update is kept in the inbox before it is queued, that is before
    PTB acknowledges it to Telegram."""

    def __init__(self, inbox: Inbox, key: Callable[[Update], str]) -> None:
        super().__init__()
        self._inbox = inbox
        self._key = key

    async def put(self, item: object) -> None:
        if isinstance(item, Update):  # PTB also queues its own stop signal
            await self._inbox.receive(self._key(item), item.to_json())
        await super().put(item)


class TelegramAdapter:
    """Runs a PTB `Application` that hands every update to the dialog."""

    def __init__(
        self,
        settings: TelegramSettings,
        dialog: Dialog,
        *,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        """``request_timeout_s`` bounds connecting, writing and reading each Bot API call
        (the long poll waits its own timeout on top)."""
        if settings.token is None:
            raise ValueError("the Telegram adapter needs a token")
        self.settings = settings
        self.dialog = dialog
        token = settings.token.get_secret_value()
        # Update ids are the bot's own: a key names the bot too, should the token change.
        self._bot_id = token.partition(":")[0]
        self.inbox = Inbox(dialog.store, PLATFORM)
        self.application = (
            Application.builder()
            .token(token)
            .update_queue(InboxQueue(self.inbox, self._inbox_key))
            .base_url(settings.base_url)
            .base_file_url(settings.base_file_url)
            .rate_limiter(AIORateLimiter(max_retries=FLOOD_RETRIES))
            .concurrent_updates(True)
            .connect_timeout(request_timeout_s)
            .write_timeout(request_timeout_s)
            .read_timeout(request_timeout_s)
            .build()
        )
        self.port = TelegramPort(self.application)
        self._in_hand: set[asyncio.Task[None]] = set()
        self._handed: set[str] = set()  # inbox keys of the updates whose task is running
        self._room = asyncio.Semaphore(MAX_UPDATES_IN_HAND)
        self._register_handlers()

    def _register_handlers(self) -> None:
        app = self.application
        # MessageHandler alone also takes edits, channel posts and business messages. Only
        # new messages are questions: the bot answers what was sent, and editing a message
        # does not ask again (to ask again, send again).
        sent = filters.UpdateType.MESSAGE
        app.add_handler(MessageHandler(sent & filters.COMMAND, self._on_command))
        app.add_handler(MessageHandler(sent & filters.PHOTO, self._on_photo))
        app.add_handler(MessageHandler(sent & filters.Document.ALL, self._on_document))
        app.add_handler(MessageHandler(sent & filters.TEXT, self._on_text))
        app.add_handler(CallbackQueryHandler(self._on_button))
        # After the handlers above (group 0), every update: one none of them handed over
        # has been handled now, and leaves the inbox.
        app.add_handler(TypeHandler(Update, self._settle_unhanded), group=1)
        app.add_error_handler(self._on_error)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, register the commands, and start receiving updates."""
        app = self.application
        await app.initialize()
        for language, commands in COMMANDS.items():
            code = "" if language == "en" else language
            await app.bot.set_my_commands(commands, language_code=code or None)
        await app.start()
        assert app.updater is not None
        if self.settings.mode == "webhook":
            secret = self.settings.webhook_secret
            if secret is None:  # the settings make one: a webhook without one takes forgeries
                raise ValueError("webhook mode needs telegram.webhook_secret")
            await app.updater.start_webhook(
                listen=self.settings.webhook_listen,
                port=self.settings.webhook_port,
                url_path=self.settings.webhook_path.lstrip("/"),
                webhook_url=self.settings.webhook_url,
                secret_token=secret.get_secret_value(),
            )
        else:
            await app.updater.start_polling()
        log.info("telegram: serving as @%s (%s)", app.bot.username, self.settings.mode)

    async def stop(self) -> None:
        """Stop receiving updates, let the ones in hand finish for a while (then cancel
        them), and disconnect."""
        app = self.application
        if app.updater is not None and app.updater.running:
            await app.updater.stop()
        if app.running:
            await app.stop()  # hands over the updates already fetched
        await self._finish_in_hand()
        await app.shutdown()

    async def _finish_in_hand(self) -> None:
        if not self._in_hand:
            return
        _, late = await asyncio.wait(set(self._in_hand), timeout=STOP_GRACE_S)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    # -- updates --------------------------------------------------------------------------

    async def replay(self, entry: InboxRecord) -> None:
        """Handle again an update a process that is gone kept in the inbox and never finished
        (see `bot.core.recovery`); it leaves the inbox when this handling ends."""
        if not entry.key.startswith(f"{self._bot_id}:"):
            log.warning("telegram: update %s was another bot's: dropped", entry.key)
            await self.inbox.settle(entry.key)
            return
        update = Update.de_json(json.loads(entry.payload), self.application.bot)
        await self.application.process_update(update)

    def _inbox_key(self, update: Update) -> str:
        return f"{self._bot_id}:{update.update_id}"

    async def _hand_over(self, update: Update, event: Event) -> None:
        """Start handling ``event`` in a task of its own; PTB's slot is free once it starts."""
        await self._room.acquire()
        key = self._inbox_key(update)
        self._handed.add(key)
        task = asyncio.create_task(
            self._handle(key, event), name=f"telegram {type(event).__name__}"
        )
        self._in_hand.add(task)
        task.add_done_callback(self._in_hand.discard)

    async def _handle(self, key: str, event: Event) -> None:
        try:
            await self.dialog.handle(event, self.port)
        finally:
            self._room.release()
            self._handed.discard(key)
        # Not when cancelled (the bot stopping): the next start handles it again, and the
        # dialog does not ask twice what it stored.
        await self.inbox.settle(key)

    async def _settle_unhanded(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        key = self._inbox_key(update)
        if key not in self._handed:
            await self.inbox.settle(key)

    async def _on_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        who = _person(message)
        if message is None or message.text is None or who is None:
            return
        word, _, argument = message.text.partition(" ")
        name, _, target = word[1:].partition("@")
        if target and target.lower() != (self.application.bot.username or "").lower():
            return  # a command for another bot in the same group
        await self._hand_over(
            update,
            Command(
                who=who,
                where=_place(message),
                name=name.lower(),
                argument=argument.strip(),
                message_id=str(message.message_id),
            ),
        )

    async def _on_photo(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        who = _person(message)
        if message is None or who is None or not message.photo:
            return
        largest = max(message.photo, key=lambda size: size.width * size.height)
        await self._hand_over(
            update,
            PhotoQuestion(
                who=who,
                where=_place(message),
                message_id=str(message.message_id),
                photo=self._photo_file(largest.file_id, largest.file_size, None, "image/jpeg"),
                question=self._without_mention(message.caption, message.caption_entities),
                addressed=self._addressed(message, message.caption, message.caption_entities),
                reply_to=_replied_id(message),
            ),
        )

    async def _on_document(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        who = _person(message)
        if message is None or who is None or message.document is None:
            return
        document = message.document
        addressed = self._addressed(message, message.caption, message.caption_entities)
        mime = (document.mime_type or "").lower()
        if not mime.startswith("image/"):
            kind = mime or "unknown"
            await self._hand_over(
                update,
                NotAPhoto(
                    who=who,
                    where=_place(message),
                    message_id=str(message.message_id),
                    reason=f"{document.file_name or 'the file'} is a {kind} file, not a photo",
                    addressed=addressed,
                ),
            )
            return
        await self._hand_over(
            update,
            PhotoQuestion(
                who=who,
                where=_place(message),
                message_id=str(message.message_id),
                photo=self._photo_file(
                    document.file_id, document.file_size, document.file_name, mime
                ),
                question=self._without_mention(message.caption, message.caption_entities),
                addressed=addressed,
                reply_to=_replied_id(message),
            ),
        )

    async def _on_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        who = _person(message)
        if message is None or who is None or message.text is None:
            return
        await self._hand_over(
            update,
            TextMessage(
                who=who,
                where=_place(message),
                message_id=str(message.message_id),
                text=self._without_mention(message.text, message.entities) or "",
                addressed=self._addressed(message, message.text, message.entities),
                reply_to=_replied_id(message),
            ),
        )

    async def _on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query: CallbackQuery | None = update.callback_query
        if query is None:
            return
        message = query.message
        if not isinstance(message, Message) or query.data is None:
            # Too old for Telegram to include the message: nothing to act on.
            await query.answer()
            return
        asker = message.reply_to_message
        await self._hand_over(
            update,
            ButtonPress(
                who=Person(
                    PLATFORM,
                    str(query.from_user.id),
                    query.from_user.full_name,
                    query.from_user.language_code,
                ),
                where=Place(
                    str(message.chat.id),
                    private=message.chat.type == ChatType.PRIVATE,
                    context=str(asker.message_id) if asker is not None else None,
                ),
                message_id=str(message.message_id),
                data=query.data,
                press_id=query.id,
            ),
        )

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        error = context.error
        if isinstance(error, TelegramError) and not isinstance(error, BadRequest):
            log.warning("telegram: %s", error)
            return
        log.error("telegram: an update failed", exc_info=error)

    # -- helpers --------------------------------------------------------------------------

    def _photo_file(
        self, file_id: str, size: int | None, filename: str | None, content_type: str | None
    ) -> PhotoFile:
        bot = self.application.bot

        async def fetch() -> bytes:
            if size is not None and size > TELEGRAM_BOT_DOWNLOAD_BYTES:
                raise ValueError("the file is over Telegram's download limit for bots")
            telegram_file = await bot.get_file(file_id)
            return bytes(await telegram_file.download_as_bytearray())

        return PhotoFile(fetch=fetch, size=size, filename=filename, content_type=content_type)

    def _mentions_me(self, text: str | None, entities: Sequence[MessageEntity]) -> bool:
        bot = self.application.bot
        for entity in entities:
            user = entity.user
            if entity.type == MessageEntity.TEXT_MENTION and user is not None and user.id == bot.id:
                return True
            if entity.type == MessageEntity.MENTION and text is not None:
                mention = _entity_text(text, entity)
                if mention.lower() == f"@{bot.username}".lower():
                    return True
        return False

    def _addressed(
        self, message: Message, text: str | None, entities: Sequence[MessageEntity]
    ) -> bool:
        replied = message.reply_to_message
        author = replied.from_user if replied is not None else None
        if author is not None and author.id == self.application.bot.id:
            return True
        return self._mentions_me(text, entities)

    def _without_mention(self, text: str | None, entities: Sequence[MessageEntity]) -> str | None:
        """The text with the bot's own @mention taken out (it is not part of the question)."""
        if text is None:
            return None
        mention = f"@{self.application.bot.username}".lower()
        pieces: list[str] = []
        position = 0
        encoded = text.encode("utf-16-le")
        for entity in sorted(entities, key=lambda e: e.offset):
            if entity.type != MessageEntity.MENTION:
                continue
            if _entity_text(text, entity).lower() != mention:
                continue
            pieces.append(encoded[position * 2 : entity.offset * 2].decode("utf-16-le"))
            position = entity.offset + entity.length
        pieces.append(encoded[position * 2 :].decode("utf-16-le"))
        return " ".join("".join(pieces).split())


def _entity_text(text: str, entity: MessageEntity) -> str:
    # Entity offsets count UTF-16 code units.
    encoded = text.encode("utf-16-le")
    start, end = entity.offset * 2, (entity.offset + entity.length) * 2
    return encoded[start:end].decode("utf-16-le")


def _person(message: Message | None) -> Person | None:
    """Who sent a message: the user, or the chat it was sent on behalf of; None for nobody
    (a placeholder sender without its chat)."""
    if message is None:
        return None
    chat = message.sender_chat
    if chat is not None:
        return Person(PLATFORM, f"{SENDER_CHAT_PREFIX}{chat.id}", chat.effective_name, is_chat=True)
    user = message.from_user
    if user is None or user.id in PLACEHOLDER_SENDER_IDS:
        return None
    return Person(PLATFORM, str(user.id), user.full_name, user.language_code)


def _place(message: Message) -> Place:
    return Place(str(message.chat.id), private=message.chat.type == ChatType.PRIVATE)


def _replied_id(message: Message) -> str | None:
    replied = message.reply_to_message
    return str(replied.message_id) if replied is not None else None
