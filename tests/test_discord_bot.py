"""The Discord bot end to end: the real discord.py, over real sockets, against the Discord
emulator, with the real dialog, engine and store behind it.

The model is the scripted backend ("<model> says: <question>"). Each test plays Discord users
(messages, attachments, button presses, forms, slash commands) and checks what they would
see, what an operator would find in the database, and that discord.py logged no error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.adapters.discord import ACK_MARGIN_S, DiscordAdapter
from bot.adapters.telegram import TelegramAdapter
from bot.app import App
from bot.core.admin import Admin
from bot.core.dialog import MAX_QUESTION_LENGTH, Dialog, DialogConfig
from bot.core.limits import DISCORD_ACK_SECONDS, DISCORD_MESSAGE_LENGTH
from bot.errors import ConfigError
from bot.settings import DiscordSettings, Settings, TelegramSettings
from bot.store import ReportTarget, RunStage, Store
from bot.store.models import Correction, Exchange, ExchangeStatus, Photo, Rating
from bot.training.runs import RunSupervisor
from bot.training.trainers import trainer_for
from bot.training.versions import ensure_base_version
from engine.engine import Engine, EngineConfig
from engine.types import ModelSpec
from tests.discord_emulator import (
    EPHEMERAL,
    LOADING,
    ApiObject,
    Call,
    DiscordEmulator,
    InteractionType,
)
from tests.factories import jpeg_bytes
from tests.scripted_backend import LONG_ANSWER, ScriptedBackend
from tests.telegram_emulator import TelegramEmulator
from tests.telegram_emulator import User as TelegramUser

MODEL = "dishbot-test"
GUARD_S = 30.0  # how long a test waits for the bot; a guard against hangs, not a measurement
CALLBACK = "POST /interactions/{interaction_id}/{token}/callback"
CREATE_MESSAGE = "POST /channels/{channel_id}/messages"
EDIT_MESSAGE = "PATCH /channels/{channel_id}/messages/{message_id}"
DOWNLOAD = "GET /attachments/{attachment_id}/{filename}"
TYPING = "POST /channels/{channel_id}/typing"
DEFERRED_WITH_THINKING = 5
MODAL = 9
CHANNEL_MESSAGE = 4


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    # The adapter is the subject here; the store's SQL runs on both databases elsewhere.
    return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'dishbot.db'}"


@pytest.fixture(autouse=True)
def no_logged_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """discord.py logs a failing handler instead of raising it; so does the dialog."""
    yield
    errors = [
        f"{record.name}: {record.getMessage()}"
        for record in caplog.records
        if record.name.startswith(("discord", "asyncio", "bot")) and record.levelno >= logging.ERROR
    ]
    assert errors == []


@pytest.fixture
async def emulator(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[DiscordEmulator]:
    async with DiscordEmulator() as emulator:
        # The adapter points discord.py at the emulator from its settings; monkeypatch puts
        # discord.py's endpoints back after the test.
        monkeypatch.setattr(discord.http.Route, "BASE", emulator.api_base)
        monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(emulator.gateway_url))
        yield emulator


@dataclass(frozen=True)
class Server:
    """A server with a text channel, two users, and Ada's DM channel with the bot."""

    guild_id: int
    channel_id: int
    ada: ApiObject
    lin: ApiObject
    ada_dm: int


@pytest.fixture
def server(emulator: DiscordEmulator) -> Server:
    guild_id = emulator.add_guild("Foodies")
    ada = emulator.add_user("ada", global_name="Ada")
    return Server(
        guild_id,
        emulator.add_channel(guild_id, "dishes"),
        ada,
        emulator.add_user("lin", global_name="林"),
        emulator.add_dm_channel(ada),
    )


@dataclass
class Bot:
    emulator: DiscordEmulator
    store: Store
    backend: ScriptedBackend
    engine: Engine
    dialog: Dialog
    adapter: DiscordAdapter

    async def answer_to(self, channel_id: int, asked: ApiObject) -> ApiObject:
        return await answer_to(self.emulator, channel_id, asked)

    async def reply_stored(self, message_id: str) -> None:
        """Wait until an answer's message id is stored (just after the answer is shown)."""

        async def poll() -> None:
            while message_id not in [e.reply_message_id for e in await self.exchanges()]:  # noqa: ASYNC110 - polls the database
                await asyncio.sleep(0.01)

        await asyncio.wait_for(poll(), 10)

    async def exchanges(self) -> list[Exchange]:
        return await stored_exchanges(self.store)

    async def count(self, model: type[Any]) -> int:
        async with AsyncSession(self.store.engine) as session:
            return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def stored_exchanges(store: Store) -> list[Exchange]:
    async with AsyncSession(store.engine) as session:
        return list(await session.scalars(select(Exchange).order_by(Exchange.id)))


async def answer_to(emulator: DiscordEmulator, channel_id: int, asked: ApiObject) -> ApiObject:
    """The final answer to a user's message or slash command, as users see it now: the
    bot's message carrying the rating buttons (the last part when the answer is split)."""
    await emulator.wait_until(
        lambda: _final_answer(emulator, channel_id, asked["id"]) is not None, GUARD_S
    )
    answer = _final_answer(emulator, channel_id, asked["id"])
    assert answer is not None
    return answer


def _final_answer(emulator: DiscordEmulator, channel_id: int, asked_id: str) -> ApiObject | None:
    answering = None
    for shown in emulator.messages_in(channel_id):
        if "message_reference" in shown:
            answering = shown["message_reference"]["message_id"]
        elif "interaction_metadata" in shown:
            answering = shown["interaction_metadata"]["id"]
        if answering == asked_id and shown["components"]:
            return shown
    return None


