"""Busy chats on Telegram: quick updates never wait behind long answers, and a busy group's
calls are budgeted so that finished answers go first.

The real python-telegram-bot (with its real AIORateLimiter) against the Bot API emulator, the
real dialog, engine and store, and the scripted backend with slow answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from bot.core.budget import MAX_IDLE_WINDOWS, CallBudget
from bot.core.dialog import DialogConfig
from bot.core.events import Person, Place
from bot.core.limits import (
    TELEGRAM_GROUP_CALLS,
    TELEGRAM_OVERALL_CALLS,
    TELEGRAM_PRIVATE_CALLS,
    CallLimit,
)
from bot.store import Store
from engine.engine import Engine, EngineConfig
from engine.types import GenerationJob, JobFinished
from tests.factories import jpeg_bytes
from tests.scripted_backend import ScriptedBackend
from tests.telegram_emulator import Call, TelegramEmulator
from tests.telegram_emulator import User as TelegramUser
from tests.test_telegram_bot import (
    ADA,
    FOODIES,
    GUARD_S,
    MENTION,
    MODEL,
    _until_async,
    button_data,
    running_bot,
    send_photo,
)

PTB_UPDATE_SLOTS = 256  # what `concurrent_updates(True)` lets run at once


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    # The adapters are the subject here; the store's SQL runs on both databases elsewhere.
    return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'dishbot.db'}"


@pytest.fixture
async def telegram() -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator() as emulator:
        yield emulator


async def _accepted(engine: Engine, count: int) -> None:
    """Wait until the engine holds ``count`` questions, waiting or being answered."""

    def accepted() -> int:
        stats = engine.stats()
        return stats.waiting + stats.in_flight

    async def poll() -> None:
        while accepted() < count:  # noqa: ASYNC110 - polls the engine
            await asyncio.sleep(0.1)

    try:
        await asyncio.wait_for(poll(), 4 * GUARD_S)
    except TimeoutError:
        raise AssertionError(f"only {accepted()} of {count} questions reached the engine") from None


async def test_help_cancel_buttons_and_busy_answers_do_not_wait_behind_hundreds_of_answers(
    telegram: TelegramEmulator, store: Store
) -> None:
    waiting_room = PTB_UPDATE_SLOTS + 4  # more slow questions than PTB has update slots
    backend = ScriptedBackend(capacity=4, step_s=0.05)
    engine_config = EngineConfig(max_pending=waiting_room, max_pending_per_key=3)
    async with running_bot(telegram, store, backend, engine_config=engine_config) as bot:
        rated = send_photo(telegram, ADA, ADA.private_chat, "a quick one")
        answer = await bot.answer_to(ADA, ADA.private_chat, rated)
        backend.step_s = 1.0  # from now on every answer takes 100 s
        photo = telegram.add_file(jpeg_bytes((90, 120, 30), size=(96, 64)))
        guests = [TelegramUser(10_000 + n, f"Guest {n}") for n in range(waiting_room + 4)]
        try:
            for guest in guests:
                telegram.send_photo_message(guest, guest.private_chat, photo, caption="slow")
            await _accepted(bot.engine, len(guests))  # every one accepted: waiting or answering

            late = TelegramUser(20_000, "Late")
            telegram.send_photo_message(late, late.private_chat, photo, caption="me too")
            busy = await telegram.wait_for("sendMessage", lambda c: c.params["chat_id"] == late.id)
            telegram.send_text(ADA, ADA.private_chat, "/help")
            telegram.send_text(guests[0], guests[0].private_chat, "/cancel")
            query_id = telegram.press_button(ADA, answer, button_data(answer, "👍"))
            help_ = await telegram.wait_for(
                "sendMessage", lambda c: c.params["text"].startswith("How to use")
            )
            cancelled = await telegram.wait_for(
                "sendMessage", lambda c: c.params["text"].startswith("Dropped")
            )
            pressed = await telegram.wait_for(
                "answerCallbackQuery", lambda c: c.params["callback_query_id"] == query_id
            )

            assert busy.params["text"] == "I'm very busy right now — please try again in a minute."
            assert help_.params["chat_id"] == ADA.id
            assert cancelled.params["text"] == "Dropped 1 waiting question(s)."
            assert pressed.params["text"] == "Thanks for the 👍!"
            # All of it while the slow questions were still being answered.
            assert bot.engine.stats().in_flight == 4
            assert not [
                c for c in telegram.calls() if _is_final(c) and c.params["chat_id"] != ADA.id
            ]
        finally:
            for guest in guests:  # so that the bot stops promptly, on today's code too
                bot.dialog.cancel_pending(Person("telegram", str(guest.id), guest.first_name))


# -- a busy group ----------------------------------------------------------------------------


class FinishTimes(ScriptedBackend):
    """The scripted backend, noting when each answer was complete."""

    def __init__(self, **options: float | int) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.finished_at: list[float] = []

    async def generate(self, jobs: Sequence[GenerationJob]):  # type: ignore[no-untyped-def,override]
        async for event in super().generate(jobs):
            if isinstance(event, JobFinished):
                self.finished_at.append(time.monotonic())
            yield event


def _in_chat(calls: list[Call], chat_id: int) -> list[Call]:
    return [c for c in calls if c.params.get("chat_id") == chat_id]


def _is_final(call: Call) -> bool:
    return call.method in ("sendMessage", "editMessageText") and "reply_markup" in call.params


async def test_answers_finishing_together_in_a_group_go_out_before_typing_and_partial_edits(
    telegram: TelegramEmulator, store: Store
) -> None:
    # Four people ask at once; the model streams all four answers word by word and finishes
    # them together, in about five seconds.
    backend = FinishTimes(capacity=4, step_s=0.05)
    words = " ".join(["pork"] * 96)
    config = DialogConfig(questions_per_minute=60)  # production pacing: edits 1 s apart
    people = [TelegramUser(300 + n, f"Diner {n}") for n in range(4)]
    async with running_bot(telegram, store, backend, dialog_config=config) as bot:
        questions = [
            send_photo(telegram, person, FOODIES, f"{MENTION} {n} {words}")
            for n, person in enumerate(people)
        ]
        for person, question in zip(people, questions, strict=True):
            await bot.answer_to(person, FOODIES, question)
        await _until_async(lambda: len(backend.finished_at) == 4)
        ready = max(backend.finished_at)

    calls = _in_chat(telegram.calls(), FOODIES.id)
    after_ready = [c for c in calls if c.at >= ready]
    finals = [c for c in calls if _is_final(c)]
    assert len(finals) == 4
    last_final = max(c.at for c in finals)
    extra = [c for c in after_ready if not _is_final(c) and c.at <= last_final]
    assert not extra, f"typing or partial edits before the last final answer: {extra}"
    assert len(calls) <= 20, "a group takes 20 calls a minute; the bot kept within it"
    assert {c.params["text"] for c in finals} == {f"{MODEL} says: {n} {words}" for n in range(4)}


# -- the budget itself -----------------------------------------------------------------------


class _GroupPort:
    """Just what the budget reads of a port: Telegram's limits."""

    platform = "telegram"
    overall_call_limit = TELEGRAM_OVERALL_CALLS

    def call_limit(self, where: Place) -> CallLimit:
        return TELEGRAM_PRIVATE_CALLS if where.private else TELEGRAM_GROUP_CALLS


