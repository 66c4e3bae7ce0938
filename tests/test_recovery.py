"""Nothing accepted is lost: questions a bot that died (kill -9, a crash, a stop mid-answer)
accepted and never answered are answered once on the next start, or apologised for; an
answer the database would not take still reaches the user and is stored when it can be.

The Telegram side is the real python-telegram-bot against the Bot API emulator; the model is
the scripted backend, or (for `dishbot run` itself) the `openai` backend against a local
OpenAI-compatible server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket
from pydantic import SecretStr
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from bot.adapters.discord import DiscordAdapter
from bot.app import App
from bot.core.answer_writes import AnswerWrites, WaitingAnswer
from bot.core.dialog import Dialog, DialogConfig
from bot.core.events import Person, PhotoFile, PhotoQuestion, Place
from bot.core.i18n import say
from bot.core.recovery import RESUME_WITHIN, STALE_GRACE_S, Recovery
from bot.settings import EngineSettings, LimitSettings, OpenAISettings, Settings, TelegramSettings
from bot.store import ExchangeOwner, ExchangeRecord, ExchangeStatus, Store
from bot.store.models import Correction, Exchange, Rating, utcnow
from engine.engine import Engine, EngineConfig
from engine.types import ModelSpec
from tests.discord_emulator import DiscordEmulator
from tests.factories import jpeg_bytes
from tests.openai_server import FakeOpenAIServer, RecordedRequest, Reply
from tests.scripted_backend import ScriptedBackend
from tests.telegram_emulator import TelegramEmulator
from tests.telegram_emulator import User as TelegramUser
from tests.test_discord_bot import answer_to as discord_answer_to
from tests.test_discord_bot import discord_settings
from tests.test_discord_bot import send_photo as discord_photo
from tests.test_retraining_loop import dishbot_running, until
from tests.test_telegram_bot import MODEL, Bot, button_data, buttons_of, running_bot

ADA = TelegramUser(42, "Ada", username="ada_eats", language_code="en")
CHAT = ADA.private_chat
COLOUR = (200, 80, 40)
GUARD_S = 15.0  # how long a test waits for the bot; a guard against hangs, not a measurement
PROCESS_GUARD_S = 30.0  # a `dishbot run` subprocess starting
QUESTION = "what is it?"
ANSWER = Reply(chunks=["This is char siu ", "(叉烧), ", "Cantonese barbecued pork."])
T = TypeVar("T")


@pytest.fixture
async def discord_emulator(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[DiscordEmulator]:
    async with DiscordEmulator() as emulator:
        # discord.py reads its endpoints from class attributes; monkeypatch puts them back.
        monkeypatch.setattr(discord.http.Route, "BASE", emulator.api_base)
        monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(emulator.gateway_url))
        yield emulator


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    # The flows are the subject here; the store's SQL runs on both databases in
    # tests/test_orphaned_exchanges.py.
    return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'dishbot.db'}"


@pytest.fixture
async def telegram() -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator() as emulator:
        yield emulator


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@contextlib.contextmanager
def living_process() -> Iterator[int]:
    """The pid of a process that runs until the block ends."""
    process = subprocess.Popen(["sleep", "30"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


async def fetched_by_a_bot_now_gone(telegram: TelegramEmulator) -> None:
    """Take every queued update as the previous bot's PTB did: fetched, and acknowledged by
    its next poll, so Telegram never delivers them again."""
    url = f"{telegram.base_url}{telegram.token}/getUpdates"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json={"timeout": 0}) as response:
            updates = (await response.json())["result"]
        if updates:
            offset = updates[-1]["update_id"] + 1
            async with session.post(url, json={"offset": offset, "timeout": 0}) as response:
                response.raise_for_status()
    assert telegram.pending_updates == 0


def send_photo(telegram: TelegramEmulator, caption: str) -> dict[str, Any]:
    file_id = telegram.add_file(jpeg_bytes(COLOUR, size=(96, 64)))
    update = telegram.send_photo_message(ADA, CHAT, file_id, caption=caption)
    message: dict[str, Any] = update["message"]
    return message


async def left_pending(
    store: Store,
    message: dict[str, Any],
    question: str,
    *,
    parent: ExchangeRecord | None = None,
    owner: ExchangeOwner | None = None,
) -> ExchangeRecord:
    """What a bot killed mid-answer leaves in the database for ``message``: the user, the
    photo, and the question pending under its (now dead) process."""
    user = await store.upsert_user("telegram", str(ADA.id), display_name="Ada", language="en")
    photo = await store.add_photo(
        jpeg_bytes(COLOUR, size=(96, 64)), image_format="JPEG", width=96, height=64
    )
    return await store.start_exchange(
        user_id=user.id,
        platform="telegram",
        chat_id=str(CHAT.id),
        question=question,
        question_message_id=str(message["message_id"]),
        photo_sha256=photo.sha256,
        parent_id=parent.id if parent else None,
        owner=owner or ExchangeOwner(store.owner.host, dead_pid(), "killed"),
    )


def answers_to(telegram: TelegramEmulator, message: dict[str, Any]) -> list[dict[str, Any]]:
    """The bot's final answers to a message: replies to it that carry rating buttons."""
    return [
        shown
        for shown in telegram.messages_in(CHAT.id)
        if shown.get("reply_to_message", {}).get("message_id") == message["message_id"]
        and "reply_markup" in shown
    ]