def discord_settings(emulator: DiscordEmulator, guild_ids: Sequence[int] = ()) -> DiscordSettings:
    return DiscordSettings(
        token=SecretStr(emulator.token),
        api_base=emulator.api_base,
        gateway_url=emulator.gateway_url,
        guild_ids=list(guild_ids),
    )


@asynccontextmanager
async def running_bot(
    emulator: DiscordEmulator,
    store: Store,
    *,
    guild_ids: Sequence[int] = (),
    ack_after_s: float = DISCORD_ACK_SECONDS - ACK_MARGIN_S,
    dialog_config: DialogConfig | None = None,
    admin_settings: Settings | None = None,
) -> AsyncIterator[Bot]:
    backend = ScriptedBackend(capacity=4)
    engine = Engine(backend, ModelSpec("scripted", MODEL), EngineConfig(max_pending_per_key=3))
    async with engine:
        dialog = Dialog(
            store,
            engine,
            dialog_config or DialogConfig(edit_interval_s=0.05, questions_per_minute=60),
            admin=(
                Admin(
                    admin_settings,
                    store,
                    engine,
                    RunSupervisor(store, admin_settings, engine, trainer_for),
                )
                if admin_settings
                else None
            ),
        )
        adapter = DiscordAdapter(
            discord_settings(emulator, guild_ids),
            dialog,
            guild_ready_timeout=0.05,  # discord.py waits this long for more servers
            ack_after_s=ack_after_s,
        )
        await adapter.start()
        try:
            yield Bot(emulator, store, backend, engine, dialog, adapter)
        finally:
            await adapter.stop()
            # close() returns before the emulator has seen the close; the next client
            # must find the session ended.
            await emulator.wait_until(lambda: not emulator.connected, GUARD_S)


@pytest.fixture
async def bot(emulator: DiscordEmulator, server: Server, store: Store) -> AsyncIterator[Bot]:
    async with running_bot(emulator, store) as running:
        yield running


def send_photo(
    emulator: DiscordEmulator,
    channel_id: int,
    user: ApiObject,
    text: str = "",
    *,
    mentions_bot: bool = False,
    colour: tuple[int, int, int] = (200, 80, 40),
    reply_to: int | None = None,
) -> ApiObject:
    photo = emulator.add_file(jpeg_bytes(colour, size=(96, 64)), "dish.jpg")
    return emulator.send_message(
        channel_id, user, text, [photo], mentions_bot=mentions_bot, reply_to=reply_to
    )


def labels(message: ApiObject) -> list[str]:
    return [b["label"] for row in message["components"] for b in row["components"]]


def custom_id(message: ApiObject, label: str) -> str:
    return next(
        b["custom_id"]
        for row in message["components"]
        for b in row["components"]
        if b["label"].startswith(label)
    )


def responses_to(interaction: ApiObject) -> Callable[[Call], bool]:
    return lambda call: call.path.startswith(f"/interactions/{interaction['id']}/")


def acknowledged_in_time(emulator: DiscordEmulator, interaction: ApiObject) -> bool:
    delay = emulator.acknowledgement_delay(interaction["id"])
    return delay is not None and delay < DISCORD_ACK_SECONDS


async def until(condition: Callable[[], bool]) -> None:
    """Wait for state outside the emulator (the engine's queue) to reach ``condition``."""

    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 - polls the engine, which has no event
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), GUARD_S)


# -- asking about a photo --------------------------------------------------------------------


