"""The origin lesson, for real: InternVL took 肠粉 for something else; an admin corrects it in
chat, says /retrain, and a while later the bot names 肠粉.

Everything in the loop is the production code: `App.run` wiring the real python-telegram-bot
(against the Telegram emulator, over sockets), the dialog, a SQLite store, the engine with the
transformers backend and a tiny random InternVL, the export, dishbot's own LoRA trainer in its
subprocess, the evaluation through two engines, promotion, and the version follower.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.app import App
from bot.settings import (
    EngineSettings,
    LimitSettings,
    Settings,
    TelegramSettings,
    TrainingSettings,
)
from bot.store import RunStage, Store, TrainingRunRecord
from bot.store.models import Exchange
from bot.training.export.writer import is_validation_photo
from tests.factories import jpeg_bytes
from tests.telegram_emulator import DEFAULT_BOT_USERNAME, TelegramEmulator
from tests.telegram_emulator import Chat as TelegramChat
from tests.telegram_emulator import User as TelegramUser
from tests.test_telegram_bot import button_data, send_photo

ADMIN = TelegramUser(900, "Admin", language_code="en")
LIN = TelegramUser(43, "林", language_code="zh-hans")
FAN = TelegramUser(44, "Fan", language_code="en")
FOODIES = TelegramChat.group(-1001234567890, "Foodies")
MENTION = f"@{DEFAULT_BOT_USERNAME}"
QUESTION = "这是什么菜？"
CHEUNG_FUN = (240, 240, 240)  # the photo the model gets wrong
OTHERS = {(200, 30, 30): "叉烧", (40, 180, 60): "虾饺"}
LIKED = (30, 60, 200)
GUARD_S = 30.0  # a guard against hangs, not a measurement
RUN_GUARD_S = 300.0  # the whole run: export, ~10 s of training, evaluation, promotion
# The tiny model's recipe (see tests/test_trainer_transformers.py): 4 samples, 2 a batch,
# 40 epochs = 80 iterations of LoRA r8 at lr 1e-2, on one thread so the bot keeps answering.
RECIPE: dict[str, Any] = {
    "trainer": "transformers",
    "epochs": 40,
    "learning_rate": 1e-2,
    "batch_size": 2,
    "accumulative_counts": 1,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "threads": 1,
    "follow_interval_s": 0.2,
    # A random model's approved answers are byte noise that a tokenizer does not give back
    # whole once trained on, so here "kept" is shown but does not decide (the rule is tested
    # on real text in tests/test_evaluation.py; real models are held to 0.1).
    "kept_tolerance": 1.0,
}


def photo_bytes(colour: tuple[int, int, int]) -> bytes:
    return jpeg_bytes(colour, size=(96, 64))


@pytest.fixture
async def telegram() -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator() as emulator:
        yield emulator


def loop_settings(
    tiny_internvl: Path,
    tmp_path: Path,
    telegram: TelegramEmulator,
    training: dict[str, Any] = RECIPE,
) -> Settings:
    """`dishbot run` as these tests configure it: the emulator, the tiny model on the
    transformers backend, one admin, and ``training`` (the tiny model's recipe)."""
    return Settings(
        data_dir=tmp_path / "data",
        admins=[f"telegram:{ADMIN.id}"],
        telegram=TelegramSettings(
            token=SecretStr(telegram.token),
            base_url=telegram.base_url,
            base_file_url=telegram.base_file_url,
        ),
        engine=EngineSettings(
            backend="transformers",
            model=str(tiny_internvl),
            device="cpu",
            max_tiles=1,
            max_new_tokens=8,
        ),
        training=TrainingSettings(**training),
        limits=LimitSettings(questions_per_minute=60),
    )


@pytest.fixture
def settings(tiny_internvl: Path, tmp_path: Path, telegram: TelegramEmulator) -> Settings:
    return loop_settings(tiny_internvl, tmp_path, telegram)


@contextlib.asynccontextmanager
async def dishbot_running(settings: Settings, telegram: TelegramEmulator) -> AsyncIterator[None]:
    """`dishbot run`, in this process, until the block ends."""
    stop = asyncio.Event()
    app = asyncio.create_task(App(settings).run(stop))
    await telegram.wait_for("getUpdates", timeout=GUARD_S)
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(app, GUARD_S)


async def until(condition: Callable[[], bool], timeout: float = GUARD_S) -> None:  # noqa: ASYNC109
    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 - the emulator's state, polled
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


class Group:
    """The Foodies group with the bot in it, as the test plays it."""

    def __init__(self, telegram: TelegramEmulator) -> None:
        self.telegram = telegram
        telegram.add_chat(FOODIES)

    async def ask(self, user: TelegramUser, colour: tuple[int, int, int]) -> dict[str, Any]:
        """``user`` sends a photo asking what it is; the bot's final answer, with its buttons."""
        caption = f"{MENTION} {QUESTION}"
        question = send_photo(self.telegram, user, FOODIES, caption, colour=colour)

        def final() -> dict[str, Any] | None:
            for shown in self.telegram.messages_in(FOODIES.id):
                replied = shown.get("reply_to_message", {}).get("message_id")
                if replied == question["message_id"] and "reply_markup" in shown:
                    return shown
            return None

        await until(lambda: final() is not None)
        answer = final()
        assert answer is not None
        return answer

    async def correct(self, user: TelegramUser, answer: dict[str, Any], dish: str) -> None:
        """``user`` presses ✏️ under the answer and replies to the bot's question with ``dish``."""
        prompts = len(self._prompts())
        self._press(user, answer, "✏️")
        await until(lambda: len(self._prompts()) > prompts)
        prompt = self._prompts()[-1]
        self.telegram.send_text(user, FOODIES, dish, reply_to_message_id=prompt["message_id"])
        await until(lambda: any(f"it is: {dish}" in t for t in self.texts()))

    def approve(self, user: TelegramUser, answer: dict[str, Any]) -> str:
        return self._press(user, answer, "👍")

    def texts(self) -> list[str]:
        return [m.get("text", "") for m in self.telegram.messages_in(FOODIES.id)]

    def _prompts(self) -> list[dict[str, Any]]:
        return [
            m
            for m in self.telegram.messages_in(FOODIES.id)
            if "What is it actually" in m.get("text", "")
        ]

    def _press(self, user: TelegramUser, answer: dict[str, Any], label: str) -> str:
        return self.telegram.press_button(user, answer, button_data(answer, label))


def admin_texts(telegram: TelegramEmulator) -> list[str]:
    return [m.get("text", "") for m in telegram.messages_in(ADMIN.id)]


async def stored_exchanges(settings: Settings, colour: tuple[int, int, int]) -> list[Exchange]:
    """The exchanges about one photo, oldest first, read through a connection of our own."""
    store = Store.open(settings.db_url, settings.data_dir)
    try:
        sha = hashlib.sha256(photo_bytes(colour)).hexdigest()
        async with AsyncSession(store.engine) as session:
            query = select(Exchange).where(Exchange.photo_sha256 == sha).order_by(Exchange.id)
            return list(await session.scalars(query))
    finally:
        await store.close()


async def the_run(settings: Settings) -> TrainingRunRecord:
    store = Store.open(settings.db_url, settings.data_dir)
    try:
        [run] = await store.training_runs()
        return run
    finally:
        await store.close()


async def test_the_origin_lesson_the_bot_learns_cheung_fun_from_a_correction_and_rolls_back(
    settings: Settings, telegram: TelegramEmulator
) -> None:
    # Every photo lands in training (the export splits by photo hash), as in the lesson.
    for colour in (CHEUNG_FUN, *OTHERS, LIKED):
        assert not is_validation_photo(hashlib.sha256(photo_bytes(colour)).hexdigest(), 0.1)
    group = Group(telegram)

    async with dishbot_running(settings, telegram):
        wrong = await group.ask(LIN, CHEUNG_FUN)
        assert "肠粉" not in wrong["text"], "the base model answers noise"
        await group.correct(ADMIN, wrong, "肠粉")
        # Other feedback: the admin names two more dishes, a user approves a third answer.
        for colour, dish in OTHERS.items():
            await group.correct(ADMIN, await group.ask(LIN, colour), dish)
        liked = await group.ask(LIN, LIKED)
        thumbs = group.approve(FAN, liked)
        await telegram.wait_for(
            "answerCallbackQuery", lambda c: c.params["callback_query_id"] == thumbs
        )

        telegram.send_text(ADMIN, ADMIN.private_chat, "/retrain")
        await until(lambda: any(t.startswith("Retraining run 1") for t in admin_texts(telegram)))
        # While the run trains, the bot keeps answering users.
        during = await group.ask(FAN, (90, 90, 20))
        assert during["text"]
        await until(
            lambda: any("Decision" in t or "failed" in t for t in admin_texts(telegram)),
            RUN_GUARD_S,
        )
        run = await the_run(settings)
        assert run.stage is RunStage.DONE, (
            f"{run.stage}: {run.error} {run.decision} {run.evaluation}"
        )
        [report] = [t for t in admin_texts(telegram) if t.startswith("Retraining run 1")]
        edits = [c.params["text"] for c in telegram.calls("editMessageText")]
        assert any("training" in t and "%" in t and "loss" in t for t in edits), edits
        taught = next(line for line in report.splitlines() if line.startswith("taught"))
        assert taught.split()[1:3] == ["0.00", "1.00"], report
        assert "now answering: run-1" in report

        await asyncio.sleep(1.0)  # every process follows the active version (every 0.2 s)
        learnt = await group.ask(LIN, CHEUNG_FUN)
        assert "肠粉" in learnt["text"]
        assert (await stored_exchanges(settings, CHEUNG_FUN))[-1].model_version == "run-1"

        telegram.send_text(ADMIN, ADMIN.private_chat, "/rollback")
        await until(lambda: any(t.startswith("Rolled back") for t in admin_texts(telegram)))
        assert "Rolled back: base is answering again." in admin_texts(telegram)
        await asyncio.sleep(1.0)
        again = await group.ask(LIN, CHEUNG_FUN)
        assert again["text"] == wrong["text"], "the old model answers as it did"
        assert (await stored_exchanges(settings, CHEUNG_FUN))[-1].model_version == "base"