async def one_answer(telegram: TelegramEmulator, message: dict[str, Any]) -> dict[str, Any]:
    await until(lambda: bool(answers_to(telegram, message)), GUARD_S)
    [answer] = answers_to(telegram, message)
    return answer


async def status_of(store: Store, exchange_id: int) -> ExchangeRecord:
    exchange = await store.get_exchange(exchange_id)
    assert exchange is not None
    return exchange


async def pending_count(store: Store) -> int:
    async with AsyncSession(store.engine) as session:
        query = select(func.count()).where(Exchange.status == ExchangeStatus.PENDING)
        return int(await session.scalar(query) or 0)


async def recovered(bot: Bot) -> Recovery:
    recovery = Recovery(
        bot.store, bot.dialog, {"telegram": bot.adapter.port}, request_timeout_s=120.0
    )
    await recovery.sweep()
    return recovery


# -- dishbot run, in this process -------------------------------------------------------------


def served_settings(
    tmp_path: Path, telegram: TelegramEmulator, model: FakeOpenAIServer
) -> Settings:
    """`dishbot run`'s settings: the emulator, and the `openai` backend on ``model``."""
    return Settings(
        data_dir=tmp_path / "data",
        telegram=TelegramSettings(
            token=SecretStr(telegram.token),
            base_url=telegram.base_url,
            base_file_url=telegram.base_file_url,
        ),
        engine=EngineSettings(backend="openai", openai=OpenAISettings(base_url=model.url)),
        limits=LimitSettings(questions_per_minute=60),
    )


@contextlib.asynccontextmanager
async def dishbot_serving(settings: Settings, telegram: TelegramEmulator) -> AsyncIterator[None]:
    """`dishbot run`, in this process, from its first poll until the block ends."""
    polls = len(telegram.calls("getUpdates"))  # ours included: count only the bot's
    async with dishbot_running(settings, telegram):
        await until(lambda: len(telegram.calls("getUpdates")) > polls, GUARD_S)
        yield


async def with_store(settings: Settings, use: Callable[[Store], Awaitable[T]]) -> T:
    """``use`` a store of our own on dishbot's database (migrated to head, if new)."""
    store = await App(settings).open_store()
    try:
        return await use(store)
    finally:
        await store.close()


async def test_a_question_a_killed_bot_left_pending_is_answered_once_when_dishbot_starts(
    tmp_path: Path, telegram: TelegramEmulator
) -> None:
    question = send_photo(telegram, QUESTION)
    await fetched_by_a_bot_now_gone(telegram)
    async with FakeOpenAIServer(default_reply=ANSWER) as model:
        settings = served_settings(tmp_path, telegram, model)
        left = await with_store(settings, lambda store: left_pending(store, question, QUESTION))

        async with dishbot_serving(settings, telegram):
            answer = await one_answer(telegram, question)

    assert answer["text"] == ANSWER.text
    assert [label for label, _ in buttons_of(answer)] == ["👍", "👎", "✏️"]
    [asked] = model.requests
    assert asked.question == QUESTION
    assert len(asked.images) == 1
    exchange = await with_store(settings, lambda store: status_of(store, left.id))
    assert exchange.status is ExchangeStatus.ANSWERED
    assert exchange.answer == ANSWER.text
    assert exchange.reply_message_id == str(answer["message_id"])