async def test_a_mention_with_a_photo_is_answered_with_three_buttons_and_stored(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    question = send_photo(
        emulator, server.channel_id, server.ada, "is this spicy?", mentions_bot=True
    )

    answer = await bot.answer_to(server.channel_id, question)

    assert emulator.calls(TYPING), "the bot shows it is typing"
    assert answer["content"] == f"{MODEL} says: is this spicy?", "the mention is not asked"
    assert labels(answer) == ["👍", "👎", "✏️"]
    [first] = [m for m in emulator.messages_in(server.channel_id) if "message_reference" in m]
    assert first["message_reference"]["message_id"] == question["id"], "it replies to the photo"
    await bot.reply_stored(answer["id"])
    [exchange] = await bot.exchanges()
    assert exchange.status is ExchangeStatus.ANSWERED
    assert exchange.platform == "discord"
    assert exchange.chat_id == str(server.channel_id)
    assert exchange.question == "is this spicy?"
    assert exchange.answer == f"{MODEL} says: is this spicy?"
    assert exchange.question_message_id == question["id"]
    assert exchange.reply_message_id == answer["id"]
    assert custom_id(answer, "👍") == f"dishbot:rate:{exchange.id}:up"
    assert exchange.photo_sha256 is not None
    assert await bot.store.find_user("discord", server.ada["id"]) is not None


async def test_a_photo_in_a_dm_needs_no_mention(bot: Bot, server: Server) -> None:
    question = send_photo(bot.emulator, server.ada_dm, server.ada)

    answer = await bot.answer_to(server.ada_dm, question)

    assert answer["content"] == f"{MODEL} says: What dish is this?"
    [exchange] = await bot.exchanges()
    assert exchange.chat_id == str(server.ada_dm)


async def test_a_server_message_that_does_not_mention_the_bot_is_ignored(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    ignored = send_photo(emulator, server.channel_id, server.ada, "look at my lunch")
    emulator.send_message(server.channel_id, server.lin, "nice photo")
    mentioned = send_photo(
        emulator, server.channel_id, server.lin, "这是什么菜？", mentions_bot=True, colour=(9, 9, 9)
    )

    answer = await bot.answer_to(server.channel_id, mentioned)

    assert answer["content"] == f"{MODEL} says: 这是什么菜？"
    assert [job.question for job in bot.backend.jobs] == ["这是什么菜？"]
    replied = [
        m["message_reference"]["message_id"] for m in emulator.messages_in(server.channel_id)
    ]
    assert replied == [mentioned["id"]], "no answer, not even a hint, to the others"
    assert len(emulator.calls(DOWNLOAD)) == 1, "the ignored photo was never downloaded"
    assert ignored["id"] not in [e.question_message_id for e in await bot.exchanges()]


async def test_an_answer_longer_than_a_discord_message_arrives_whole_in_parts(
    bot: Bot, server: Server
) -> None:
    question = send_photo(
        bot.emulator, server.channel_id, server.ada, "long answer please", mentions_bot=True
    )

    await bot.answer_to(server.channel_id, question)

    messages = bot.emulator.messages_in(server.channel_id)
    parts = [m["content"] for m in messages]
    assert len(parts) >= 5
    assert all(len(part) <= DISCORD_MESSAGE_LENGTH for part in parts)
    assert "\n\n".join(parts).split() == LONG_ANSWER.split(), "nothing lost or reordered"
    assert messages[0]["message_reference"]["message_id"] == question["id"]
    assert messages[-1]["components"], "the buttons go under the last part"
    assert all(not m["components"] for m in messages[:-1])


async def test_a_429_on_sending_delays_the_answer_but_does_not_lose_it(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    emulator.fail_next(CREATE_MESSAGE, retry_after=0.05)
    question = send_photo(
        emulator, server.channel_id, server.ada, "after a rate limit", mentions_bot=True
    )

    answer = await bot.answer_to(server.channel_id, question)

    refused, *delivered = emulator.calls(CREATE_MESSAGE)
    assert (refused.status, refused.response["retry_after"]) == (429, 0.05)
    assert delivered[0].status == 200
    assert answer["content"] == f"{MODEL} says: after a rate limit"


async def test_a_file_that_is_not_an_image_gets_a_clear_reason_and_is_not_downloaded(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    menu = emulator.add_file(b"%PDF-1.7 not a photo", "menu.pdf")
    emulator.send_message(server.channel_id, server.ada, "what's good?", [menu], mentions_bot=True)

    refusal = await emulator.wait_for(CREATE_MESSAGE)

    assert refusal.json["content"].startswith(
        "I can't use that file: menu.pdf is a application/pdf file, not a photo."
    )
    assert emulator.calls(DOWNLOAD) == []
    assert bot.backend.jobs == []


async def test_a_photo_over_20_mb_is_refused_before_it_is_downloaded(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    raw = emulator.add_file(jpeg_bytes(), "raw.jpg", size=21 * 1024 * 1024)
    emulator.send_message(server.ada_dm, server.ada, "", [raw])

    refusal = await emulator.wait_for(CREATE_MESSAGE)

    assert refusal.json["content"] == "That photo is larger than 20 MB; please send a smaller one."
    assert emulator.calls(DOWNLOAD) == []
    [exchange] = await bot.exchanges()
    assert exchange.status is ExchangeStatus.FAILED


# -- rating and correcting -------------------------------------------------------------------


async def test_thumbs_up_is_stored_acknowledged_in_time_and_marked(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    question = send_photo(emulator, server.channel_id, server.ada, "what?", mentions_bot=True)
    answer = await bot.answer_to(server.channel_id, question)

    press = emulator.press_button(int(answer["id"]), custom_id(answer, "👍"), server.ada)
    await emulator.wait_for(CALLBACK, responses_to(press))
    marked = await emulator.wait_for(EDIT_MESSAGE, lambda c: "components" in (c.json or {}))

    [response] = emulator.interaction_responses(press["id"])
    assert response["type"] == CHANNEL_MESSAGE
    assert response["data"]["content"] == "Thanks for the 👍!"
    assert response["data"]["flags"] & EPHEMERAL, "only the presser sees the thanks"
    assert acknowledged_in_time(emulator, press)
    [exchange] = await bot.exchanges()
    assert [r.value for r in await bot.store.ratings(exchange.id)] == [1]
    assert marked.path.endswith(f"/messages/{answer['id']}")
    assert labels(emulator.message(int(answer["id"]))) == ["👍 ✓", "👎", "✏️"]


async def test_thumbs_down_replaces_the_rating_and_opens_the_correction_form(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    question = send_photo(emulator, server.channel_id, server.ada, "what?", mentions_bot=True)
    answer = await bot.answer_to(server.channel_id, question)
    up = emulator.press_button(int(answer["id"]), custom_id(answer, "👍"), server.ada)
    await emulator.wait_for(CALLBACK, responses_to(up))

    down = emulator.press_button(int(answer["id"]), custom_id(answer, "👎"), server.ada)
    form = await emulator.wait_for(CALLBACK, responses_to(down))
    await emulator.wait_until(lambda: "👎 ✓" in labels(emulator.message(int(answer["id"]))))

    [exchange] = await bot.exchanges()
    assert form.json["type"] == MODAL
    assert form.json["data"]["custom_id"] == f"dishbot:fix:{exchange.id}"
    assert form.json["data"]["title"] == "What is it actually?"
    assert acknowledged_in_time(emulator, down)
    assert [r.value for r in await bot.store.ratings(exchange.id)] == [-1], "the latest press wins"


async def test_the_pencil_opens_a_form_whose_submission_is_stored_as_a_correction(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    question = send_photo(emulator, server.channel_id, server.ada, "what?", mentions_bot=True)
    answer = await bot.answer_to(server.channel_id, question)
    [exchange] = await bot.exchanges()

    press = emulator.press_button(int(answer["id"]), custom_id(answer, "✏️"), server.ada)
    form = await emulator.wait_for(CALLBACK, responses_to(press))
    submission = emulator.submit_modal(
        form.json["data"]["custom_id"], {"correction": "肠粉 (rice noodle roll)"}, server.ada
    )
    thanks = await emulator.wait_for(
        "POST /webhooks/{application_id}/{token}", lambda c: "Thanks!" in c.json["content"]
    )

    assert form.json["type"] == MODAL
    assert "dishbot:fix:" in form.json["data"]["custom_id"]
    assert acknowledged_in_time(emulator, press)
    [deferral] = emulator.interaction_responses(submission["id"])
    assert deferral["type"] == DEFERRED_WITH_THINKING
    assert acknowledged_in_time(emulator, submission)
    assert thanks.json["content"] == "Thanks! I've noted that it is: 肠粉 (rice noodle roll)"
    shown = next(m for m in emulator.messages_in(server.channel_id) if "Thanks!" in m["content"])
    assert shown["flags"] & EPHEMERAL, "only the corrector sees the thanks"
    [correction] = await bot.store.corrections(exchange.id)
    assert correction.text == "肠粉 (rice noodle roll)"
    assert len(bot.backend.jobs) == 1, "a correction is not a question for the model"


async def test_in_a_dm_text_typed_after_the_pencil_is_a_follow_up_not_a_correction(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    question = send_photo(emulator, server.ada_dm, server.ada, "what is it?")
    answer = await bot.answer_to(server.ada_dm, question)
    press = emulator.press_button(int(answer["id"]), custom_id(answer, "✏️"), server.ada)
    await emulator.wait_for(CALLBACK, responses_to(press))

    # Ada closes the form without submitting it, and asks something instead.
    follow_up = emulator.send_message(server.ada_dm, server.ada, "is it spicy?")
    second = await bot.answer_to(server.ada_dm, follow_up)

    assert second["content"] == f"{MODEL} says: is it spicy?"
    assert await bot.count(Correction) == 0


def ratings_stall_until_deferred(
    monkeypatch: pytest.MonkeyPatch, store: Store, emulator: DiscordEmulator
) -> None:
    """The database stalls on storing a rating until Discord has been told to wait."""
    record_rating = store.record_rating

    async def slow_record_rating(*args: Any, **kwargs: Any) -> Any:
        await emulator.wait_for(CALLBACK, lambda c: c.json["type"] == DEFERRED_WITH_THINKING)
        return await record_rating(*args, **kwargs)

    monkeypatch.setattr(store, "record_rating", slow_record_rating)


async def test_a_slow_press_is_deferred_in_time_and_answered_with_a_follow_up(
    emulator: DiscordEmulator,
    server: Server,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with running_bot(emulator, store, ack_after_s=0.05) as bot:
        question = send_photo(emulator, server.ada_dm, server.ada, "what is it?")
        answer = await bot.answer_to(server.ada_dm, question)
        ratings_stall_until_deferred(monkeypatch, store, emulator)

        press = emulator.press_button(int(answer["id"]), custom_id(answer, "👍"), server.ada)
        thanks = await emulator.wait_for(
            "POST /webhooks/{application_id}/{token}", lambda c: c.json["content"] != ""
        )

    [deferral] = emulator.interaction_responses(press["id"])
    assert deferral["type"] == DEFERRED_WITH_THINKING
    assert deferral["data"]["flags"] & EPHEMERAL
    assert acknowledged_in_time(emulator, press)
    assert thanks.json["content"] == "Thanks for the 👍!"
    shown = emulator.message(int(thanks.response["id"]))
    assert shown["flags"] & EPHEMERAL
    assert not shown["flags"] & LOADING, "the thanks replaced the deferral's thinking…"
    [exchange] = await bot.exchanges()
    assert [r.value for r in await store.ratings(exchange.id)] == [1]


async def test_a_slow_thumbs_down_offers_a_pencil_that_opens_the_form(
    emulator: DiscordEmulator,
    server: Server,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with running_bot(emulator, store, ack_after_s=0.05) as bot:
        question = send_photo(emulator, server.ada_dm, server.ada, "what is it?")
        answer = await bot.answer_to(server.ada_dm, question)
        ratings_stall_until_deferred(monkeypatch, store, emulator)

        down = emulator.press_button(int(answer["id"]), custom_id(answer, "👎"), server.ada)
        offered = await emulator.wait_for(
            "POST /webhooks/{application_id}/{token}", lambda c: bool(c.json.get("components"))
        )
        offer = emulator.message(int(offered.response["id"]))
        pencil = emulator.press_button(int(offer["id"]), custom_id(offer, "✏️"), server.ada)
        form = await emulator.wait_for(CALLBACK, responses_to(pencil))

    # Too late for a form (it must be the first response): a ✏️ opens it with one tap.
    assert acknowledged_in_time(emulator, down)
    assert offer["content"] == "What is it actually?"
    assert offer["flags"] & EPHEMERAL
    assert form.json["type"] == MODAL
    [exchange] = await bot.exchanges()
    assert form.json["data"]["custom_id"] == f"dishbot:fix:{exchange.id}"
    assert [r.value for r in await store.ratings(exchange.id)] == [-1]


async def test_a_button_on_an_answer_sent_before_a_restart_still_works(
    emulator: DiscordEmulator, server: Server, store: Store
) -> None:
    async with running_bot(emulator, store) as bot:
        question = send_photo(emulator, server.channel_id, server.ada, "hi", mentions_bot=True)
        answer = await bot.answer_to(server.channel_id, question)

    async with running_bot(emulator, store) as bot:  # a new client, the same database
        press = emulator.press_button(int(answer["id"]), custom_id(answer, "👍"), server.lin)
        await emulator.wait_for(CALLBACK, responses_to(press))
        [exchange] = await bot.exchanges()
        [rating] = await store.ratings(exchange.id)

    assert rating.value == 1
    assert acknowledged_in_time(emulator, press)
    assert emulator.interaction_responses(press["id"])[0]["data"]["content"] == "Thanks for the 👍!"


# -- following up ----------------------------------------------------------------------------


async def test_a_reply_to_an_answer_follows_up_with_the_same_photo_and_the_history(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    question = send_photo(emulator, server.channel_id, server.ada, "what is it?", mentions_bot=True)
    answer = await bot.answer_to(server.channel_id, question)

    follow_up = emulator.send_message(
        server.channel_id, server.ada, "is it spicy?", reply_to=int(answer["id"])
    )
    second = await bot.answer_to(server.channel_id, follow_up)

    assert second["content"] == f"{MODEL} says: is it spicy?"
    first_job, second_job = bot.backend.jobs
    assert [(t.question, t.answer) for t in second_job.history] == [
        ("what is it?", f"{MODEL} says: what is it?")
    ]
    assert second_job.images[0].image.size == first_job.images[0].image.size
    first, second_exchange = await bot.exchanges()
    assert second_exchange.parent_id == first.id
    assert second_exchange.photo_sha256 == first.photo_sha256


# -- slash commands --------------------------------------------------------------------------


async def test_the_dish_command_is_acknowledged_at_once_and_answered(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    photo = emulator.add_file(jpeg_bytes(size=(80, 60)), "lunch.jpg")

    interaction = emulator.slash_command(
        "dish", {"photo": photo, "question": "is it spicy?"}, server.ada, server.channel_id
    )
    answer = await bot.answer_to(server.channel_id, interaction)

    assert {c["name"] for c in emulator.commands()} == {
        "dish",
        "help",
        "cancel",
        "forget",
        "stats",
        "export",
        "retrain",
        "models",
        "rollback",
    }
    [deferral] = emulator.interaction_responses(interaction["id"])
    assert deferral["type"] == DEFERRED_WITH_THINKING
    assert acknowledged_in_time(emulator, interaction)
    assert answer["content"] == f"{MODEL} says: is it spicy?"
    assert labels(answer) == ["👍", "👎", "✏️"]
    assert not answer["flags"] & (LOADING | EPHEMERAL), "the answer replaced thinking…"
    await bot.reply_stored(answer["id"])
    [exchange] = await bot.exchanges()
    assert exchange.question_message_id == interaction["id"]
    assert exchange.reply_message_id == answer["id"]


async def test_slash_commands_go_to_the_configured_servers_at_once_and_help_answers(
    emulator: DiscordEmulator, server: Server, store: Store
) -> None:
    async with running_bot(emulator, store, guild_ids=[server.guild_id]):
        interaction = emulator.slash_command("help", {}, server.lin, server.channel_id)
        help_text = await emulator.wait_for(
            "POST /webhooks/{application_id}/{token}", lambda c: c.json["content"] != ""
        )

    assert emulator.commands() == [], "nothing global when servers are named"
    assert {c["name"] for c in emulator.commands(server.guild_id)} == {
        "dish",
        "help",
        "cancel",
        "forget",
        "stats",
        "export",
        "retrain",
        "models",
        "rollback",
    }
    assert acknowledged_in_time(emulator, interaction)
    assert help_text.json["content"].startswith("How to use dishbot:")


async def test_forget_asks_first_then_deletes_everything_about_the_user(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    mine = send_photo(emulator, server.channel_id, server.ada, "mine", mentions_bot=True)
    answer = await bot.answer_to(server.channel_id, mine)
    up = emulator.press_button(int(answer["id"]), custom_id(answer, "👍"), server.ada)
    await emulator.wait_for(CALLBACK, responses_to(up))
    others = send_photo(
        emulator, server.channel_id, server.lin, "别人的", mentions_bot=True, colour=(1, 2, 3)
    )
    await bot.answer_to(server.channel_id, others)

    interaction = emulator.slash_command("forget", {}, server.ada, server.channel_id)
    confirmation = await bot.answer_to(server.channel_id, interaction)
    assert "cannot be undone" in confirmation["content"]
    assert await bot.count(Exchange) == 2, "nothing is deleted before the confirmation"
    someone_else = emulator.press_button(
        int(confirmation["id"]), custom_id(confirmation, "🗑"), server.lin
    )
    refused = await emulator.wait_for(CALLBACK, responses_to(someone_else))
    assert refused.json["data"]["content"] == "That button is for someone else."
    emulator.press_button(int(confirmation["id"]), custom_id(confirmation, "🗑"), server.ada)
    await emulator.wait_until(
        lambda: emulator.message(int(confirmation["id"]))["content"].startswith("Done")
    )

    done = emulator.message(int(confirmation["id"]))
    assert "1 question(s), 1 rating(s)" in done["content"]
    assert done["components"] == [], "the confirmation buttons are gone"
    assert await bot.store.find_user("discord", server.ada["id"]) is None
    assert await bot.count(Rating) == 0
    assert await bot.count(Exchange) == 1, "the other user's question stays"
    assert await bot.count(Photo) == 1


# -- operating it ----------------------------------------------------------------------------


async def test_without_the_message_content_intent_start_fails_with_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, store: Store
) -> None:
    async with DiscordEmulator(message_content_enabled=False) as emulator:
        monkeypatch.setattr(discord.http.Route, "BASE", emulator.api_base)
        monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(emulator.gateway_url))
        async with Engine(ScriptedBackend(), ModelSpec("scripted", MODEL)) as engine:
            adapter = DiscordAdapter(
                discord_settings(emulator), Dialog(store, engine), guild_ready_timeout=0.05
            )
            with pytest.raises(ConfigError) as refused:
                await adapter.start()

    message = str(refused.value)
    assert "Message Content Intent" in message
    assert "Developer Portal" in message
    assert "\n" not in message
    assert adapter.client.is_closed()


async def test_one_process_serves_telegram_and_discord_from_one_engine_in_fair_order(
    emulator: DiscordEmulator, server: Server, store: Store, tmp_path: Path
) -> None:
    backend = ScriptedBackend(capacity=1, step_s=0.02)  # "slow" takes 2 s: time to ask
    tg_user = TelegramUser(42, "Ada", language_code="en")
    async with TelegramEmulator() as telegram:
        settings = Settings(
            data_dir=tmp_path / "data",
            telegram=TelegramSettings(
                token=SecretStr(telegram.token),
                base_url=telegram.base_url,
                base_file_url=telegram.base_file_url,
            ),
            discord=discord_settings(emulator),
            web={"enabled": False},  # this test is about the two chat platforms
        )
        engine = Engine(backend, ModelSpec("scripted", MODEL), EngineConfig(max_pending_per_key=3))
        async with engine:
            dialog = Dialog(store, engine, DialogConfig(edit_interval_s=0.05))
            adapters = App(settings).build_adapters(dialog)
            assert [type(a) for a in adapters] == [TelegramAdapter, DiscordAdapter]
            for adapter in adapters:
                await adapter.start()
            try:
                # The Telegram user asks twice (the second once the first runs: updates are
                # handled side by side, in no set order); the Discord user asks meanwhile.
                for n, question in enumerate(["slow from telegram", "telegram again"]):
                    file_id = telegram.add_file(jpeg_bytes((n, 9, 9)))
                    telegram.send_photo_message(
                        tg_user, tg_user.private_chat, file_id, caption=question
                    )
                    await until(lambda: engine.stats().in_flight == 1)
                await until(lambda: (engine.stats().in_flight, engine.stats().waiting) == (1, 1))
                asked = send_photo(emulator, server.ada_dm, server.ada, "from discord")
                await until(lambda: engine.stats().waiting == 2)

                discord_answer = await answer_to(emulator, server.ada_dm, asked)
                await until(
                    lambda: sum("reply_markup" in m for m in telegram.messages_in(tg_user.id)) == 2
                )
            finally:
                for adapter in reversed(adapters):
                    await adapter.stop()
                await emulator.wait_until(lambda: not emulator.connected, GUARD_S)

    assert discord_answer["content"] == f"{MODEL} says: from discord"
    assert [job.question for job in backend.jobs] == [
        "slow from telegram",
        "from discord",  # a newcomer goes before the user just served
        "telegram again",
    ]
    assert sorted(e.platform for e in await stored_exchanges(store)) == [
        "discord",
        "telegram",
        "telegram",
    ]


# -- hostile input ---------------------------------------------------------------------------


async def test_admin_replies_and_their_refusals_are_seen_only_by_who_asked(
    emulator: DiscordEmulator, server: Server, store: Store, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "admin-data", admins=[f"discord:{server.ada['id']}"])
    async with running_bot(emulator, store, admin_settings=settings) as bot:
        question = send_photo(emulator, server.channel_id, server.lin, "hi", mentions_bot=True)
        answer = await bot.answer_to(server.channel_id, question)
        up = emulator.press_button(int(answer["id"]), custom_id(answer, "👍"), server.lin)
        await emulator.wait_for(CALLBACK, responses_to(up))

        stats = emulator.slash_command("stats", {}, server.ada, server.channel_id)
        export = emulator.slash_command("export", {}, server.ada, server.channel_id)
        refused = emulator.slash_command("export", {}, server.lin, server.channel_id)
        await emulator.wait_until(
            lambda: any(
                m["content"].startswith("Exported") for m in emulator.messages_in(server.channel_id)
            ),
            GUARD_S,
        )
        await emulator.wait_until(
            lambda: any(
                m["content"] == "That command is for admins."
                for m in emulator.messages_in(server.channel_id)
            ),
            GUARD_S,
        )

    for interaction in (stats, export, refused):
        [deferral] = emulator.interaction_responses(interaction["id"])
        assert deferral["data"]["flags"] & EPHEMERAL, "only the one who asked sees it"
    replies = [m for m in emulator.messages_in(server.channel_id) if "interaction_metadata" in m]
    admin_replies = [m for m in replies if m["interaction_metadata"]["id"] != question["id"]]
    assert any(m["content"].startswith("Exporting to /") for m in admin_replies)
    assert admin_replies
    assert all(m["flags"] & EPHEMERAL for m in admin_replies)


async def test_retraining_commands_take_their_action_and_answer_only_the_admin(
    emulator: DiscordEmulator, server: Server, store: Store, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "admin-data", admins=[f"discord:{server.ada['id']}"])
    await ensure_base_version(store, settings)
    async with running_bot(emulator, store, admin_settings=settings):
        replies = {}
        for name, options in (
            ("retrain", {"action": "cancel"}),
            ("models", {}),
            ("rollback", {}),
        ):
            interaction = emulator.slash_command(name, options, server.ada, server.channel_id)
            call = await emulator.wait_for(
                "POST /webhooks/{application_id}/{token}",
                lambda c, token=interaction["token"]: token in c.path,
            )
            replies[name] = call.json
            [deferral] = emulator.interaction_responses(interaction["id"])
            assert deferral["data"]["flags"] & EPHEMERAL, name

    assert replies["retrain"]["content"] == "No retraining is running."
    assert "▶ base" in replies["models"]["content"]
    assert replies["rollback"]["content"] == "There is no earlier version to roll back to."


async def test_a_run_that_ended_before_a_restart_is_not_reported_in_the_channel(
    bot: Bot, server: Server, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "admin-data", admins=[f"discord:{server.ada['id']}"])
    admin = Admin(settings, bot.store, bot.engine)
    admin.attach(bot.adapter.port)
    run = await bot.store.create_training_run(
        report_to=ReportTarget("discord", str(server.channel_id))
    )
    ended = await bot.store.finish_training_run(
        run.id, RunStage.FAILED, error="the bot restarted during the run\n/srv/dishbot/runs/1"
    )

    await admin.report_run(ended)

    assert emulator_texts(bot.emulator, server.channel_id) == [], "not for the whole channel"


def emulator_texts(emulator: DiscordEmulator, channel_id: int) -> list[str]:
    return [m["content"] for m in emulator.messages_in(channel_id)]


async def test_a_message_delivered_again_is_not_asked_again_and_keeps_its_rating(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    question = send_photo(emulator, server.ada_dm, server.ada, "is it spicy?")
    answer = await bot.answer_to(server.ada_dm, question)
    up = emulator.press_button(int(answer["id"]), custom_id(answer, "👍"), server.ada)
    await emulator.wait_for(CALLBACK, responses_to(up))
    [exchange] = await bot.exchanges()

    emulator.redeliver(question)
    later = send_photo(emulator, server.ada_dm, server.ada, "and this one?", colour=(5, 5, 5))
    await bot.answer_to(server.ada_dm, later)

    assert [job.question for job in bot.backend.jobs] == ["is it spicy?", "and this one?"]
    first, _ = await bot.exchanges()
    assert (first.id, first.answer) == (exchange.id, exchange.answer)
    assert [r.value for r in await bot.store.ratings(exchange.id)] == [1]
    answers = [m for m in emulator.messages_in(server.ada_dm) if m["components"]]
    assert len(answers) == 2, "one answer per question, none for the repeat"


async def test_a_flood_of_questions_gets_one_slow_down_then_silence(
    emulator: DiscordEmulator, server: Server, store: Store
) -> None:
    config = DialogConfig(edit_interval_s=0.05, questions_per_minute=2)
    async with running_bot(emulator, store, dialog_config=config) as bot:
        for n in range(12):
            send_photo(emulator, server.ada_dm, server.ada, f"photo {n}", colour=(n, 0, 0))
        await emulator.wait_until(
            lambda: sum(bool(m["components"]) for m in emulator.messages_in(server.ada_dm)) == 2,
            GUARD_S,
        )
        # Lin's question is answered after all of Ada's flood was handled.
        lin_dm = emulator.add_dm_channel(server.lin)
        lins = send_photo(emulator, lin_dm, server.lin, "mine")
        await bot.answer_to(lin_dm, lins)
        await until(lambda: not bot.adapter._in_hand)

    texts = [m["content"] for m in emulator.messages_in(server.ada_dm)]
    assert sum("faster than I can eat" in t for t in texts) == 1, "told once, not per message"
    assert len(texts) == 3, "two answers and one notice for twelve photos"
    assert len(await bot.exchanges()) == 2 + 1 + 1, "the silent repeats are not stored"


async def test_a_flood_of_long_questions_texts_and_files_is_not_echoed_back(
    emulator: DiscordEmulator, server: Server, store: Store
) -> None:
    config = DialogConfig(edit_interval_s=0.05, questions_per_minute=2, replies_per_minute=3)
    async with running_bot(emulator, store, dialog_config=config) as bot:
        for n in range(8):
            send_photo(emulator, server.ada_dm, server.ada, "why " * 300, colour=(n, 1, 1))
            emulator.send_message(server.ada_dm, server.ada, f"hello {n}")
            not_a_photo = emulator.add_file(b"%PDF-1.4", "menu.pdf", "application/pdf")
            emulator.send_message(server.ada_dm, server.ada, "", [not_a_photo])
        lin_dm = emulator.add_dm_channel(server.lin)
        await bot.answer_to(lin_dm, send_photo(emulator, lin_dm, server.lin, "mine"))
        await until(lambda: not bot.adapter._in_hand)

    texts = [m["content"] for m in emulator.messages_in(server.ada_dm)]
    assert sum("characters or fewer" in t for t in texts) == 2, "two questions a minute"
    assert sum("faster than I can eat" in t for t in texts) == 2, "one notice per limit"
    assert len(texts) == 2 + 3 + 2, "24 messages get 7 replies"
    assert len([e for e in await bot.exchanges() if e.platform == "discord"]) == 3 + 1


async def test_a_flood_of_presses_and_corrections_from_one_account_stores_nothing_more(
    emulator: DiscordEmulator, server: Server, store: Store
) -> None:
    config = DialogConfig(edit_interval_s=0.05, questions_per_minute=60, feedback_per_minute=2)
    async with running_bot(emulator, store, dialog_config=config) as bot:
        question = send_photo(emulator, server.channel_id, server.ada, "?", mentions_bot=True)
        answer = await bot.answer_to(server.channel_id, question)
        pencil = custom_id(answer, "✏️")
        forms = []
        for _ in range(3):
            press = emulator.press_button(int(answer["id"]), pencil, server.lin)
            forms.append(await emulator.wait_for(CALLBACK, responses_to(press)))
        # Lin submits a form opened before the limit, over the limit.
        emulator.submit_modal(pencil, {"correction": "叉烧"}, server.lin)
        refused = await emulator.wait_for(
            "POST /webhooks/{application_id}/{token}",
            lambda c: "faster than I can eat" in c.json["content"],
        )

    assert [f.json["type"] for f in forms] == [MODAL, MODAL, CHANNEL_MESSAGE]
    assert "faster than I can eat" in forms[2].json["data"]["content"]
    assert forms[2].json["data"]["flags"] & EPHEMERAL, "only the flooder is told"
    assert refused.json["flags"] & EPHEMERAL
    assert await bot.count(Correction) == 0


async def test_forged_button_data_grants_nothing_and_the_bot_keeps_serving(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    question = send_photo(emulator, server.channel_id, server.ada, "hi", mentions_bot=True)
    answer = await bot.answer_to(server.channel_id, question)
    [exchange] = await bot.exchanges()
    forged = [
        "dishbot:rate:²:up",
        "dishbot:rate:99999999999999999999999:up",
        "dishbot:rate:-1:up",
        f"dishbot:rate:0{exchange.id}:up",
        "dishbot:fix:٣",
        f"dishbot:forget:{server.ada['id']}",
    ]
    presses = [
        emulator.forge_interaction(
            InteractionType.MESSAGE_COMPONENT,
            {"custom_id": data, "component_type": 2},
            server.lin,
            server.channel_id,
            int(answer["id"]),
        )
        for data in forged
    ]

    # discord.py hands the bot only presses of buttons the message has: the forged ones are
    # dropped before they reach it (Discord shows the presser "interaction failed").
    again = send_photo(emulator, server.channel_id, server.lin, "still there?", mentions_bot=True)
    assert (await bot.answer_to(server.channel_id, again))["content"].endswith("still there?")
    assert all(emulator.interaction_responses(p["id"]) == [] for p in presses)
    assert await bot.count(Rating) == 0
    assert len(await bot.exchanges()) == 2, "Ada's answer was not forgotten"


async def test_a_forged_form_for_an_answer_in_another_channel_corrects_nothing(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    private = send_photo(emulator, server.ada_dm, server.ada, "secret lunch")
    await bot.answer_to(server.ada_dm, private)
    [exchange] = await bot.exchanges()

    forged = emulator.forge_interaction(
        InteractionType.MODAL_SUBMIT,
        {
            "custom_id": f"dishbot:fix:{exchange.id}",
            "components": [
                {
                    "type": 1,
                    "components": [
                        {"type": 4, "custom_id": "correction", "value": "poisoned label"}
                    ],
                }
            ],
        },
        server.lin,
        server.channel_id,
    )
    await emulator.wait_until(
        lambda: any(
            m["content"].startswith("That answer") or "no longer" in m["content"]
            for m in emulator.messages_in(server.channel_id)
        ),
        GUARD_S,
    )

    assert await bot.count(Correction) == 0
    [deferral] = emulator.interaction_responses(forged["id"])
    assert deferral["data"]["flags"] & EPHEMERAL


async def test_a_correction_keeps_what_is_visible_and_drops_invisible_characters(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    question = send_photo(emulator, server.channel_id, server.ada, "hi", mentions_bot=True)
    answer = await bot.answer_to(server.channel_id, question)
    pencil = emulator.press_button(int(answer["id"]), custom_id(answer, "✏️"), server.lin)
    await emulator.wait_for(CALLBACK, responses_to(pencil))

    typed = "\u202e肠\u200b粉\u200f \x00 rice\ufeff  roll 👨\u200d🍳"
    emulator.submit_modal(custom_id(answer, "✏️"), {"correction": typed}, server.lin)
    thanks = await emulator.wait_for(
        "POST /webhooks/{application_id}/{token}", lambda c: "肠粉" in c.json["content"]
    )

    [exchange] = await bot.exchanges()
    [stored] = await bot.store.corrections(exchange.id)
    assert stored.text == "肠粉 rice roll 👨\u200d🍳"
    assert "\u202e" not in thanks.json["content"]


async def test_a_question_over_the_length_limit_gets_the_limit_not_the_model(
    bot: Bot, server: Server
) -> None:
    emulator = bot.emulator
    question = send_photo(emulator, server.ada_dm, server.ada, "is it " * 300)

    def replies() -> list[ApiObject]:
        return [m for m in emulator.messages_in(server.ada_dm) if m["id"] != question["id"]]

    await emulator.wait_until(lambda: bool(replies()), GUARD_S)

    [reply] = replies()
    assert f"{MAX_QUESTION_LENGTH} characters or fewer" in reply["content"]
    assert bot.backend.jobs == []
    [exchange] = await bot.exchanges()
    assert exchange.status is ExchangeStatus.FAILED
    assert len(exchange.question) == MAX_QUESTION_LENGTH
