"""Memory follows the users active now, not every user ever seen: per-user state shrinks back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.core.dialog import Dialog, DialogConfig
from bot.core.events import ButtonPress, PhotoFile, PhotoQuestion
from bot.store import Store
from engine.engine import Engine, EngineConfig
from engine.types import ModelSpec
from tests.factories import jpeg_bytes
from tests.recording_port import GUARD_S, RecordingPort, person, private_chat
from tests.scripted_backend import ScriptedBackend

USERS = 100
AT_ONCE = 20  # users asking at the same moment


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    # The dialog's memory is the subject; the store's SQL runs on both databases elsewhere.
    return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'dishbot.db'}"


async def ask_and_rate_down(dialog: Dialog, port: RecordingPort, user: int) -> None:
    """A user asks about a photo, then presses 👎 (which leaves a ✏️ prompt waiting)."""
    who, where = person(str(user)), private_chat(str(user))
    colour = (user % 256, user // 256, 99)

    async def download() -> bytes:
        return jpeg_bytes(colour)

    question = PhotoQuestion(who, where, f"q{user}", PhotoFile(download), "what is it?")
    await dialog.handle(question, port)
    [answer_id] = [
        message_id
        for message_id, shown in port.messages.items()
        if shown.chat_id == where.chat_id and shown.buttons
    ]
    thumbs_down = next(b.data for b in port.messages[answer_id].buttons if b.label == "👎")
    await dialog.handle(ButtonPress(who, where, answer_id, thumbs_down), port)


def per_user_state(dialog: Dialog, engine: Engine) -> dict[str, int]:
    scheduler = engine._scheduler
    return {
        "dialog handles": len(dialog._handles),
        "dialog questions on their way in": len(dialog._asking),
        "dialog per-user locks": len(dialog._user_locks),
        "question rate limiter": len(dialog._rate),
        "feedback rate limiter": len(dialog._feedback_rate),
        "reply rate limiter": len(dialog._replies_rate),
        "latest ✏️ prompts": len(dialog._latest_prompt),
        "engine tickets": len(engine._tickets),
        "engine decodes": len(engine._decoding),
        "engine decode turns": len(engine._decode_turns),
        "scheduler queues": len(scheduler._waiting),
        "scheduler joins": len(scheduler._joined),
        "scheduler open counts": len(scheduler._open_per_key),
    }


async def test_per_user_state_shrinks_back_after_many_users_come_and_go(store: Store) -> None:
    clock, port = FakeClock(), RecordingPort()
    engine = Engine(
        ScriptedBackend(capacity=8, step_s=0.001),
        ModelSpec("scripted", "dishbot-test"),
        EngineConfig(max_pending=64),
    )
    async with engine:
        config = DialogConfig(edit_interval_s=0.0, questions_per_minute=60)
        dialog = Dialog(store, engine, config, clock=clock)
        for first in range(0, USERS, AT_ONCE):
            users = range(first, first + AT_ONCE)
            await asyncio.wait_for(
                asyncio.gather(*(ask_and_rate_down(dialog, port, user) for user in users)),
                GUARD_S,
            )
        assert len(dialog._latest_prompt) == USERS, "while they are recent, prompts are kept"

        # Everyone goes quiet for longer than any window the dialog remembers users for;
        # then one new user comes.
        clock.now += max(config.correction_window_s, config.follow_up_window_s, 60.0) + 1
        await asyncio.wait_for(ask_and_rate_down(dialog, port, USERS), GUARD_S)

        state = per_user_state(dialog, engine)
    # What is left is about the one user active now, whatever came before.
    assert {name: size for name, size in state.items() if size > 1} == {}
    assert len(engine._scheduler._virtual) <= 2 * engine.config.max_pending + 8