async def test_a_question_left_by_a_bot_on_another_host_that_went_quiet_is_answered_meanwhile(
    tmp_path: Path, telegram: TelegramEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bot.app.RECOVER_INTERVAL_S", 0.2)
    question = send_photo(telegram, QUESTION)
    await fetched_by_a_bot_now_gone(telegram)
    async with FakeOpenAIServer(default_reply=ANSWER) as model:
        settings = served_settings(tmp_path, telegram, model)
        async with dishbot_serving(settings, telegram):
            # Another bot process, on a host that went away, had taken the question.
            async def left_by_another_host(store: Store) -> ExchangeRecord:
                far = ExchangeOwner("gpu-host-that-is-gone", 4242, "far")
                left = await left_pending(store, question, QUESTION, owner=far)
                async with store.engine.begin() as connection:
                    quiet_since = utcnow() - timedelta(seconds=120 + STALE_GRACE_S + 1)
                    await connection.execute(
                        update(Exchange)
                        .where(Exchange.id == left.id)
                        .values(owned_since=quiet_since, created_at=quiet_since)
                    )
                return left

            store = Store.open(settings.db_url, settings.data_dir)  # the bot migrated it
            try:
                left = await left_by_another_host(store)
            finally:
                await store.close()
            answer = await one_answer(telegram, question)

    assert answer["text"] == ANSWER.text
    exchange = await with_store(settings, lambda store: status_of(store, left.id))
    assert exchange.status is ExchangeStatus.ANSWERED


# -- the recovery itself, with the scripted model ---------------------------------------------


async def test_pending_questions_of_a_living_bot_are_left_to_it(
    telegram: TelegramEmulator, store: Store
) -> None:
    living_bots = send_photo(telegram, "still being answered?")
    dead_bots = send_photo(telegram, QUESTION)
    await fetched_by_a_bot_now_gone(telegram)
    with living_process() as pid:
        alive = ExchangeOwner(store.owner.host, pid, "alive")
        busy = await left_pending(store, living_bots, "still being answered?", owner=alive)
        left = await left_pending(store, dead_bots, QUESTION)
        async with running_bot(telegram, store) as bot:
            recovery = Recovery(
                store, bot.dialog, {"telegram": bot.adapter.port}, request_timeout_s=120.0
            )
            claimed = await recovery.sweep()
            await one_answer(telegram, dead_bots)
            await recovery.close()

    assert claimed == [left.id]
    assert [job.question for job in bot.backend.jobs] == [QUESTION]
    assert answers_to(telegram, living_bots) == []
    untouched = await status_of(store, busy.id)
    assert (untouched.status, untouched.owner_token) == (ExchangeStatus.PENDING, "alive")


async def test_a_question_whose_photo_is_gone_is_failed_with_an_apology(
    telegram: TelegramEmulator, store: Store
) -> None:
    question = send_photo(telegram, QUESTION)
    await fetched_by_a_bot_now_gone(telegram)
    left = await left_pending(store, question, QUESTION)
    assert left.photo_sha256 is not None
    photo = await store.get_photo(left.photo_sha256)
    assert photo is not None
    store.photo_file(photo).unlink()

    async with running_bot(telegram, store) as bot:
        recovery = await recovered(bot)
        apology = say("restart_lost_answer", "en")
        await until(lambda: any(m.get("text") == apology for m in telegram.messages_in(CHAT.id)))
        await recovery.close()

    [told] = telegram.messages_in(CHAT.id)
    assert told["reply_to_message"]["message_id"] == question["message_id"]
    assert bot.backend.jobs == []
    failed = await status_of(store, left.id)
    assert failed.status is ExchangeStatus.FAILED
    assert failed.error is not None
    assert "photo" in failed.error
    assert await pending_count(store) == 0


async def test_a_question_too_old_to_answer_or_of_a_platform_now_unconfigured_is_failed(
    telegram: TelegramEmulator, store: Store
) -> None:
    old_question = send_photo(telegram, QUESTION)
    await fetched_by_a_bot_now_gone(telegram)
    too_old = await left_pending(store, old_question, QUESTION)
    async with store.engine.begin() as connection:
        asked_at = utcnow() - RESUME_WITHIN - timedelta(minutes=1)
        await connection.execute(
            update(Exchange).where(Exchange.id == too_old.id).values(created_at=asked_at)
        )
    user = await store.upsert_user("discord", "77")
    on_discord = await store.start_exchange(
        user_id=user.id,
        platform="discord",
        chat_id="555",
        question=QUESTION,
        question_message_id="556",
        photo_sha256=too_old.photo_sha256,
        owner=ExchangeOwner(store.owner.host, dead_pid(), "killed"),
    )

    async with running_bot(telegram, store) as bot:
        recovery = await recovered(bot)
        apology = say("restart_lost_answer", "en")
        await until(lambda: any(m.get("text") == apology for m in telegram.messages_in(CHAT.id)))
        await recovery.close()

    [told] = telegram.messages_in(CHAT.id)
    assert told["reply_to_message"]["message_id"] == old_question["message_id"]
    assert bot.backend.jobs == []
    for exchange_id, reason in ((too_old.id, "too long ago"), (on_discord.id, "discord")):
        failed = await status_of(store, exchange_id)
        assert failed.status is ExchangeStatus.FAILED
        assert failed.error is not None
        assert reason in failed.error
    assert await pending_count(store) == 0


async def test_a_follow_up_left_pending_is_asked_again_with_its_photo_and_history(
    telegram: TelegramEmulator, store: Store
) -> None:
    first = send_photo(telegram, QUESTION)
    follow_up = telegram.send_text(ADA, CHAT, "is it spicy?")["message"]
    await fetched_by_a_bot_now_gone(telegram)
    parent = await left_pending(store, first, QUESTION)
    await store.finish_exchange(
        parent.id, answer="Char siu.", model_version=MODEL, latency_ms=5, reply_message_id="900"
    )
    left = await left_pending(store, follow_up, "is it spicy?", parent=parent)

    async with running_bot(telegram, store) as bot:
        recovery = await recovered(bot)
        answer = await one_answer(telegram, follow_up)
        await recovery.close()

    assert answer["text"] == f"{MODEL} says: is it spicy?"
    [job] = bot.backend.jobs
    assert [(turn.question, turn.answer) for turn in job.history] == [(QUESTION, "Char siu.")]
    assert len(job.images) == 1
    assert (await status_of(store, left.id)).status is ExchangeStatus.ANSWERED
    assert answers_to(telegram, first) == []  # the answered question is not asked again


async def test_a_bot_stopped_mid_answer_leaves_the_question_for_the_next_start_to_answer(
    telegram: TelegramEmulator, store: Store, database_url: str, data_dir: Path
) -> None:
    question = send_photo(telegram, "slow: what is it?")
    await fetched_by_a_bot_now_gone(telegram)
    event = PhotoQuestion(
        who=Person("telegram", str(ADA.id), "Ada", "en"),
        where=Place(str(CHAT.id), private=True),
        message_id=str(question["message_id"]),
        photo=PhotoFile(fetch=_bytes_of(jpeg_bytes(COLOUR, size=(96, 64)))),
        question="slow: what is it?",
    )
    async with running_bot(telegram, store, ScriptedBackend(step_s=0.05)) as bot:
        answering = asyncio.create_task(bot.dialog.handle(event, bot.adapter.port))
        await until(lambda: any("says" in m.get("text", "") for m in telegram.messages_in(CHAT.id)))
        answering.cancel()  # how a stopping adapter ends the answers in hand
        await asyncio.wait([answering])
    [left] = await bot.exchanges()
    assert left.status is ExchangeStatus.PENDING

    restarted = Store.open(database_url, data_dir)  # the next start: another run of dishbot
    try:
        async with running_bot(telegram, restarted) as again:
            recovery = await recovered(again)
            answer = await one_answer(telegram, question)
            await recovery.close()
        exchange = await status_of(restarted, left.id)
    finally:
        await restarted.close()

    assert answer["text"] == f"{MODEL} says: slow: what is it?"
    assert exchange.status is ExchangeStatus.ANSWERED


async def test_a_discord_answer_cut_short_by_a_stop_is_given_once_by_the_next_start(
    discord_emulator: DiscordEmulator,
    store: Store,
    database_url: str,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("bot.adapters.discord.STOP_GRACE_S", 0.1)  # stopping cuts it short
    emulator = discord_emulator
    guild = emulator.add_guild("Foodies")
    channel = emulator.add_channel(guild, "dishes")
    ada = emulator.add_user("ada", global_name="Ada")
    asked = discord_photo(emulator, channel, ada, "slow: what is it?", mentions_bot=True)
    backend = ScriptedBackend(step_s=0.2)  # 20 s for a "slow" question
    async with discord_bot(emulator, store, backend):
        await emulator.wait_until(
            lambda: any("says" in m["content"] for m in emulator.messages_in(channel)), GUARD_S
        )

    restarted = Store.open(database_url, data_dir)  # the next start: another run of dishbot
    try:
        [left] = await restarted.orphaned_exchanges(stale_after=timedelta(minutes=3))
        assert left.status is ExchangeStatus.PENDING
        async with discord_bot(emulator, restarted, ScriptedBackend()) as adapter:
            recovery = Recovery(
                restarted, adapter.dialog, {"discord": adapter.port}, request_timeout_s=120
            )
            assert await recovery.sweep() == [left.id]
            answer = await discord_answer_to(emulator, channel, asked)
            await until(lambda: not recovery.busy, GUARD_S)  # its reply id is stored too
            await recovery.close()
        exchange = await status_of(restarted, left.id)
    finally:
        await restarted.close()

    assert answer["content"] == f"{MODEL} says: slow: what is it?"
    assert answer["message_reference"]["message_id"] == asked["id"]
    finals = [m for m in emulator.messages_in(channel) if m["components"]]
    assert finals == [answer]
    assert exchange.status is ExchangeStatus.ANSWERED
    assert exchange.reply_message_id == answer["id"]


@contextlib.asynccontextmanager
async def discord_bot(
    emulator: DiscordEmulator, store: Store, backend: ScriptedBackend
) -> AsyncIterator[DiscordAdapter]:
    """The Discord bot, served by the scripted ``backend``, until the block ends."""
    async with Engine(backend, ModelSpec("scripted", MODEL), EngineConfig()) as engine:
        dialog = Dialog(store, engine, DialogConfig(edit_interval_s=0.05))
        adapter = DiscordAdapter(discord_settings(emulator), dialog, guild_ready_timeout=0.05)
        await adapter.start()
        try:
            yield adapter
        finally:
            await adapter.stop()
            await emulator.wait_until(lambda: not emulator.connected, GUARD_S)


def _bytes_of(data: bytes) -> Callable[[], Awaitable[bytes]]:
    async def fetch() -> bytes:
        return data

    return fetch


# -- storing the answer fails ------------------------------------------------------------------


def finish_failing(store: Store, monkeypatch: pytest.MonkeyPatch, times: int) -> list[int]:
    """Make the store's first ``times`` answer writes fail as a database that is down does."""
    finish = store.finish_exchange
    attempts: list[int] = []

    async def failing(exchange_id: int, **values: Any) -> ExchangeRecord:
        attempts.append(exchange_id)
        if len(attempts) <= times:
            raise OperationalError("UPDATE exchanges", {}, Exception("database is locked"))
        return await finish(exchange_id, **values)

    monkeypatch.setattr(store, "finish_exchange", failing)
    return attempts


async def test_an_answer_whose_storing_fails_twice_still_arrives_with_buttons_and_is_stored(
    telegram: TelegramEmulator, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = finish_failing(store, monkeypatch, times=2)
    config = DialogConfig(edit_interval_s=0.05, answer_write_retries_s=(0.01, 0.01, 0.01))
    async with running_bot(telegram, store, dialog_config=config) as bot:
        question = send_photo(telegram, QUESTION)
        answer = await one_answer(telegram, question)
        [exchange] = await bot.exchanges()

    assert answer["text"] == f"{MODEL} says: what is it?"
    assert len(attempts) == 3
    assert telegram.calls("editMessageReplyMarkup") == []  # stored before it was shown
    assert [m["text"] for m in telegram.messages_in(CHAT.id)] == [answer["text"]]
    assert exchange.status is ExchangeStatus.ANSWERED
    assert exchange.answer == answer["text"]


async def test_an_answer_the_database_will_not_take_is_shown_then_stored_when_it_is_back(
    telegram: TelegramEmulator, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = finish_failing(store, monkeypatch, times=4)  # through the dialog's retries
    config = DialogConfig(edit_interval_s=0.05, answer_write_retries_s=(0.01, 0.01))
    async with running_bot(telegram, store, dialog_config=config) as bot:
        question = send_photo(telegram, QUESTION)
        answer = await one_answer(telegram, question)  # its buttons come once it is stored
        [exchange] = await bot.exchanges()

    final_text = f"{MODEL} says: what is it?"
    showing = [
        call
        for call in telegram.calls()
        if call.method in ("sendMessage", "editMessageText") and call.params["text"] == final_text
    ]
    assert showing, "the answer was shown"
    assert all("reply_markup" not in call.params for call in showing), "without buttons at first"
    [buttons_added] = telegram.calls("editMessageReplyMarkup")
    assert buttons_added.params["message_id"] == answer["message_id"]
    assert len(attempts) == 5
    assert telegram.calls("editMessageReplyMarkup"), "the buttons came after the answer"
    assert button_data(answer, "👍")
    assert exchange.status is ExchangeStatus.ANSWERED
    assert exchange.answer == final_text
    assert exchange.reply_message_id == str(answer["message_id"])


async def test_answers_waiting_for_the_database_are_bounded_and_the_dropped_one_is_logged(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    finish_failing(store, monkeypatch, times=1_000)  # the database stays down
    writes = AnswerWrites(store, capacity=2, first_retry_s=0.01, longest_retry_s=0.01)
    try:
        for exchange_id in (1, 2, 3):
            writes.add(WaitingAnswer(exchange_id, "char siu", MODEL, 5, str(exchange_id)))
        waiting = writes.exchange_ids()
    finally:
        await writes.close()

    assert waiting == {2, 3}
    dropped = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("exchange 1 is not stored" in message for message in dropped), dropped
    assert any("2, 3" in message for message in dropped), "what was left is logged at stop"


# -- the real thing: dishbot run killed with SIGKILL mid-answer, and started again -----------


class DishbotProcesses:
    """`dishbot run` processes (this checkout's code), their logs kept, all stopped at the end."""

    def __init__(
        self, telegram: TelegramEmulator, model: FakeOpenAIServer, data_dir: Path, logs: Path
    ) -> None:
        self.logs = logs
        self.started: list[asyncio.subprocess.Process] = []
        checkout = str(Path(__file__).parents[1])
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([checkout, os.environ.get("PYTHONPATH", "")]),
            "DISHBOT_DATA_DIR": str(data_dir),
            "DISHBOT_TELEGRAM__TOKEN": telegram.token,
            "DISHBOT_TELEGRAM__BASE_URL": telegram.base_url,
            "DISHBOT_TELEGRAM__BASE_FILE_URL": telegram.base_file_url,
            "DISHBOT_ENGINE__BACKEND": "openai",
            "DISHBOT_ENGINE__OPENAI__BASE_URL": model.url,
            "DISHBOT_LIMITS__QUESTIONS_PER_MINUTE": "60",
        }

    async def start(self, telegram: TelegramEmulator) -> asyncio.subprocess.Process:
        polls = len(telegram.calls("getUpdates"))
        with (self.logs / f"dishbot-{len(self.started) + 1}.log").open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bot.cli",
                "run",
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.started.append(process)
        await until(lambda: len(telegram.calls("getUpdates")) > polls, PROCESS_GUARD_S)
        return process

    async def stop_all(self) -> None:
        for process in self.started:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), GUARD_S)
                except TimeoutError:
                    process.kill()
                    await process.wait()

    def log(self, number: int) -> str:
        return (self.logs / f"dishbot-{number}.log").read_text(errors="replace")


def bot_says(telegram: TelegramEmulator, words: str) -> list[dict[str, Any]]:
    return [m for m in telegram.messages_in(CHAT.id) if m.get("text") == words]


async def test_dishbot_killed_mid_answer_answers_each_question_once_and_keeps_feedback(
    tmp_path: Path, telegram: TelegramEmulator
) -> None:
    mid_answer = {"stall": True}

    def respond(request: RecordedRequest) -> Reply:
        if mid_answer["stall"] and request.question.startswith("question"):
            return Reply(chunks=ANSWER.chunks, stall_after_chunks=1)  # the model still going
        return ANSWER

    async with FakeOpenAIServer(respond=respond) as model:
        settings = served_settings(tmp_path, telegram, model)
        bots = DishbotProcesses(telegram, model, settings.data_dir, tmp_path)
        try:
            first = await bots.start(telegram)
            rated = send_photo(telegram, QUESTION)
            answer = await one_answer(telegram, rated)
            telegram.press_button(ADA, answer, button_data(answer, "✏️"))
            await until(lambda: bool(bot_says(telegram, say("ask_correction", "en"))), GUARD_S)
            [prompt] = bot_says(telegram, say("ask_correction", "en"))
            streaming = [send_photo(telegram, f"question {n}") for n in (1, 2)]
            # Both answers are showing their first words, and PTB took both updates (its
            # next poll acknowledged them): Telegram will not deliver them again.
            partial = ANSWER.chunks[0].strip()
            await until(lambda: len(bot_says(telegram, partial)) == 2, GUARD_S)
            await until(lambda: telegram.pending_updates == 0, GUARD_S)

            first.kill()
            await first.wait()
            telegram.press_button(ADA, answer, button_data(answer, "👍"))
            telegram.send_text(ADA, CHAT, "叉烧包", reply_to_message_id=prompt["message_id"])
            mid_answer["stall"] = False

            await bots.start(telegram)
            for question in streaming:
                await one_answer(telegram, question)
            thanks = say("correction_thanks", "en", text="叉烧包")
            await until(lambda: bool(bot_says(telegram, thanks)), GUARD_S)
            await until(lambda: len(telegram.calls("answerCallbackQuery")) == 2, GUARD_S)
        finally:
            await bots.stop_all()

    for question in (rated, *streaming):
        assert len(answers_to(telegram, question)) == 1, bots.log(2)
    assert len(bot_says(telegram, thanks)) == 1
    store = Store.open(settings.db_url, settings.data_dir)
    try:
        assert await pending_count(store) == 0
        async with AsyncSession(store.engine) as session:
            statuses = list(await session.scalars(select(Exchange.status).order_by(Exchange.id)))
            ratings = list(await session.scalars(select(Rating.value)))
            corrections = list(await session.scalars(select(Correction.text)))
    finally:
        await store.close()
    assert statuses == [ExchangeStatus.ANSWERED] * 3
    assert ratings == [1]
    assert corrections == ["叉烧包"]


async def test_dishbot_killed_while_a_photo_downloads_answers_it_once_when_started_again(
    tmp_path: Path, telegram: TelegramEmulator
) -> None:
    # Telegram holds the photo: the killed bot had the update (and acknowledged it by its
    # next poll) but had stored nothing yet, neither photo nor question.
    telegram.hang_next("getFile", 60.0, processed=True)
    async with FakeOpenAIServer(default_reply=ANSWER) as model:
        settings = served_settings(tmp_path, telegram, model)
        bots = DishbotProcesses(telegram, model, settings.data_dir, tmp_path)
        try:
            first = await bots.start(telegram)
            question = send_photo(telegram, QUESTION)
            await until(lambda: bool(telegram.calls("getFile")), GUARD_S)
            await until(lambda: telegram.pending_updates == 0, GUARD_S)
            first.kill()
            await first.wait()

            await bots.start(telegram)
            answer = await one_answer(telegram, question)
        finally:
            await bots.stop_all()

    assert answer["text"] == ANSWER.text, bots.log(2)
    assert len(answers_to(telegram, question)) == 1
    assert len(model.requests) == 1
