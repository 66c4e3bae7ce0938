"""Backend faults and long conversations as Telegram users see them: fast apologies, "the model
is unavailable" while the circuit is open, service back by itself, and trimmed histories."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bot.store import Store
from bot.store.models import ExchangeStatus
from engine.backends.openai import OpenAIBackend, OpenAIConfig
from engine.context import image_tokens, text_tokens, turn_tokens
from engine.engine import EngineConfig
from engine.images import decode_image
from engine.prompts import DISHBOT_SYSTEM_PROMPT
from engine.types import Turn
from tests.factories import jpeg_bytes
from tests.openai_server import FakeOpenAIServer, Reply
from tests.scripted_backend import ScriptedBackend
from tests.telegram_emulator import Chat, TelegramEmulator
from tests.telegram_emulator import User as TelegramUser
from tests.test_telegram_bot import (
    ADA,
    GUARD_S,
    LIN,
    MODEL,
    Bot,
    running_bot,
    send_photo,
)

SAM = TelegramUser(44, "Sam", language_code="en")
MEI = TelegramUser(45, "美", language_code="zh-hans")
UNAVAILABLE_EN = "the model is unavailable"
UNAVAILABLE_ZH = "模型暂时不可用"
RESET_S = 2.0  # long enough that a loaded machine refuses both questions before the probe


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'dishbot.db'}"


@pytest.fixture
async def telegram() -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator() as emulator:
        yield emulator


@dataclasses.dataclass
class Fault:
    """A backend that can be taken down and brought back."""

    factory: Callable[[], Any] | None
    go_down: Callable[[], Any]
    come_back: Callable[[], Any]
    backend: ScriptedBackend


@pytest.fixture(params=["openai-server-stopped", "in-process-backend-raises"])
async def fault(request: pytest.FixtureRequest) -> AsyncIterator[Fault]:
    scripted = ScriptedBackend(capacity=2)
    if request.param == "in-process-backend-raises":

        async def down() -> None:
            scripted.down = True

        async def up() -> None:
            scripted.down = False

        yield Fault(None, down, up, scripted)
        return
    answering = Reply(chunks=[f"{MODEL} says: ", "char siu"])
    async with FakeOpenAIServer(default_reply=answering) as server:
        # The request timeout is only a guard: a question must fail long before it.
        config = OpenAIConfig(server.url, request_timeout_s=GUARD_S * 4, retry_backoff_s=5.0)
        yield Fault(lambda: OpenAIBackend(config), server.go_down, server.come_back, scripted)


async def final_text(bot: Bot, user: TelegramUser, chat: Chat, update: dict[str, Any]) -> str:
    return str((await bot.answer_to(user, chat, update))["text"])


async def reply_text(telegram: TelegramEmulator, user: TelegramUser) -> str:
    call = await telegram.wait_for("sendMessage", lambda c: c.params["chat_id"] == user.id)
    return str(call.params["text"])


async def until(condition: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 - polls the engine
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), GUARD_S)


async def test_with_the_backend_down_users_hear_the_model_is_unavailable_until_it_is_back(
    telegram: TelegramEmulator, store: Store, fault: Fault
) -> None:
    config = EngineConfig(circuit_failures=2, circuit_reset_s=RESET_S)
    async with running_bot(
        telegram, store, fault.backend, engine_config=config, backend_factory=fault.factory
    ) as bot:
        await fault.go_down()
        for user in (ADA, LIN):  # fail fast, each with an apology
            send_photo(telegram, user, user.private_chat, "what is it?")
            apology = await reply_text(telegram, user)
            assert "Sorry" in apology or "抱歉" in apology
        await until(lambda: bot.engine.stats().circuit == "open")

        send_photo(telegram, SAM, SAM.private_chat, "what is it?")
        refusal = await reply_text(telegram, SAM)
        send_photo(telegram, MEI, MEI.private_chat, "这是什么？")
        refusal_zh = await reply_text(telegram, MEI)

        await fault.come_back()
        await until(lambda: bot.engine.stats().circuit == "half_open")
        again = send_photo(telegram, SAM, SAM.private_chat, "and now?", colour=(10, 200, 10))
        answer = await final_text(bot, SAM, SAM.private_chat, again)
        exchanges = await bot.exchanges()

    assert UNAVAILABLE_EN in refusal
    assert "few minutes" in refusal
    assert UNAVAILABLE_ZH in refusal_zh
    assert answer.startswith(f"{MODEL} says: ")
    statuses = [(e.status, e.error) for e in exchanges]
    assert statuses[2:4] == [(ExchangeStatus.FAILED, "model unavailable")] * 2
    assert statuses[-1] == (ExchangeStatus.ANSWERED, None)


async def test_a_question_waiting_behind_a_hung_server_hears_the_model_is_unavailable(
    telegram: TelegramEmulator, store: Store
) -> None:
    async with FakeOpenAIServer(default_reply=Reply(stall_before_headers=True)) as server:
        backend = ScriptedBackend(capacity=1)
        openai = OpenAIConfig(
            server.url, max_concurrency=1, request_timeout_s=GUARD_S * 4, stall_timeout_s=0.5
        )
        config = EngineConfig(circuit_failures=1, circuit_reset_s=60.0)
        async with running_bot(
            telegram,
            store,
            backend,
            engine_config=config,
            backend_factory=lambda: OpenAIBackend(openai),
        ) as bot:
            send_photo(telegram, ADA, ADA.private_chat, "what is it?")
            await until(lambda: bot.engine.stats().in_flight == 1)
            send_photo(telegram, LIN, LIN.private_chat, "what is it?")
            await until(lambda: bot.engine.stats().waiting == 1)

            stalled = await reply_text(telegram, ADA)
            waiting = await reply_text(telegram, LIN)
            exchanges = await bot.exchanges()

    assert "Sorry" in stalled  # at the stall timeout, not the request timeout
    assert UNAVAILABLE_EN in waiting
    assert [e.error for e in exchanges][1] == "model unavailable"


# -- long conversations ------------------------------------------------------------------------

LONG_QUESTION = "Is it spicy, and what goes into the sauce? " * 21  # under 1000 characters


def budget_for_one_earlier_turn() -> int:
    """A context that holds the system prompt, the photo, a question, the answer's room and
    one earlier turn of this test's size, but not two."""
    photo = decode_image(jpeg_bytes(size=(96, 64)), max_tiles=6)
    turn = Turn(LONG_QUESTION.strip(), f"{MODEL} says: {LONG_QUESTION.strip()}")
    return (
        text_tokens(DISHBOT_SYSTEM_PROMPT)
        + text_tokens(LONG_QUESTION)
        + image_tokens(photo, 6)
        + 512
        + 8
        + turn_tokens(turn)
        + 50
    )


async def test_a_trimmed_conversation_is_answered_with_a_note_that_is_not_stored(
    telegram: TelegramEmulator, store: Store
) -> None:
    config = EngineConfig(context_tokens=budget_for_one_earlier_turn(), max_new_tokens=512)
    backend = ScriptedBackend(step_s=0.0005)  # long answers, streamed word by word
    async with running_bot(telegram, store, backend, engine_config=config) as bot:
        chat = ADA.private_chat
        first = await bot.answer_to(ADA, chat, send_photo(telegram, ADA, chat, LONG_QUESTION))
        second = await bot.answer_to(
            ADA,
            chat,
            telegram.send_text(ADA, chat, LONG_QUESTION, reply_to_message_id=first["message_id"]),
        )
        third = await bot.answer_to(
            ADA,
            chat,
            telegram.send_text(ADA, chat, LONG_QUESTION, reply_to_message_id=second["message_id"]),
        )
        exchanges = await bot.exchanges()

    note = "(I left out the oldest turn of this conversation to fit what I can read at once.)"
    assert note not in second["text"]
    assert third["text"].endswith(note)
    assert len(bot.backend.jobs[-1].history) == 1
    assert exchanges[-1].answer == f"{MODEL} says: {LONG_QUESTION.strip()}"
