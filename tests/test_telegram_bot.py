"""The Telegram bot end to end: the real python-telegram-bot, over a real socket, against the
Bot API emulator, with the real dialog, engine and store behind it.

The model is the scripted backend ("<model> says: <question>") unless a test says otherwise;
one test runs the tiny real InternVL through the transformers backend.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.adapters.telegram import TelegramAdapter
from bot.core.admin import Admin
from bot.core.dialog import Dialog, DialogConfig
from bot.logs import RedactingFormatter
from bot.settings import Settings, TelegramSettings
from bot.store import Store
from bot.store.models import Exchange, ExchangeStatus, Photo, Rating
from engine.engine import Engine, EngineConfig
from engine.types import ModelSpec
from tests.factories import jpeg_bytes, png_declaring
from tests.scripted_backend import LONG_ANSWER, ScriptedBackend
from tests.telegram_emulator import (
    CHANNEL_BOT,
    DEFAULT_BOT_USERNAME,
    GROUP_ANONYMOUS_BOT,
    Call,
    Chat,
    TelegramEmulator,
)
from tests.telegram_emulator import (
    User as TelegramUser,
)

MODEL = "dishbot-test"
ADA = TelegramUser(42, "Ada", username="ada_eats", language_code="en")
LIN = TelegramUser(43, "林", language_code="zh-hans")
FOODIES = Chat.group(-1001234567890, "Foodies")
NIGHT_MARKET = Chat.group(-1009876543210, "Night Market")
NOODLE_NEWS = Chat.channel(-1005550001111, "Noodle News")
MENTION = f"@{DEFAULT_BOT_USERNAME}"
GUARD_S = 15.0  # how long a test waits for the bot; a guard against hangs, not a measurement


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    # The adapter is the subject here; the store's SQL runs on both databases elsewhere.
    return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'dishbot.db'}"


@pytest.fixture
async def telegram() -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator() as emulator:
        yield emulator


@dataclass
class Bot:
    telegram: TelegramEmulator
    store: Store
    backend: ScriptedBackend
    engine: Engine
    dialog: Dialog
    adapter: TelegramAdapter

    async def answer_to(
        self, user: TelegramUser, chat: Chat, message: dict[str, Any]
    ) -> dict[str, Any]:
        """The final answer to a user's message: the bot's message, as the user sees it now,
        that carries the rating buttons (the last part when the answer is split)."""
        question_id = message.get("message", message)["message_id"]  # an update or its message

        def final_answer() -> dict[str, Any] | None:
            replies_to = None
            for shown in self.telegram.messages_in(chat.id):
                replied = shown.get("reply_to_message")
                if replied is not None:
                    replies_to = replied["message_id"]
                if replies_to == question_id and "reply_markup" in shown:
                    return shown
            return None

        async def poll() -> dict[str, Any]:
            while (found := final_answer()) is None:  # noqa: ASYNC110 - polls the emulator
                await asyncio.sleep(0.01)
            return found

        return await asyncio.wait_for(poll(), GUARD_S)

    async def exchanges(self) -> list[Exchange]:
        async with AsyncSession(self.store.engine) as session:
            return list(await session.scalars(select(Exchange).order_by(Exchange.id)))

    async def count(self, model: type[Any]) -> int:
        async with AsyncSession(self.store.engine) as session:
            return int(await session.scalar(select(func.count()).select_from(model)) or 0)


@asynccontextmanager
async def running_bot(
    telegram: TelegramEmulator,
    store: Store,
    backend: ScriptedBackend | None = None,
    *,
    engine_config: EngineConfig | None = None,
    dialog_config: DialogConfig | None = None,
    model: ModelSpec | None = None,
    backend_factory: Callable[[], Any] | None = None,
    admin_settings: Settings | None = None,
) -> AsyncIterator[Bot]:
    backend = backend or ScriptedBackend(capacity=4)
    real_backend = backend_factory() if backend_factory is not None else backend
    engine = Engine(
        real_backend,
        model or ModelSpec("scripted", MODEL),
        engine_config or EngineConfig(max_pending_per_key=3),
    )
    async with engine:
        dialog = Dialog(
            store,
            engine,
            dialog_config or DialogConfig(edit_interval_s=0.05, questions_per_minute=60),
            admin=Admin(admin_settings, store, engine) if admin_settings else None,
        )
        settings = TelegramSettings(
            token=SecretStr(telegram.token),
            base_url=telegram.base_url,
            base_file_url=telegram.base_file_url,
        )
        adapter = TelegramAdapter(settings, dialog)
        await adapter.start()
        try:
            yield Bot(telegram, store, backend, engine, dialog, adapter)
        finally:
            await adapter.stop()


@pytest.fixture
async def bot(telegram: TelegramEmulator, store: Store) -> AsyncIterator[Bot]:
    async with running_bot(telegram, store) as running:
        yield running


def send_photo(
    telegram: TelegramEmulator,
    user: TelegramUser,
    chat: Chat,
    caption: str | None = None,
    *,
    colour: tuple[int, int, int] = (200, 80, 40),
    reply_to: int | None = None,
    sender_chat: Chat | None = None,
) -> dict[str, Any]:
    file_id = telegram.add_file(jpeg_bytes(colour, size=(96, 64)))
    return telegram.send_photo_message(
        user, chat, file_id, caption=caption, reply_to=reply_to, sender_chat=sender_chat
    )["message"]


def buttons_of(message_or_call: dict[str, Any] | Call) -> list[tuple[str, str]]:
    markup = (
        message_or_call.params["reply_markup"]
        if isinstance(message_or_call, Call)
        else message_or_call["reply_markup"]
    )
    return [(b["text"], b["callback_data"]) for row in markup["inline_keyboard"] for b in row]


def button_data(message_or_call: dict[str, Any] | Call, label: str) -> str:
    return next(data for text, data in buttons_of(message_or_call) if text.startswith(label))


def bot_texts(telegram: TelegramEmulator, chat: Chat) -> list[str]:
    return [m.get("text", "") for m in telegram.messages_in(chat.id)]


# -- asking about a photo --------------------------------------------------------------------


async def test_a_photo_with_a_caption_is_answered_with_rating_buttons_and_stored(bot: Bot) -> None:
    telegram = bot.telegram
    question = send_photo(telegram, ADA, ADA.private_chat, "is this spicy?")

    final = await bot.answer_to(ADA, ADA.private_chat, question)

    typing = telegram.calls("sendChatAction")
    assert typing
    assert typing[0].params["action"] == "typing"
    assert final["text"] == f"{MODEL} says: is this spicy?"
    assert [label for label, _ in buttons_of(final)] == ["👍", "👎", "✏️"]
    # The answer is stored before it is shown; which message shows it, just after.
    await _until(_reply_message_ids(bot), [str(final["message_id"])])
    [exchange] = await bot.exchanges()
    assert exchange.status is ExchangeStatus.ANSWERED
    assert exchange.question == "is this spicy?"
    assert exchange.answer == f"{MODEL} says: is this spicy?"
    assert exchange.model_version == MODEL
    assert exchange.latency_ms is not None
    assert exchange.latency_ms >= 0
    assert exchange.question_message_id == str(question["message_id"])
    assert exchange.reply_message_id == str(final["message_id"])
    assert exchange.photo_sha256 is not None
    photo = await bot.store.get_photo(exchange.photo_sha256)
    assert photo is not None
    assert bot.store.photo_file(photo).exists()


async def test_a_photo_without_caption_asks_what_dish_it_is_in_the_users_language(bot: Bot) -> None:
    telegram = bot.telegram
    english = send_photo(telegram, ADA, ADA.private_chat)
    chinese = send_photo(telegram, LIN, LIN.private_chat)

    assert (await bot.answer_to(ADA, ADA.private_chat, english))["text"] == (
        f"{MODEL} says: What dish is this?"
    )
    assert (await bot.answer_to(LIN, LIN.private_chat, chinese))["text"] == (
        f"{MODEL} says: 这是什么菜？"
    )


async def test_an_uncompressed_photo_sent_as_a_document_is_answered(bot: Bot) -> None:
    telegram = bot.telegram
    file_id = telegram.add_file(jpeg_bytes(size=(120, 90)))
    question = telegram.send_document(
        ADA, ADA.private_chat, file_id, file_name="dish.jpg", mime_type="image/jpeg"
    )

    final = await bot.answer_to(ADA, ADA.private_chat, question)

    assert final["text"] == f"{MODEL} says: What dish is this?"


async def test_the_answer_streams_into_one_message_at_a_paced_rate(
    telegram: TelegramEmulator, store: Store
) -> None:
    backend = ScriptedBackend(capacity=4, step_s=0.05)
    config = DialogConfig(edit_interval_s=0.3, questions_per_minute=60)
    async with running_bot(telegram, store, backend, dialog_config=config) as bot:
        words = " ".join(f"word{n}" for n in range(30))
        question = send_photo(telegram, ADA, ADA.private_chat, words)
        final = await bot.answer_to(ADA, ADA.private_chat, question)

    edits = [c for c in telegram.calls("editMessageText") if c.params["chat_id"] == ADA.id]
    sends = [c for c in telegram.calls("sendMessage") if c.params["chat_id"] == ADA.id]
    assert len(sends) == 1, "the answer is one message, edited as it grows"
    assert final["text"].endswith("word29")
    # 32 words at 50 ms is about 1.6 s of streaming: some partial edits, far fewer than words.
    assert 1 <= len(edits) - 1 < 12
    times = [c.at for c in edits]
    assert all(b - a >= 0.25 for a, b in itertools.pairwise(times))


async def test_an_answer_longer_than_a_telegram_message_arrives_whole_in_parts(bot: Bot) -> None:
    telegram = bot.telegram
    question = send_photo(telegram, ADA, ADA.private_chat, "long answer please")

    await bot.answer_to(ADA, ADA.private_chat, question)

    parts = bot_texts(telegram, ADA.private_chat)
    assert len(parts) >= 3
    assert all(len(part.encode("utf-16-le")) // 2 <= 4096 for part in parts)
    # Split at paragraph boundaries: nothing lost, nothing cut mid-sentence.
    assert "\n\n".join(parts).split() == LONG_ANSWER.split()
    assert all(part.rstrip().endswith(".") for part in parts)
    messages = telegram.messages_in(ADA.id)
    assert "reply_markup" in messages[-1], "the buttons go under the last part"
    assert all("reply_markup" not in m for m in messages[:-1])


async def test_someone_waiting_sees_how_many_questions_are_ahead(
    telegram: TelegramEmulator, store: Store
) -> None:
    backend = ScriptedBackend(capacity=1, step_s=0.01)
    sam = TelegramUser(44, "Sam", language_code="en")
    async with running_bot(telegram, store, backend) as bot:
        first = send_photo(telegram, ADA, ADA.private_chat, "slow one")
        await _until_async(lambda: bot.engine.stats().in_flight == 1)
        second = send_photo(telegram, sam, sam.private_chat, "slow two")
        await _until_async(lambda: bot.engine.stats().waiting == 1)
        third = send_photo(telegram, LIN, LIN.private_chat, "and mine?")

        notice = await telegram.wait_for(
            "sendMessage", lambda c: c.params["chat_id"] == LIN.id, timeout=GUARD_S
        )
        final = await bot.answer_to(LIN, LIN.private_chat, third)
        await bot.answer_to(ADA, ADA.private_chat, first)
        await bot.answer_to(sam, sam.private_chat, second)

    assert notice.params["text"] == "⏳ 1 ahead of you…"
    assert final["message_id"] == notice.result["message_id"], "the notice became the answer"
    assert final["text"] == f"{MODEL} says: and mine?"


# -- rating ----------------------------------------------------------------------------------


async def test_thumbs_up_is_acknowledged_stored_and_marked_then_thumbs_down_replaces_it(
    bot: Bot,
) -> None:
    telegram = bot.telegram
    question = send_photo(telegram, ADA, ADA.private_chat, "what is it?")
    final = await bot.answer_to(ADA, ADA.private_chat, question)
    answer = final

    query_id = telegram.press_button(ADA, answer, button_data(answer, "👍"))
    ack = await telegram.wait_for(
        "answerCallbackQuery", lambda c: c.params["callback_query_id"] == query_id
    )
    assert ack.params["text"] == "Thanks for the 👍!"
    marked = await telegram.wait_for("editMessageReplyMarkup")
    assert [label for label, _ in buttons_of(marked)] == ["👍 ✓", "👎", "✏️"]
    [exchange] = await bot.exchanges()
    assert [(r.value) for r in await bot.store.ratings(exchange.id)] == [1]

    answer = final
    telegram.press_button(ADA, answer, button_data(answer, "👎"))
    prompt = await telegram.wait_for(
        "sendMessage", lambda c: "What is it actually?" in c.params["text"]
    )
    assert prompt.params["reply_markup"]["force_reply"] is True
    ratings = await bot.store.ratings(exchange.id)
    assert [r.value for r in ratings] == [-1], "one rating per user, the latest press wins"


async def test_a_rating_button_still_works_after_the_bot_restarts(
    telegram: TelegramEmulator, store: Store
) -> None:
    async with running_bot(telegram, store) as bot:
        question = send_photo(telegram, ADA, ADA.private_chat, "before the restart")
        final = await bot.answer_to(ADA, ADA.private_chat, question)
    answer = final

    async with running_bot(telegram, store) as bot:  # a new Application, the same database
        query_id = telegram.press_button(ADA, answer, button_data(answer, "👍"))
        await telegram.wait_for(
            "answerCallbackQuery", lambda c: c.params["callback_query_id"] == query_id
        )
        [exchange] = await bot.exchanges()
        assert [r.value for r in await bot.store.ratings(exchange.id)] == [1]


# -- correcting and following up -------------------------------------------------------------


async def test_a_reply_to_the_pencils_question_after_a_restart_is_still_the_correction(
    telegram: TelegramEmulator, store: Store
) -> None:
    async with running_bot(telegram, store) as bot:
        question = send_photo(telegram, ADA, ADA.private_chat, "what is it?")
        answer = await bot.answer_to(ADA, ADA.private_chat, question)
        telegram.press_button(ADA, answer, button_data(answer, "✏️"))
        prompt = await telegram.wait_for(
            "sendMessage", lambda c: "What is it actually?" in c.params["text"]
        )

    async with running_bot(telegram, store) as bot:  # a new process, the same database
        telegram.send_text(
            ADA, ADA.private_chat, "干炒牛河", reply_to_message_id=prompt.result["message_id"]
        )
        thanks = await telegram.wait_for(
            "sendMessage", lambda c: c.params["text"].startswith("Thanks!")
        )
        assert "干炒牛河" in thanks.params["text"]
        [exchange] = await bot.exchanges()
        assert [c.text for c in await bot.store.corrections(exchange.id)] == ["干炒牛河"]
        assert bot.backend.jobs == [], "the correction was not taken for a follow-up question"


async def test_the_pencil_asks_what_it_is_and_the_reply_is_stored_as_a_correction(bot: Bot) -> None:
    telegram = bot.telegram
    question = send_photo(telegram, ADA, ADA.private_chat, "what is it?")
    final = await bot.answer_to(ADA, ADA.private_chat, question)
    answer = final

    telegram.press_button(ADA, answer, button_data(answer, "✏️"))
    prompt = await telegram.wait_for(
        "sendMessage", lambda c: "What is it actually?" in c.params["text"]
    )
    telegram.send_text(
        ADA,
        ADA.private_chat,
        "肠粉 (rice noodle roll)",
        reply_to_message_id=prompt.result["message_id"],
    )

    thanks = await telegram.wait_for(
        "sendMessage", lambda c: c.params["text"].startswith("Thanks!")
    )
    assert "肠粉 (rice noodle roll)" in thanks.params["text"]
    [exchange] = await bot.exchanges()
    [correction] = await bot.store.corrections(exchange.id)
    assert correction.text == "肠粉 (rice noodle roll)"
    assert len(bot.backend.jobs) == 1, "a correction is not a question for the model"


async def test_a_reply_to_an_answer_follows_up_with_the_same_photo_and_the_history(
    bot: Bot,
) -> None:
    telegram = bot.telegram
    question = send_photo(telegram, ADA, ADA.private_chat, "what is it?")
    final = await bot.answer_to(ADA, ADA.private_chat, question)

    follow_up = telegram.send_text(
        ADA, ADA.private_chat, "is it spicy?", reply_to_message_id=final["message_id"]
    )
    second = await bot.answer_to(ADA, ADA.private_chat, follow_up)

    assert second["text"] == f"{MODEL} says: is it spicy?"
    first_job, second_job = bot.backend.jobs
    assert [(t.question, t.answer) for t in second_job.history] == [
        ("what is it?", f"{MODEL} says: what is it?")
    ]
    assert len(second_job.images) == 1
    assert second_job.images[0].image.size == first_job.images[0].image.size
    first, second_exchange = await bot.exchanges()
    assert second_exchange.parent_id == first.id
    assert second_exchange.photo_sha256 == first.photo_sha256


async def test_in_a_private_chat_a_text_soon_after_a_photo_follows_it_up(bot: Bot) -> None:
    telegram = bot.telegram
    question = send_photo(telegram, ADA, ADA.private_chat, "what is it?")
    await bot.answer_to(ADA, ADA.private_chat, question)

    follow_up = telegram.send_text(ADA, ADA.private_chat, "where is it from?")
    answer = await bot.answer_to(ADA, ADA.private_chat, follow_up)

    assert answer["text"] == f"{MODEL} says: where is it from?"
    assert len(bot.backend.jobs[-1].history) == 1


async def test_text_with_no_photo_in_reach_gets_a_one_line_hint(bot: Bot) -> None:
    telegram = bot.telegram
    telegram.send_text(LIN, LIN.private_chat, "你好")

    hint = await telegram.wait_for("sendMessage")

    assert hint.params["text"] == "发一张菜的照片给我（或者回复我的某条回答），我就来回答。"
    assert bot.backend.jobs == []


# -- edits -----------------------------------------------------------------------------------


async def test_an_edited_caption_is_not_asked_again_and_the_rated_answer_stays(bot: Bot) -> None:
    telegram = bot.telegram
    question = send_photo(telegram, ADA, ADA.private_chat, "what is it?")
    answer = await bot.answer_to(ADA, ADA.private_chat, question)
    telegram.press_button(ADA, answer, button_data(answer, "👍"))
    await telegram.wait_for("answerCallbackQuery")

    telegram.edit_user_message(ADA.private_chat, question["message_id"], caption="is it spicy?")
    later = send_photo(telegram, ADA, ADA.private_chat, "and this one?", colour=(9, 9, 9))
    await bot.answer_to(ADA, ADA.private_chat, later)
    await asyncio.sleep(0.3)  # the edit came first; give it time to do anything at all

    assert [job.question for job in bot.backend.jobs] == ["what is it?", "and this one?"]
    assert len(telegram.calls("getFile")) == 2, "the edited photo is not even downloaded"
    replies = [m for m in telegram.messages_in(ADA.id) if "reply_markup" in m and "👍" in str(m)]
    assert len(replies) == 2, "one answer per photo sent, none for the edit"
    first, _ = await bot.exchanges()
    assert first.question == "what is it?"
    assert first.answer == f"{MODEL} says: what is it?"
    assert first.reply_message_id == str(answer["message_id"])
    assert [r.value for r in await bot.store.ratings(first.id)] == [1]
    assert telegram.message(ADA.id, answer["message_id"])["text"] == answer["text"]


async def test_an_edited_follow_up_question_is_not_asked_again(bot: Bot) -> None:
    telegram = bot.telegram
    question = send_photo(telegram, ADA, ADA.private_chat, "what is it?")
    await bot.answer_to(ADA, ADA.private_chat, question)
    follow_up = telegram.send_text(ADA, ADA.private_chat, "is it spicy?")["message"]
    await bot.answer_to(ADA, ADA.private_chat, follow_up)

    telegram.edit_user_message(ADA.private_chat, follow_up["message_id"], text="is it sweet?")
    telegram.send_text(ADA, ADA.private_chat, "/help")
    await telegram.wait_for("sendMessage", lambda c: "/forget" in c.params["text"])
    await asyncio.sleep(0.3)

    assert [job.question for job in bot.backend.jobs] == ["what is it?", "is it spicy?"]
    assert [e.question for e in await bot.exchanges()] == ["what is it?", "is it spicy?"]


# -- groups ----------------------------------------------------------------------------------


async def test_in_a_group_a_photo_is_answered_only_when_it_mentions_the_bot(bot: Bot) -> None:
    telegram = bot.telegram
    telegram.add_chat(FOODIES)
    ignored = send_photo(telegram, ADA, FOODIES, "look at my lunch")
    mentioned = send_photo(
        telegram, LIN, FOODIES, f"@{DEFAULT_BOT_USERNAME} 这是什么菜？", colour=(10, 200, 10)
    )

    answer = await bot.answer_to(LIN, FOODIES, mentioned)

    assert answer["text"] == f"{MODEL} says: 这是什么菜？", (
        "the mention is not part of the question"
    )
    assert [job.question for job in bot.backend.jobs] == ["这是什么菜？"]
    assert all(
        m.get("reply_to_message", {}).get("message_id") != ignored["message_id"]
        for m in telegram.messages_in(FOODIES.id)
    )
    assert len(await bot.exchanges()) == 1


async def test_in_a_group_a_reply_to_the_bot_is_answered(bot: Bot) -> None:
    telegram = bot.telegram
    telegram.add_chat(FOODIES)
    first = send_photo(telegram, ADA, FOODIES, f"@{DEFAULT_BOT_USERNAME} what is it?")
    final = await bot.answer_to(ADA, FOODIES, first)

    reply = telegram.send_text(
        ADA, FOODIES, "how is it cooked?", reply_to_message_id=final["message_id"]
    )
    chatter = telegram.send_text(LIN, FOODIES, "nice photo")["message"]
    answer = await bot.answer_to(ADA, FOODIES, reply)

    assert answer["text"] == f"{MODEL} says: how is it cooked?"
    await asyncio.sleep(0.2)
    assert not any(
        m.get("reply_to_message", {}).get("message_id") == chatter["message_id"]
        for m in telegram.messages_in(FOODIES.id)
    ), "chatter without a mention gets no answer, not even a hint"


# -- who is speaking: anonymous admins and channels ------------------------------------------


def placeholders_listed_as_admins(tmp_path: Path) -> Settings:
    # Listing the placeholder users must not make everyone who hides behind them an admin.
    admins = [f"telegram:{GROUP_ANONYMOUS_BOT.id}", f"telegram:{CHANNEL_BOT.id}"]
    return Settings(data_dir=tmp_path / "admin-data", admins=admins)


async def test_anonymous_admins_of_two_groups_are_their_groups_and_never_admins(
    telegram: TelegramEmulator, store: Store, tmp_path: Path
) -> None:
    config = DialogConfig(edit_interval_s=0.05, questions_per_minute=1)
    settings = placeholders_listed_as_admins(tmp_path)
    async with running_bot(telegram, store, dialog_config=config, admin_settings=settings) as bot:
        for group in (FOODIES, NIGHT_MARKET):
            telegram.add_chat(group)
        telegram.send_text(GROUP_ANONYMOUS_BOT, FOODIES, f"/stats{MENTION}", sender_chat=FOODIES)
        refused = await telegram.wait_for(
            "sendMessage", lambda c: c.params["chat_id"] == FOODIES.id
        )
        # One question a minute each: the two groups' anonymous admins do not share a limit.
        here = send_photo(
            telegram, GROUP_ANONYMOUS_BOT, FOODIES, f"{MENTION} what is it?", sender_chat=FOODIES
        )
        there = send_photo(
            telegram,
            GROUP_ANONYMOUS_BOT,
            NIGHT_MARKET,
            f"{MENTION} and this?",
            colour=(5, 50, 150),
            sender_chat=NIGHT_MARKET,
        )
        first = await bot.answer_to(GROUP_ANONYMOUS_BOT, FOODIES, here)
        second = await bot.answer_to(GROUP_ANONYMOUS_BOT, NIGHT_MARKET, there)

    assert refused.params["text"] == "That command is for admins."
    assert first["text"] == f"{MODEL} says: what is it?"
    assert second["text"] == f"{MODEL} says: and this?"
    foodies = await bot.store.find_user("telegram", f"chat:{FOODIES.id}")
    night_market = await bot.store.find_user("telegram", f"chat:{NIGHT_MARKET.id}")
    assert foodies is not None
    assert night_market is not None
    assert foodies.display_name == "Foodies"
    # The two groups' questions are handled side by side: either may be stored first.
    asked_by = sorted(e.user_id for e in await bot.exchanges())
    assert asked_by == sorted([foodies.id, night_market.id])
    assert await bot.store.find_user("telegram", str(GROUP_ANONYMOUS_BOT.id)) is None


async def test_a_message_sent_as_a_channel_is_the_channels_and_its_rating_the_pressers(
    telegram: TelegramEmulator, store: Store, tmp_path: Path
) -> None:
    settings = placeholders_listed_as_admins(tmp_path)
    async with running_bot(telegram, store, admin_settings=settings) as bot:
        telegram.add_chat(FOODIES)
        telegram.send_text(CHANNEL_BOT, FOODIES, f"/export{MENTION}", sender_chat=NOODLE_NEWS)
        refused = await telegram.wait_for(
            "sendMessage", lambda c: c.params["chat_id"] == FOODIES.id
        )
        question = send_photo(
            telegram, CHANNEL_BOT, FOODIES, f"{MENTION} what is it?", sender_chat=NOODLE_NEWS
        )
        answer = await bot.answer_to(CHANNEL_BOT, FOODIES, question)
        # Pressing a button shows who pressed it: the rating is that person's.
        query_id = telegram.press_button(ADA, answer, button_data(answer, "👍"))
        ack = await telegram.wait_for(
            "answerCallbackQuery", lambda c: c.params["callback_query_id"] == query_id
        )

    assert refused.params["text"] == "That command is for admins."
    assert not (tmp_path / "admin-data" / "training" / "exports").exists()
    assert answer["text"] == f"{MODEL} says: what is it?"
    assert ack.params["text"] == "Thanks for the 👍!"
    channel = await bot.store.find_user("telegram", f"chat:{NOODLE_NEWS.id}")
    ada = await bot.store.find_user("telegram", str(ADA.id))
    assert channel is not None
    assert ada is not None
    assert channel.display_name == "Noodle News"
    [exchange] = await bot.exchanges()
    assert exchange.user_id == channel.id
    assert [r.user_id for r in await bot.store.ratings(exchange.id)] == [ada.id]
    assert await bot.store.find_user("telegram", str(CHANNEL_BOT.id)) is None


async def test_an_admin_command_in_a_group_is_answered_only_in_a_private_chat(
    telegram: TelegramEmulator, store: Store, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "admin-data", admins=[f"telegram:{ADA.id}"])
    async with running_bot(telegram, store, admin_settings=settings):
        telegram.add_chat(FOODIES)
        telegram.send_text(ADA, FOODIES, f"/export{MENTION}")
        in_group = await telegram.wait_for(
            "sendMessage", lambda c: c.params["chat_id"] == FOODIES.id
        )
        telegram.send_text(ADA, ADA.private_chat, "/stats")
        in_private = await telegram.wait_for("sendMessage", lambda c: c.params["chat_id"] == ADA.id)

    assert in_group.params["text"] == (
        "Admin commands are answered in a private chat with me, not in a group."
    )
    assert not (tmp_path / "admin-data" / "training" / "exports").exists(), "nothing exported"
    assert in_private.params["text"].startswith("model: ")


async def test_forget_sent_on_behalf_of_a_group_asks_the_person_to_use_their_own_account(
    bot: Bot,
) -> None:
    telegram = bot.telegram
    telegram.add_chat(FOODIES)
    telegram.send_text(GROUP_ANONYMOUS_BOT, FOODIES, f"/forget{MENTION}", sender_chat=FOODIES)

    answer = await telegram.wait_for("sendMessage", lambda c: c.params["chat_id"] == FOODIES.id)

    assert answer.params["text"].startswith("/forget deletes one person's data")
    assert "reply_markup" not in answer.params, "no confirmation no one could press"


# -- platform trouble and bad input ----------------------------------------------------------


async def test_flood_control_on_send_message_delays_the_answer_but_does_not_lose_it(
    bot: Bot,
) -> None:
    telegram = bot.telegram
    telegram.fail_next("sendMessage", 429, retry_after=1)
    question = send_photo(telegram, ADA, ADA.private_chat, "after a flood wait")

    final = await bot.answer_to(ADA, ADA.private_chat, question)

    failed = [c for c in telegram.calls("sendMessage") if not c.ok]
    assert failed
    assert failed[0].error_code == 429
    assert final["text"] == f"{MODEL} says: after a flood wait"


async def test_a_document_that_is_not_an_image_gets_a_reason_and_the_next_user_is_served(
    bot: Bot,
) -> None:
    telegram = bot.telegram
    file_id = telegram.add_file(b"%PDF-1.7 not a photo", suffix="pdf")
    telegram.send_document(
        ADA, ADA.private_chat, file_id, file_name="menu.pdf", mime_type="application/pdf"
    )

    refusal = await telegram.wait_for("sendMessage", lambda c: c.params["chat_id"] == ADA.id)
    assert refusal.params["text"].startswith(
        "I can't use that file: menu.pdf is a application/pdf file"
    )
    assert telegram.calls("getFile") == [], "a file that is not an image is never downloaded"

    question = send_photo(telegram, LIN, LIN.private_chat, "下一个")
    assert (await bot.answer_to(LIN, LIN.private_chat, question))["text"] == f"{MODEL} says: 下一个"


async def test_a_decompression_bomb_is_refused_with_its_size_and_recorded(bot: Bot) -> None:
    telegram = bot.telegram
    file_id = telegram.add_file(png_declaring(100_000, 100_000), suffix="png")
    telegram.send_document(
        ADA, ADA.private_chat, file_id, file_name="huge.png", mime_type="image/png"
    )

    refusal = await telegram.wait_for("sendMessage", lambda c: c.params["chat_id"] == ADA.id)

    assert refusal.params["text"].startswith(
        "I can't use that image: the image has more than the 50 megapixels allowed"
    )
    [exchange] = await bot.exchanges()
    assert exchange.status is ExchangeStatus.FAILED
    assert exchange.photo_sha256 is None
    assert await bot.count(Photo) == 0
    question = send_photo(telegram, LIN, LIN.private_chat, "还在吗？")
    assert (await bot.answer_to(LIN, LIN.private_chat, question))[
        "text"
    ] == f"{MODEL} says: 还在吗？"


async def test_a_photo_over_20_mb_is_refused_before_it_is_downloaded(bot: Bot) -> None:
    telegram = bot.telegram
    file_id = telegram.add_file(jpeg_bytes(), file_size=21 * 1024 * 1024)
    telegram.send_document(
        ADA, ADA.private_chat, file_id, file_name="raw.jpg", mime_type="image/jpeg"
    )

    refusal = await telegram.wait_for("sendMessage", lambda c: c.params["chat_id"] == ADA.id)

    assert refusal.params["text"] == "That photo is larger than 20 MB; please send a smaller one."
    assert telegram.calls("getFile") == []


async def test_a_failure_in_the_engine_gets_an_apology_and_is_recorded(bot: Bot) -> None:
    telegram = bot.telegram
    question = send_photo(telegram, ADA, ADA.private_chat, "fail please")

    apology = await telegram.wait_for(
        "sendMessage", lambda c: c.params["chat_id"] == ADA.id and "Sorry" in c.params["text"]
    )

    assert "Traceback" not in apology.params["text"]
    await _until(lambda: _statuses(bot), [ExchangeStatus.FAILED])
    [exchange] = await bot.exchanges()
    assert exchange.error is not None
    assert "out of memory" in exchange.error
    assert exchange.question_message_id == str(question["message_id"])


# -- hostile input -----------------------------------------------------------------------------

FORGED_CALLBACK_DATA = {
    "huge-exchange-id": "dishbot:rate:99999999999999999999999:up",
    "superscript-digit": "dishbot:rate:²:up",
    "negative-id": "dishbot:rate:-1:up",
    "huge-correction-id": "dishbot:fix:99999999999999999999999",
    "empty-fields": "dishbot:::",
    "another-bots-data": "pollbot:vote:1",
}
QUIET_REFUSALS = (None, "That button no longer works.", "That answer is no longer stored.")


def failures_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "data", FORGED_CALLBACK_DATA.values(), ids=list(FORGED_CALLBACK_DATA.keys())
)
async def test_forged_callback_data_gets_a_quiet_refusal_and_the_bot_keeps_serving(
    bot: Bot, data: str, caplog: pytest.LogCaptureFixture
) -> None:
    telegram = bot.telegram
    question = send_photo(telegram, ADA, ADA.private_chat, "what is it?")
    answer = await bot.answer_to(ADA, ADA.private_chat, question)

    query_id = telegram.forge_button_press(ADA, answer, data)
    ack = await telegram.wait_for(
        "answerCallbackQuery", lambda c: c.params["callback_query_id"] == query_id
    )

    assert ack.params.get("text") in QUIET_REFUSALS
    assert not any("Sorry" in text for text in bot_texts(telegram, ADA.private_chat))
    assert failures_logged(caplog) == [], "no apology, no traceback: nothing failed"
    [exchange] = await bot.exchanges()
    assert await bot.store.ratings(exchange.id) == []
    following = send_photo(telegram, LIN, LIN.private_chat, "下一个")
    assert (await bot.answer_to(LIN, LIN.private_chat, following))["text"] == (
        f"{MODEL} says: 下一个"
    )


async def test_buttons_forged_for_another_chats_answer_change_nothing_there(bot: Bot) -> None:
    telegram = bot.telegram
    theirs = send_photo(telegram, LIN, LIN.private_chat, "她的")
    await bot.answer_to(LIN, LIN.private_chat, theirs)
    mine = send_photo(telegram, ADA, ADA.private_chat, "mine", colour=(1, 1, 1))
    answer = await bot.answer_to(ADA, ADA.private_chat, mine)
    their_exchange, _ = await bot.exchanges()

    acks = []
    for data in (f"dishbot:rate:{their_exchange.id}:down", f"dishbot:fix:{their_exchange.id}"):
        query_id = telegram.forge_button_press(ADA, answer, data)
        acks.append(
            await telegram.wait_for(
                "answerCallbackQuery", lambda c, q=query_id: c.params["callback_query_id"] == q
            )
        )

    assert [ack.params.get("text") for ack in acks] == ["That answer is no longer stored."] * 2
    assert await bot.store.ratings(their_exchange.id) == []
    assert not any("What is it actually?" in t for t in bot_texts(telegram, ADA.private_chat))
    assert not any("What is it actually?" in t for t in bot_texts(telegram, LIN.private_chat))


async def test_a_forget_confirmation_forged_for_another_user_deletes_nothing(bot: Bot) -> None:
    telegram = bot.telegram
    question = send_photo(telegram, ADA, ADA.private_chat, "mine")
    await bot.answer_to(ADA, ADA.private_chat, question)
    telegram.send_text(LIN, LIN.private_chat, "/forget")
    confirm = await telegram.wait_for("sendMessage", lambda c: c.params["chat_id"] == LIN.id)
    confirmation = telegram.message(LIN.id, confirm.result["message_id"])

    query_id = telegram.forge_button_press(LIN, confirmation, f"dishbot:forget:{ADA.id}")
    ack = await telegram.wait_for(
        "answerCallbackQuery", lambda c: c.params["callback_query_id"] == query_id
    )

    assert ack.params["text"] == "这个按钮不是给你的。"
    assert await bot.store.find_user("telegram", str(ADA.id)) is not None
    assert await bot.count(Exchange) == 1
    assert telegram.message(LIN.id, confirmation["message_id"]) == confirmation, "unchanged"


def _words(length: int) -> str:
    """Words of a question, exactly ``length`` characters long."""
    text = ("spicy " * length)[:length]
    return text[:-1] + "y" if text.endswith(" ") else text


async def test_captions_and_texts_at_telegrams_limits_are_refused_politely_not_asked(
    bot: Bot,
) -> None:
    telegram = bot.telegram
    caption = _words(1024)  # the longest caption Telegram sends
    photo = send_photo(telegram, ADA, ADA.private_chat, caption)
    caption_refusal = await telegram.wait_for(
        "sendMessage", lambda c: c.params["reply_parameters"]["message_id"] == photo["message_id"]
    )
    text = telegram.send_text(LIN, LIN.private_chat, _words(4096))["message"]  # the longest text
    text_reply = await telegram.wait_for("sendMessage", lambda c: c.params["chat_id"] == LIN.id)

    assert caption_refusal.params["text"].startswith("That question is too long for me")
    assert text_reply.params["reply_parameters"]["message_id"] == text["message_id"]
    assert "Traceback" not in text_reply.params["text"]
    assert bot.backend.jobs == [], "the model is not given a question over the length limit"
    following = send_photo(telegram, LIN, LIN.private_chat, "下一个")
    assert (await bot.answer_to(LIN, LIN.private_chat, following))["text"] == (
        f"{MODEL} says: 下一个"
    )


async def test_a_caption_over_telegrams_limit_in_a_forged_update_is_not_asked(bot: Bot) -> None:
    telegram = bot.telegram
    photo = telegram.add_file(jpeg_bytes())
    telegram.push_update(  # no Telegram client sends this; an update is all it takes
        {
            "message": {
                "message_id": 9001,
                "from": ADA.to_api(),
                "chat": ADA.private_chat.to_api(),
                "date": int(time.time()),
                "photo": [{"file_id": photo, "file_unique_id": "u1", "width": 96, "height": 64}],
                "caption": _words(50_000),
            }
        }
    )

    refusal = await telegram.wait_for("sendMessage", lambda c: c.params["chat_id"] == ADA.id)

    assert refusal.params["text"].startswith("That question is too long for me")
    assert bot.backend.jobs == []
    [exchange] = await bot.exchanges()
    assert exchange.status is ExchangeStatus.FAILED
    assert len(exchange.question) <= 1024, "a flood of text is not stored whole"


@pytest.mark.parametrize("file_name", ["../../etc/passwd.jpg", "a/b\\c.png", "/tmp/evil.jpg"])
async def test_a_documents_file_name_never_becomes_a_path_on_disk(
    bot: Bot, file_name: str, tmp_path: Path
) -> None:
    telegram = bot.telegram
    file_id = telegram.add_file(jpeg_bytes(size=(120, 90)))
    question = telegram.send_document(
        ADA, ADA.private_chat, file_id, file_name=file_name, mime_type="image/jpeg"
    )

    answer = await bot.answer_to(ADA, ADA.private_chat, question)

    assert answer["text"] == f"{MODEL} says: What dish is this?"
    [exchange] = await bot.exchanges()
    assert exchange.photo_sha256 is not None
    photo = await bot.store.get_photo(exchange.photo_sha256)
    assert photo is not None
    stored = bot.store.photo_file(photo)
    assert stored.name.startswith(exchange.photo_sha256), "named by its content only"
    assert _images_under(tmp_path) == [stored]
    leaf = file_name.replace("\\", "/").rsplit("/", 1)[-1]
    assert not _exists(Path("/etc", leaf))
    assert not _exists(Path("/tmp", leaf))


def _images_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.suffix in (".jpg", ".png")]


def _exists(path: Path) -> bool:
    return path.exists()


async def test_invisible_characters_in_a_correction_are_stored_cleaned(bot: Bot) -> None:
    telegram = bot.telegram
    question = send_photo(telegram, ADA, ADA.private_chat, "what is it?")
    answer = await bot.answer_to(ADA, ADA.private_chat, question)
    telegram.press_button(ADA, answer, button_data(answer, "✏️"))
    prompt = await telegram.wait_for(
        "sendMessage", lambda c: "What is it actually?" in c.params["text"]
    )

    telegram.send_text(
        ADA,
        ADA.private_chat,
        "\u200b肠\u200c粉\u202e (rice\u2066 noodle\u2069 roll)\ufeff\u200e",
        reply_to_message_id=prompt.result["message_id"],
    )

    thanks = await telegram.wait_for(
        "sendMessage", lambda c: c.params["text"].startswith("Thanks!")
    )
    [exchange] = await bot.exchanges()
    [correction] = await bot.store.corrections(exchange.id)
    assert correction.text == "肠粉 (rice noodle roll)"
    assert "肠粉 (rice noodle roll)" in thanks.params["text"]


def _reply_message_ids(bot: Bot) -> Callable[[], Any]:
    async def read() -> list[str | None]:
        return [e.reply_message_id for e in await bot.exchanges()]

    return read


async def _statuses(bot: Bot) -> list[ExchangeStatus]:
    return [e.status for e in await bot.exchanges()]


async def _until(read: Callable[[], Any], expected: Any) -> None:
    async def poll() -> None:
        while await read() != expected:  # noqa: ASYNC110 - polls the database
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), GUARD_S)


# -- limits ----------------------------------------------------------------------------------


async def test_a_user_over_the_rate_limit_is_asked_to_slow_down(
    telegram: TelegramEmulator, store: Store
) -> None:
    config = DialogConfig(edit_interval_s=0.05, questions_per_minute=2)
    async with running_bot(telegram, store, dialog_config=config) as bot:
        questions = [
            send_photo(telegram, ADA, ADA.private_chat, f"photo {n}", colour=(n * 40, 0, 0))
            for n in range(3)
        ]
        slow_down = await telegram.wait_for(
            "sendMessage", lambda c: "faster than I can eat" in c.params["text"]
        )
        for question in questions:
            if slow_down.params["reply_parameters"]["message_id"] != question["message_id"]:
                await bot.answer_to(ADA, ADA.private_chat, question)
        statuses = sorted(e.status.value for e in await bot.exchanges())
    assert statuses == ["answered", "answered", "failed"]


async def test_a_full_queue_answers_busy_try_again_in_a_minute(
    telegram: TelegramEmulator, store: Store
) -> None:
    backend = ScriptedBackend(capacity=1, step_s=0.05)
    config = EngineConfig(max_pending=1, max_pending_per_key=3)
    async with running_bot(telegram, store, backend, engine_config=config) as bot:
        send_photo(telegram, ADA, ADA.private_chat, "slow first")
        await telegram.wait_for("sendChatAction", lambda c: c.params["chat_id"] == ADA.id)
        await _until_async(lambda: bot.engine.stats().in_flight == 1)
        send_photo(telegram, LIN, LIN.private_chat, "second")
        await _until_async(lambda: bot.engine.stats().waiting == 1)
        third = TelegramUser(44, "Sam", language_code="en")
        send_photo(telegram, third, third.private_chat, "third")

        busy = await telegram.wait_for("sendMessage", lambda c: c.params["chat_id"] == third.id)
    assert busy.params["text"] == "I'm very busy right now — please try again in a minute."


async def _until_async(condition: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 - polls the engine
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), GUARD_S)


async def test_twenty_users_sending_photos_at_once_are_all_answered_in_a_fair_order(
    telegram: TelegramEmulator, store: Store
) -> None:
    backend = ScriptedBackend(capacity=2, step_s=0.03)
    users = [TelegramUser(1000 + n, f"user{n}", language_code="en") for n in range(20)]
    flooder, others = users[0], users[1:]
    async with running_bot(telegram, store, backend) as bot:
        # The flooder sends three photos just before the nineteen others send one each;
        # the first two take the backend's two slots for a while ("slow").
        flood = [
            send_photo(telegram, flooder, flooder.private_chat, f"slow flood {n}", colour=(n, 1, 1))
            for n in range(3)
        ]
        await _until_async(lambda: bot.engine.stats().in_flight == 2)
        questions = [
            send_photo(telegram, u, u.private_chat, f"from {u.first_name}") for u in others
        ]
        await _until_async(lambda: bot.engine.stats().waiting == 20)

        for user, question in zip(others, questions, strict=True):
            await bot.answer_to(user, user.private_chat, question)
        for question in flood:
            await bot.answer_to(flooder, flooder.private_chat, question)

    started = [job.question for job in backend.jobs]
    assert len(started) == 22
    assert all(q.startswith("slow flood") for q in started[:2])
    # Everyone else goes before the flooder's third photo, though it was sent first.
    assert sorted(started[2:21]) == sorted(f"from {u.first_name}" for u in others)
    assert started[21].startswith("slow flood")


# -- commands --------------------------------------------------------------------------------


async def test_help_is_in_the_users_language_and_commands_are_registered(bot: Bot) -> None:
    telegram = bot.telegram
    telegram.send_text(ADA, ADA.private_chat, "/help")
    telegram.send_text(LIN, LIN.private_chat, "/help")

    english = await telegram.wait_for("sendMessage", lambda c: c.params["chat_id"] == ADA.id)
    chinese = await telegram.wait_for("sendMessage", lambda c: c.params["chat_id"] == LIN.id)

    assert "/forget" in english.params["text"]
    assert "How to use dishbot" in english.params["text"]
    assert "使用方法" in chinese.params["text"]
    assert [c["command"] for c in telegram.commands()] == ["help", "cancel", "forget"]
    assert [c["command"] for c in telegram.commands(language_code="zh")] == [
        "help",
        "cancel",
        "forget",
    ]


async def test_start_greets_the_user(bot: Bot) -> None:
    bot.telegram.send_text(ADA, ADA.private_chat, "/start")
    greeting = await bot.telegram.wait_for("sendMessage")
    assert greeting.params["text"].startswith("Hi! I'm dishbot.")


async def test_cancel_drops_the_users_waiting_questions(
    telegram: TelegramEmulator, store: Store
) -> None:
    backend = ScriptedBackend(capacity=1, step_s=0.05)
    async with running_bot(telegram, store, backend) as bot:
        send_photo(telegram, ADA, ADA.private_chat, "slow and long")
        await _until_async(lambda: bot.engine.stats().in_flight == 1)
        telegram.send_text(ADA, ADA.private_chat, "/cancel")

        done = await telegram.wait_for(
            "sendMessage", lambda c: c.params["text"].startswith("Dropped")
        )
        assert done.params["text"] == "Dropped 1 waiting question(s)."
        await _until(lambda: _statuses(bot), [ExchangeStatus.FAILED])
        # The answer in the making (or the place-in-line notice) now says so.
        await _until_async(lambda: "Cancelled." in bot_texts(telegram, ADA.private_chat))
    [exchange] = await bot.exchanges()
    assert exchange.error == "cancelled"


async def test_forget_asks_first_then_deletes_everything_about_the_user(bot: Bot) -> None:
    telegram = bot.telegram
    question = send_photo(telegram, ADA, ADA.private_chat, "mine")
    final = await bot.answer_to(ADA, ADA.private_chat, question)
    answer = final
    telegram.press_button(ADA, answer, button_data(answer, "👍"))
    await telegram.wait_for("answerCallbackQuery")
    others = send_photo(telegram, LIN, LIN.private_chat, "别人的", colour=(1, 2, 3))
    await bot.answer_to(LIN, LIN.private_chat, others)

    telegram.send_text(ADA, ADA.private_chat, "/forget")
    confirm = await telegram.wait_for(
        "sendMessage", lambda c: "cannot be undone" in c.params["text"]
    )
    assert await bot.count(Exchange) == 2, "nothing is deleted before the confirmation"
    confirmation = telegram.message(ADA.id, confirm.result["message_id"])
    telegram.press_button(ADA, confirmation, button_data(confirmation, "🗑"))

    done = await telegram.wait_for("editMessageText", lambda c: c.params["text"].startswith("Done"))
    assert "1 question(s), 1 rating(s)" in done.params["text"]
    assert await bot.store.find_user("telegram", str(ADA.id)) is None
    assert await bot.count(Rating) == 0
    assert await bot.count(Exchange) == 1, "the other user's question stays"
    assert await bot.count(Photo) == 1


async def test_only_the_user_who_asked_to_forget_can_confirm_it(bot: Bot) -> None:
    telegram = bot.telegram
    telegram.add_chat(FOODIES)
    telegram.send_text(ADA, FOODIES, f"/forget@{DEFAULT_BOT_USERNAME}")
    confirm = await telegram.wait_for(
        "sendMessage", lambda c: "cannot be undone" in c.params["text"]
    )
    confirmation = telegram.message(FOODIES.id, confirm.result["message_id"])

    query_id = telegram.press_button(LIN, confirmation, button_data(confirmation, "🗑"))

    ack = await telegram.wait_for(
        "answerCallbackQuery", lambda c: c.params["callback_query_id"] == query_id
    )
    assert ack.params["text"] == "这个按钮不是给你的。"
    assert await bot.store.find_user("telegram", str(ADA.id)) is not None


async def test_admin_commands_are_refused_to_everyone_else(bot: Bot) -> None:
    telegram = bot.telegram
    telegram.send_text(ADA, ADA.private_chat, "/nonsense")
    unknown = await telegram.wait_for("sendMessage")
    assert unknown.params["text"].startswith("I don't know that command.")


# -- the whole path with a real model --------------------------------------------------------


async def test_the_tiny_real_model_answers_a_photo_through_telegram(
    telegram: TelegramEmulator, store: Store, tiny_internvl: Path
) -> None:
    from engine.backends.transformers import TransformersBackend, TransformersConfig

    def backend() -> TransformersBackend:
        return TransformersBackend(TransformersConfig(device="cpu", max_batch_size=2))

    async with running_bot(
        telegram,
        store,
        backend_factory=backend,
        model=ModelSpec(str(tiny_internvl), "tiny-internvl"),
        engine_config=EngineConfig(max_new_tokens=8),
    ) as bot:
        question = send_photo(telegram, ADA, ADA.private_chat, "what is it?")
        final = await bot.answer_to(ADA, ADA.private_chat, question)

    [exchange] = await bot.exchanges()
    assert exchange.status is ExchangeStatus.ANSWERED
    assert exchange.model_version == "tiny-internvl"
    shown = final["text"]
    assert shown == (exchange.answer or "").strip() or shown.startswith("(I have no answer")


async def test_dishbot_run_with_a_token_serves_telegram_until_stopped(
    telegram: TelegramEmulator, tiny_internvl: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "run-data"
    env = {
        **os.environ,
        "DISHBOT_DATA_DIR": str(data_dir),
        "DISHBOT_TELEGRAM__TOKEN": telegram.token,
        "DISHBOT_TELEGRAM__BASE_URL": telegram.base_url,
        "DISHBOT_TELEGRAM__BASE_FILE_URL": telegram.base_file_url,
        "DISHBOT_ENGINE__BACKEND": "transformers",
        "DISHBOT_ENGINE__MODEL": str(tiny_internvl),
        "DISHBOT_ENGINE__MAX_NEW_TOKENS": "8",
    }
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("dishbot")),
        "run",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await telegram.wait_for("getUpdates", timeout=60)  # the model loads first
        question = send_photo(telegram, ADA, ADA.private_chat, "what is it?")
        answer = await telegram.wait_for(
            "editMessageText", lambda c: c.params.get("reply_markup") is not None, timeout=60
        )
        shown = telegram.message(ADA.id, int(answer.params["message_id"]))
        assert shown["reply_to_message"]["message_id"] == question["message_id"]
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)

    assert process.returncode == 0, stderr.decode()
    assert (data_dir / "dishbot.db").is_file(), "SQLite was created and migrated on start"
    assert telegram.token not in stderr.decode(), "the token never reaches the log"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def webhook_settings(telegram: TelegramEmulator, secret: str | None) -> TelegramSettings:
    return TelegramSettings(
        token=SecretStr(telegram.token),
        base_url=telegram.base_url,
        base_file_url=telegram.base_file_url,
        mode="webhook",
        webhook_url="https://dishbot.example.org/telegram",
        webhook_listen="127.0.0.1",
        webhook_port=_free_port(),
        webhook_path="/telegram",
        webhook_secret=None if secret is None else SecretStr(secret),
    )


@asynccontextmanager
async def webhook_bot(settings: TelegramSettings, store: Store) -> AsyncIterator[str]:
    """A bot in webhook mode; yields the local URL Telegram would post updates to."""
    engine = Engine(ScriptedBackend(), ModelSpec("scripted", MODEL), EngineConfig())
    async with engine:
        adapter = TelegramAdapter(
            settings, Dialog(store, engine, DialogConfig(edit_interval_s=0.05))
        )
        await adapter.start()
        try:
            yield f"http://127.0.0.1:{settings.webhook_port}{settings.webhook_path}"
        finally:
            await adapter.stop()


async def test_webhook_mode_registers_the_url_and_secret_and_answers_pushed_updates(
    telegram: TelegramEmulator, store: Store
) -> None:
    async with webhook_bot(webhook_settings(telegram, "s3cret-token"), store) as hook:
        registered = await telegram.wait_for("setWebhook")
        assert registered.params["url"] == "https://dishbot.example.org/telegram"
        assert registered.params["secret_token"] == "s3cret-token"
        assert telegram.calls("getUpdates") == [], "no polling in webhook mode"

        update = telegram.send_photo_message(
            ADA, ADA.private_chat, telegram.add_file(jpeg_bytes()), caption="pushed"
        )
        async with aiohttp.ClientSession() as http:
            forged = await http.post(hook, json=update, headers={SECRET_HEADER: "wrong"})
            assert forged.status == 403
            pushed = await http.post(hook, json=update, headers={SECRET_HEADER: "s3cret-token"})
            assert pushed.status == 200

        answer = await telegram.wait_for(
            "editMessageText", lambda c: c.params.get("reply_markup") is not None
        )
        assert answer.params["text"] == f"{MODEL} says: pushed"
        assert len(await store_exchanges(store)) == 1, "the forged copy was not processed"


async def test_forged_webhook_update_without_the_secret_is_refused_when_none_is_configured(
    telegram: TelegramEmulator, store: Store
) -> None:
    async with webhook_bot(webhook_settings(telegram, secret=None), store) as hook:
        registered = await telegram.wait_for("setWebhook")
        secret = registered.params.get("secret_token")
        assert secret is not None, "webhook mode never runs without a secret"
        assert re.fullmatch(r"[A-Za-z0-9_-]{32,256}", secret), "strong, and what Telegram allows"

        # Someone who found the URL posts an update "from" Ada.
        update = telegram.send_photo_message(
            ADA, ADA.private_chat, telegram.add_file(jpeg_bytes()), caption="forged?"
        )
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {SECRET_HEADER: ""}, {SECRET_HEADER: "guess"}):
                forged = await http.post(hook, json=update, headers=headers)
                assert forged.status == 403, headers
            await asyncio.sleep(0.2)
            assert telegram.calls("sendChatAction") == []
            assert await store_exchanges(store) == [], "a forged update never reaches the dialog"

            pushed = await http.post(hook, json=update, headers={SECRET_HEADER: secret})
            assert pushed.status == 200

        answer = await telegram.wait_for(
            "editMessageText", lambda c: c.params.get("reply_markup") is not None
        )
        assert answer.params["text"] == f"{MODEL} says: forged?"


async def test_a_generated_webhook_secret_never_reaches_the_log(
    telegram: TelegramEmulator, store: Store, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", telegram=webhook_settings(telegram, None))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter(settings.secret_values()))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # PTB logs every call's parameters at DEBUG
    try:
        async with webhook_bot(settings.telegram, store):
            registered = await telegram.wait_for("setWebhook")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)

    secret = registered.params.get("secret_token")
    assert secret, "a secret was registered"
    logged = stream.getvalue()
    assert "setWebhook" in logged, "the call that carries the secret was logged"
    assert secret not in logged


SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


async def store_exchanges(store: Store) -> list[Exchange]:
    async with AsyncSession(store.engine) as session:
        return list(await session.scalars(select(Exchange)))


async def test_an_answer_telegram_refuses_to_deliver_is_recorded_as_undelivered(bot: Bot) -> None:
    telegram = bot.telegram
    telegram.fail_next(
        "sendMessage", 403, description="Forbidden: bot was blocked by the user", times=3
    )
    send_photo(telegram, ADA, ADA.private_chat, "blocked")

    await _until(lambda: _statuses(bot), [ExchangeStatus.FAILED])

    [exchange] = await bot.exchanges()
    assert exchange.error == "the answer could not be delivered"
    question = send_photo(telegram, LIN, LIN.private_chat, "下一个")
    assert (await bot.answer_to(LIN, LIN.private_chat, question))["text"] == f"{MODEL} says: 下一个"


async def test_an_admin_exports_the_feedback_from_the_chat_and_others_may_not(
    telegram: TelegramEmulator, store: Store, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "admin-data", admins=[f"telegram:{ADA.id}"])
    async with running_bot(telegram, store, admin_settings=settings) as bot:
        question = send_photo(telegram, LIN, LIN.private_chat, "what is it?")
        final = await bot.answer_to(LIN, LIN.private_chat, question)
        telegram.press_button(LIN, final, button_data(final, "👍"))
        await telegram.wait_for("answerCallbackQuery")

        telegram.send_text(LIN, LIN.private_chat, "/export")
        refused = await telegram.wait_for(
            "sendMessage", lambda c: c.params["chat_id"] == LIN.id and "管理员" in c.params["text"]
        )
        telegram.send_text(ADA, ADA.private_chat, "/export")
        summary = await telegram.wait_for(
            "sendMessage",
            lambda c: c.params["chat_id"] == ADA.id and c.params["text"].startswith("Exported"),
        )

    assert refused.params["text"] == "这个命令只有管理员可以用。"
    assert summary.params["text"].startswith("Exported 1 samples")
    [export_dir] = (tmp_path / "admin-data" / "training" / "exports").iterdir()
    records = [
        line
        for name in ("train.jsonl", "val.jsonl")
        for line in (export_dir / name).read_text().splitlines()
    ]
    assert len(records) == 1
    assert "python -m xtuner.tools.train xtuner_config.py" in summary.params["text"]
