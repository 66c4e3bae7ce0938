"""The Telegram emulator speaks the Bot API well enough for the real python-telegram-bot.

Each test runs a real PTB ``Application`` (polling, AIORateLimiter, concurrent updates)
against the emulator over a real socket, with a few tiny handlers defined here, and checks
what a user of the chat would see.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from telegram import (
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    MessageEntity,
    Update,
)
from telegram.constants import ParseMode
from telegram.error import BadRequest, InvalidToken
from telegram.ext import (
    AIORateLimiter,
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from tests.telegram_emulator import (
    BOT_USER_ID,
    DEFAULT_BOT_USERNAME,
    Chat,
    TelegramEmulator,
    User,
    utf16_length,
)

ADA = User(42, "Ada", username="ada_eats", language_code="en")
LIN = User(43, "林", language_code="zh-hans")
FOODIES = Chat.group(-1001234567890, "Foodies")
RATING_KEYBOARD = InlineKeyboardMarkup(
    [
        [InlineKeyboardButton("👍", callback_data="rate:7:up")],
        [InlineKeyboardButton("👎", callback_data="rate:7:down")],
    ]
)
# PTB's Application is generic in six types (bot, context, data stores, job queue).
BotApplication = Application[Any, Any, Any, Any, Any, Any]
# How long a test waits for the bot to react before failing; a guard, never a measurement.
GUARD_S = 10.0


class ExampleBot:
    """The smallest bot that exercises what dishbot's adapter needs from the platform."""

    def __init__(self) -> None:
        self.photos: asyncio.Queue[tuple[str, bytes, list[str]]] = asyncio.Queue()
        self.errors: list[object] = []

    def register(self, app: BotApplication) -> None:
        app.add_handler(CommandHandler("menu", self.menu))
        app.add_handler(MessageHandler(filters.PHOTO, self.photo))
        app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, self.echo))
        app.add_handler(CallbackQueryHandler(self.pressed))
        app.add_error_handler(self.failed)

    async def echo(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.message is not None
        await update.message.reply_text(f"echo: {update.message.text}", do_quote=True)

    async def photo(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        assert message is not None
        photo_file = await message.photo[-1].get_file()
        data = bytes(await photo_file.download_as_bytearray())
        mentions = list(message.parse_caption_entities([MessageEntity.MENTION]).values())
        await self.photos.put((str(photo_file.file_path), data, mentions))
        await message.reply_text(f"{len(data)} bytes")

    async def menu(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.message is not None
        await update.message.reply_text("How was it?", reply_markup=RATING_KEYBOARD)

    async def pressed(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        assert query is not None
        await query.answer("Thanks!")
        await query.edit_message_text(f"You chose {query.data}")

    async def failed(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        self.errors.append(context.error)


@pytest.fixture
async def telegram() -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator() as emulator:
        yield emulator


def build_application(telegram: TelegramEmulator) -> BotApplication:
    return (
        Application.builder()
        .token(telegram.token)
        .base_url(telegram.base_url)
        .base_file_url(telegram.base_file_url)
        .rate_limiter(AIORateLimiter(max_retries=3))
        .concurrent_updates(True)
        .build()
    )


@pytest.fixture
def example_bot() -> ExampleBot:
    return ExampleBot()


@pytest.fixture
async def app(telegram: TelegramEmulator, example_bot: ExampleBot) -> AsyncIterator[BotApplication]:
    application = build_application(telegram)
    example_bot.register(application)
    await application.initialize()
    await application.start()
    assert application.updater is not None
    await application.updater.start_polling(poll_interval=0, timeout=1)
    try:
        yield application
    finally:
        await application.updater.stop()
        await application.stop()
        await application.shutdown()
    assert example_bot.errors == []


async def test_initialize_learns_the_bot_from_getme(telegram: TelegramEmulator) -> None:
    application = build_application(telegram)
    await application.initialize()
    try:
        assert application.bot.username == DEFAULT_BOT_USERNAME
        assert application.bot.id == BOT_USER_ID
        assert [call.method for call in telegram.calls()] == ["getMe"]
    finally:
        await application.shutdown()


async def test_a_wrong_token_is_refused(telegram: TelegramEmulator) -> None:
    application = Application.builder().token("1:wrong").base_url(telegram.base_url).build()
    with pytest.raises(InvalidToken):
        await application.initialize()


async def test_text_is_answered_in_the_same_chat_as_a_reply(
    telegram: TelegramEmulator,
    app: BotApplication,
) -> None:
    update = telegram.send_text(ADA, ADA.private_chat, "42")

    call = await telegram.wait_for("sendMessage")

    assert call.ok
    assert call.params["chat_id"] == ADA.id
    assert call.params["text"] == "echo: 42"  # a string stays a string on the wire
    assert call.params["reply_parameters"]["message_id"] == update["message"]["message_id"]
    [answer] = telegram.messages_in(ADA.id)
    assert answer["text"] == "echo: 42"
    assert answer["reply_to_message"]["text"] == "42"
    assert answer["message_id"] > update["message"]["message_id"]


async def test_polling_acknowledges_updates_with_offset(
    telegram: TelegramEmulator,
    app: BotApplication,
) -> None:
    first = telegram.send_text(ADA, ADA.private_chat, "one")
    telegram.send_text(LIN, LIN.private_chat, "two")
    await telegram.wait_for_calls("sendMessage", 2)

    await telegram.wait_for(
        "getUpdates", lambda call: call.params.get("offset", 0) > first["update_id"] + 1
    )

    assert telegram.pending_updates == 0
    assert [m["text"] for m in telegram.messages_in(LIN.id)] == ["echo: two"]


async def test_photo_is_downloaded_through_getfile(
    telegram: TelegramEmulator,
    app: BotApplication,
    example_bot: ExampleBot,
) -> None:
    thumbnail = telegram.add_file(b"small jpeg")
    original = telegram.add_file(b"\xff\xd8 the full-size jpeg \xff\xd9")

    telegram.send_photo_message(ADA, ADA.private_chat, [thumbnail, original], caption="hmm")
    file_path, data, _ = await asyncio.wait_for(example_bot.photos.get(), GUARD_S)

    get_file = await telegram.wait_for("getFile")
    assert get_file.params["file_id"] == original
    assert file_path == telegram.file_url(original)
    assert data == b"\xff\xd8 the full-size jpeg \xff\xd9"
    answer = await telegram.wait_for("sendMessage")
    assert answer.params["text"] == f"{len(data)} bytes"


async def test_button_press_is_answered_and_edits_the_message(
    telegram: TelegramEmulator,
    app: BotApplication,
) -> None:
    telegram.send_text(ADA, ADA.private_chat, "/menu")
    sent = await telegram.wait_for("sendMessage")
    assert sent.params["reply_markup"] == RATING_KEYBOARD.to_dict()

    query_id = telegram.press_button(ADA, sent.result, "rate:7:up")

    answer = await telegram.wait_for("answerCallbackQuery")
    assert answer.ok
    assert answer.params == {"callback_query_id": query_id, "text": "Thanks!"}
    edit = await telegram.wait_for("editMessageText")
    assert edit.ok
    [shown] = telegram.messages_in(ADA.id)
    assert shown["text"] == "You chose rate:7:up"
    assert "reply_markup" not in shown  # an edit without a keyboard removes it
    with pytest.raises(ValueError, match="no button"):
        telegram.press_button(ADA, shown, "rate:7:down")


async def test_flood_control_is_retried_and_the_message_arrives(
    telegram: TelegramEmulator,
    app: BotApplication,
) -> None:
    telegram.fail_next("sendMessage", error_code=429, retry_after=1)

    telegram.send_text(ADA, ADA.private_chat, "are you there?")
    delivered = await telegram.wait_for("sendMessage", lambda call: call.ok)

    refused, retried = telegram.calls("sendMessage")
    assert (refused.ok, refused.error_code) == (False, 429)
    assert retried is delivered
    assert [m["text"] for m in telegram.messages_in(ADA.id)] == ["echo: are you there?"]


async def test_mention_offsets_count_utf16_units_in_a_chinese_caption(
    telegram: TelegramEmulator,
    app: BotApplication,
    example_bot: ExampleBot,
) -> None:
    caption = f"这是什么菜？🍜🥟 @{DEFAULT_BOT_USERNAME} 好吃吗"
    photo = telegram.add_file(b"jpeg")

    update = telegram.send_photo_message(LIN, FOODIES, photo, caption=caption)
    _, _, mentions = await asyncio.wait_for(example_bot.photos.get(), GUARD_S)

    [entity] = update["message"]["caption_entities"]
    assert entity["type"] == "mention"
    assert entity["offset"] == utf16_length("这是什么菜？🍜🥟 ") == caption.index("@") + 2
    assert mentions == [f"@{DEFAULT_BOT_USERNAME}"]


async def test_group_messages_carry_the_group_chat(
    telegram: TelegramEmulator,
    app: BotApplication,
) -> None:
    telegram.send_text(ADA, FOODIES, f"@{DEFAULT_BOT_USERNAME} hello")

    call = await telegram.wait_for("sendMessage")

    assert call.params["chat_id"] == FOODIES.id
    [answer] = telegram.messages_in(FOODIES.id)
    assert answer["chat"] == {"id": FOODIES.id, "type": "supergroup", "title": "Foodies"}


async def test_uploads_arrive_as_multipart_and_can_be_downloaded(
    telegram: TelegramEmulator,
    app: BotApplication,
) -> None:
    telegram.add_chat(ADA.private_chat)

    sent = await app.bot.send_document(
        ADA.id, document=b"rating,dish\n1,char siu\n", filename="export.csv", caption="📦"
    )
    await app.bot.send_photo(ADA.id, photo=b"\x89PNG fake", caption="a photo")

    [document_call] = telegram.calls("sendDocument")
    upload = document_call.files["document"]
    assert (upload.filename, upload.data) == ("export.csv", b"rating,dish\n1,char siu\n")
    assert document_call.params["caption"] == "📦"
    assert sent.document is not None
    downloaded = await (await sent.document.get_file()).download_as_bytearray()
    assert bytes(downloaded) == b"rating,dish\n1,char siu\n"
    [photo_call] = telegram.calls("sendPhoto")
    assert photo_call.files["photo"].data == b"\x89PNG fake"
    assert [m.get("caption") for m in telegram.messages_in(ADA.id)] == ["📦", "a photo"]


async def test_commands_round_trip(telegram: TelegramEmulator, app: BotApplication) -> None:
    await app.bot.set_my_commands([("start", "开始"), ("help", "Help")], language_code="zh")

    commands = await app.bot.get_my_commands(language_code="zh")

    assert [(c.command, c.description) for c in commands] == [("start", "开始"), ("help", "Help")]
    assert telegram.commands(language_code="zh")[0] == {"command": "start", "description": "开始"}
    assert await app.bot.get_my_commands() == ()


async def test_telegram_refusals_reach_the_bot_as_bad_requests(
    telegram: TelegramEmulator,
    app: BotApplication,
) -> None:
    telegram.add_chat(ADA.private_chat)
    bot = app.bot

    with pytest.raises(BadRequest, match=r"(?i)chat not found"):
        await bot.send_message(999, "hi")
    with pytest.raises(BadRequest, match=r"(?i)too long"):
        await bot.send_message(ADA.id, "好" * 4097)
    with pytest.raises(BadRequest, match=r"(?i)reserved"):
        await bot.send_message(ADA.id, "It costs 3.50!", parse_mode=ParseMode.MARKDOWN_V2)
    long_data = InlineKeyboardMarkup([[InlineKeyboardButton("x", callback_data="x" * 65)]])
    with pytest.raises(BadRequest, match=r"(?i)button_data_invalid"):
        await bot.send_message(ADA.id, "rate", reply_markup=long_data)
    message = await bot.send_message(ADA.id, "*Char siu* costs 3\\.50", parse_mode="MarkdownV2")
    with pytest.raises(BadRequest, match=r"(?i)not modified"):
        await bot.edit_message_text("Char siu costs 3.50", ADA.id, message.message_id)
    telegram.fail_next("deleteMessage", error_code=400, description="Bad Request: scripted")
    with pytest.raises(BadRequest, match=r"(?i)scripted"):
        await bot.delete_message(ADA.id, message.message_id)

    assert [m["text"] for m in telegram.messages_in(ADA.id)] == ["Char siu costs 3.50"]
    assert await bot.delete_message(ADA.id, message.message_id)
    assert telegram.messages_in(ADA.id) == []


async def test_html_is_shown_as_plain_text(
    telegram: TelegramEmulator,
    app: BotApplication,
) -> None:
    telegram.add_chat(ADA.private_chat)

    await app.bot.send_message(ADA.id, "<b>叉烧</b> &lt;3 &amp; more", parse_mode=ParseMode.HTML)
    with pytest.raises(BadRequest, match=r"(?i)unsupported start tag"):
        await app.bot.send_message(ADA.id, "<blink>no</blink>", parse_mode=ParseMode.HTML)

    assert [m["text"] for m in telegram.messages_in(ADA.id)] == ["叉烧 <3 & more"]


async def test_files_over_the_download_limit_are_refused(
    telegram: TelegramEmulator,
    app: BotApplication,
) -> None:
    huge = telegram.add_file(b"not really 25 MB", file_size=25 * 1024 * 1024)

    with pytest.raises(BadRequest, match=r"(?i)file is too big"):
        await app.bot.get_file(huge)


async def test_unknown_methods_answer_404_and_are_recorded(telegram: TelegramEmulator) -> None:
    url = f"{telegram.base_url}{telegram.token}/sendHologram"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data={"chat_id": "42"}) as response,
    ):
        body = await response.json()

    assert response.status == 404
    assert body == {"ok": False, "error_code": 404, "description": "Not Found: method not found"}
    [call] = telegram.calls("sendHologram")
    assert call.params == {"chat_id": 42}


async def test_stopping_the_emulator_releases_a_held_long_poll(
    telegram: TelegramEmulator,
) -> None:
    url = f"{telegram.base_url}{telegram.token}/getUpdates"
    async with aiohttp.ClientSession() as session:
        poll = asyncio.create_task(session.post(url, data={"timeout": "60"}))
        await telegram.wait_for_long_poll()

        await telegram.stop()
        response = await asyncio.wait_for(poll, GUARD_S)

        assert await response.json() == {"ok": True, "result": []}


async def test_a_second_poller_ends_the_first_with_a_conflict(
    telegram: TelegramEmulator,
) -> None:
    url = f"{telegram.base_url}{telegram.token}/getUpdates"
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(session.post(url, data={"timeout": "60"}))
        await telegram.wait_for_long_poll()

        second = await session.post(url, data={"timeout": "0"})
        first_response = await asyncio.wait_for(first, GUARD_S)

        assert first_response.status == 409
        assert (await first_response.json())["description"].startswith("Conflict")
        assert await second.json() == {"ok": True, "result": []}