def test_a_group_keeps_a_call_for_each_pending_answer_and_idle_chats_are_forgotten() -> None:
    now = [0.0]
    budget = CallBudget(clock=lambda: now[0])
    port: Any = _GroupPort()
    group = Place("-100", private=False)
    granted = 0
    with budget.reserve(port, group), budget.reserve(port, group):
        for _ in range(40):  # typing and partial edits asking, one a second
            granted += budget.spare(port, group)
            now[0] += 1.0
        # Two answers pending: 18 of the group's 20 calls a minute went to decorations.
        assert granted == TELEGRAM_GROUP_CALLS.calls - 2
        budget.spent(port, group)
        budget.spent(port, group)
        assert not budget.spare(port, group), "the answers used the reserve; nothing is spare"
    now[0] += TELEGRAM_GROUP_CALLS.per_s
    assert budget.spare(port, group), "a minute later the window is free again"

    for chat in range(3 * MAX_IDLE_WINDOWS):
        budget.spent(port, Place(str(chat), private=True))
        now[0] += 0.01
    assert len(budget) <= MAX_IDLE_WINDOWS + 1, "chats idle for their window are forgotten"


def test_a_port_that_states_no_limits_is_counted_but_never_held_back() -> None:
    class Unstated:
        platform = "web"

    budget = CallBudget(clock=lambda: 0.0)
    page = Place("page-1", private=True)
    with budget.reserve(Unstated(), page):  # type: ignore[arg-type]
        assert all(budget.spare(Unstated(), page) for _ in range(1000))  # type: ignore[arg-type]
