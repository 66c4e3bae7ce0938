"""Platform errors while an answer is sent or edited: 429s, 5xx, timeouts and connection
resets from Telegram and Discord. Whatever happens on the way, the user sees the answer once,
with its buttons.

The real python-telegram-bot and discord.py against the emulators, which script the faults.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket
from pydantic import SecretStr
from sqlalchemy.exc import OperationalError

from bot.adapters.discord import DiscordAdapter
from bot.adapters.telegram import TelegramAdapter
from bot.core.dialog import Dialog, DialogConfig
from bot.core.events import PhotoFile, PhotoQuestion, Place
from bot.core.port import Button, DeliveryUnknown
from bot.settings import DiscordSettings, TelegramSettings
from bot.store import Store
from bot.store.models import ExchangeStatus
from engine.engine import Engine
from engine.types import ModelSpec
from tests.discord_emulator import DiscordEmulator
from tests.factories import jpeg_bytes
from tests.recording_port import GUARD_S, RecordingPort, person, private_chat
from tests.scripted_backend import LONG_ANSWER, ScriptedBackend
from tests.telegram_emulator import TelegramEmulator
from tests.telegram_emulator import User as TelegramUser

ADA = TelegramUser(42, "Ada", language_code="en")
CLIENT_TIMEOUT_S = 0.5  # the bot's timeout for each platform call, short to keep tests fast
HANG_S = 3 * CLIENT_TIMEOUT_S
# Only the first partial edit is shown before the answer is complete, so that the calls of
# the final answer are known: an edit of the first part, then sends of the others.
NO_MORE_PARTIALS = DialogConfig(edit_interval_s=60.0, questions_per_minute=60)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    # The adapters are the subject here; the store's SQL runs on both databases elsewhere.
    return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'dishbot.db'}"


@asynccontextmanager
async def telegram_bot(store: Store) -> AsyncIterator[tuple[TelegramEmulator, Dialog]]:
    async with TelegramEmulator() as telegram:
        engine = Engine(ScriptedBackend(capacity=4, step_s=0.05), ModelSpec("scripted", "m"))
        async with engine:
            dialog = Dialog(store, engine, NO_MORE_PARTIALS)
            settings = TelegramSettings(
                token=SecretStr(telegram.token),
                base_url=telegram.base_url,
                base_file_url=telegram.base_file_url,
            )
            adapter = TelegramAdapter(settings, dialog, request_timeout_s=CLIENT_TIMEOUT_S)
            await adapter.start()
            try:
                yield telegram, dialog
            finally:
                await adapter.stop()


TELEGRAM_FAULTS: dict[str, Callable[[TelegramEmulator, str], None]] = {
    "429": lambda telegram, method: telegram.fail_next(method, 429, retry_after=1),
    "502": lambda telegram, method: telegram.fail_next(method, 502),
    "500": lambda telegram, method: telegram.fail_next(method, 500),
    # Telegram took the call and was too slow to say so: the bot must not do it twice.
    "timeout": lambda telegram, method: telegram.hang_next(method, HANG_S, processed=True),
    "stuck": lambda telegram, method: telegram.hang_next(method, HANG_S),
    "reset": lambda telegram, method: telegram.reset_next(method),
    # Telegram took the call, then a proxy closed the connection before the answer came.
    "dropped": lambda telegram, method: telegram.reset_next(method, processed=True),
}
# Faults that leave the bot not knowing whether a send took effect: it may have, so it is
# not sent again (the test after next).
OUTCOME_UNKNOWN = ("stuck", "reset")


TELEGRAM_CASES = [
    (method, fault)
    for method in ("sendMessage", "editMessageText")
    for fault in TELEGRAM_FAULTS
    if method != "sendMessage" or fault not in OUTCOME_UNKNOWN
]


async def _long_answer_with_a_fault(telegram: TelegramEmulator, store: Store, fault: str) -> Any:
    """Ask for the long answer; script ``fault`` once the answer streams, so that it hits
    one of the final answer's calls; returns the exchange once the buttons are shown."""
    photo = telegram.add_file(jpeg_bytes(size=(96, 64)))
    telegram.send_photo_message(ADA, ADA.private_chat, photo, caption="long story please")
    await telegram.wait_for("sendMessage", lambda c: c.params["chat_id"] == ADA.id)
    fault_of = fault.split(":")
    TELEGRAM_FAULTS[fault_of[1]](telegram, fault_of[0])
    await telegram.wait_for("sendMessage", lambda c: "reply_markup" in c.params, timeout=15)
    return await _answered(store)


@pytest.mark.parametrize(("method", "fault"), TELEGRAM_CASES)
async def test_a_telegram_answer_arrives_once_with_its_buttons_despite_a_fault(
    store: Store, method: str, fault: str
) -> None:
    async with telegram_bot(store) as (telegram, _dialog):
        exchange = await _long_answer_with_a_fault(telegram, store, f"{method}:{fault}")

    messages = telegram.messages_in(ADA.id)
    with_buttons = [m for m in messages if "reply_markup" in m]
    assert len(with_buttons) == 1, "the buttons are shown once, under the last part"
    texts = [m["text"] for m in messages]
    assert len(texts) == len(set(texts)), "no part of the answer is shown twice"
    assert "\n\n".join(texts).split() == LONG_ANSWER.split()
    assert exchange.status is ExchangeStatus.ANSWERED
    assert [c for c in telegram.calls(method) if not c.ok or c.description], "it did happen"


async def _answered(store: Store) -> Any:
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import AsyncSession

    from bot.store.models import Exchange

    async with AsyncSession(store.engine) as session:
        exchange = await session.scalar(select(Exchange))
    assert exchange is not None
    return exchange


@pytest.mark.parametrize("fault", OUTCOME_UNKNOWN)
async def test_a_telegram_send_that_may_have_arrived_is_not_sent_twice(
    store: Store, fault: str
) -> None:
    # Telegram does not answer a send (in time, or the connection closes once the request
    # went out): it may have shown the message or not, and has no way to tell a second copy
    # from a new message. Not sending it again keeps every message once; that part may be
    # missing (a long timeout makes this rare in production).
    async with telegram_bot(store) as (telegram, _dialog):
        exchange = await _long_answer_with_a_fault(telegram, store, f"sendMessage:{fault}")

    messages = telegram.messages_in(ADA.id)
    assert len([m for m in messages if "reply_markup" in m]) == 1
    texts = [m["text"] for m in messages]
    assert len(texts) == len(set(texts))
    stuck = [c for c in telegram.calls("sendMessage") if not c.ok]
    assert len(stuck) == 1
    assert [c for c in telegram.calls("sendMessage") if c.params == stuck[0].params] == stuck
    assert exchange.status is ExchangeStatus.ANSWERED


# -- Discord ---------------------------------------------------------------------------------

# discord.py waits 1 s before it retries a 5xx itself; the port's timeout covers that wait.
DISCORD_TIMEOUT_S = 2.0
DISCORD_HANG_S = 2 * DISCORD_TIMEOUT_S
CHANNEL_MESSAGES = "POST /channels/{channel_id}/messages"
EDIT_MESSAGE = "PATCH /channels/{channel_id}/messages/{message_id}"

DISCORD_FAULTS: dict[str, Callable[[DiscordEmulator, str], None]] = {
    "429": lambda discord_, route: discord_.fail_next(route, 429, retry_after=0.2),
    "502": lambda discord_, route: discord_.fail_next(route, 502),  # discord.py retries it
    "503": lambda discord_, route: discord_.fail_next(route, 503),  # discord.py does not
    # Discord took the call and was too slow to say so: a send is repeated under its nonce.
    "timeout": lambda discord_, route: discord_.hang_next(route, DISCORD_HANG_S, processed=True),
    "stuck": lambda discord_, route: discord_.hang_next(route, DISCORD_HANG_S),
    "reset": lambda discord_, route: discord_.reset_next(route),
    # Discord took the request, then a proxy closed the connection before the answer came.
    "dropped": lambda discord_, route: discord_.reset_next(route, processed=True),
}


@asynccontextmanager
async def discord_bot(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[DiscordEmulator, int, dict[str, Any]]]:
    """A running Discord bot in a server with one channel; yields the emulator, the
    channel's id and a user."""
    async with DiscordEmulator() as emulator:
        monkeypatch.setattr(discord.http.Route, "BASE", emulator.api_base)
        monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(emulator.gateway_url))
        guild_id = emulator.add_guild("Foodies")
        ada = emulator.add_user("ada", global_name="Ada")
        channel_id = emulator.add_channel(guild_id, "dishes")
        engine = Engine(ScriptedBackend(capacity=4, step_s=0.05), ModelSpec("scripted", "m"))
        async with engine:
            settings = DiscordSettings(
                token=SecretStr(emulator.token),
                api_base=emulator.api_base,
                gateway_url=emulator.gateway_url,
            )
            adapter = DiscordAdapter(
                settings,
                Dialog(store, engine, NO_MORE_PARTIALS),
                guild_ready_timeout=0.05,
                request_timeout_s=DISCORD_TIMEOUT_S,
            )
            await adapter.start()
            try:
                yield emulator, channel_id, ada
            finally:
                await adapter.stop()
                await emulator.wait_until(lambda: not emulator.connected, 15)


@pytest.mark.parametrize("route", [CHANNEL_MESSAGES, EDIT_MESSAGE])
@pytest.mark.parametrize("fault", list(DISCORD_FAULTS))
async def test_a_discord_answer_arrives_once_with_its_buttons_despite_a_fault(
    store: Store, monkeypatch: pytest.MonkeyPatch, route: str, fault: str
) -> None:
    async with discord_bot(store, monkeypatch) as (emulator, channel_id, ada):
        photo = emulator.add_file(jpeg_bytes(size=(96, 64)), "dish.jpg")
        emulator.send_message(channel_id, ada, "long story please", [photo], mentions_bot=True)
        await emulator.wait_until(lambda: bool(emulator.calls(CHANNEL_MESSAGES)), 15)
        # The answer is streaming; its final calls are next: the fault hits one of them.
        DISCORD_FAULTS[fault](emulator, route)
        await emulator.wait_until(
            lambda: any(m["components"] for m in emulator.messages_in(channel_id)), 30
        )
        exchange = await _answered(store)

    messages = [m for m in emulator.messages_in(channel_id) if m["author"]["bot"]]
    assert len([m for m in messages if m["components"]]) == 1, "the buttons are shown once"
    texts = [m["content"] for m in messages]
    assert len(texts) == len(set(texts)), "no part of the answer is shown twice"
    assert " ".join(texts).replace("\\", "").split() == LONG_ANSWER.split()
    assert exchange.status is ExchangeStatus.ANSWERED
    assert [c for c in emulator.calls(route) if c.status != 200 or c.late], "it did happen"


FOLLOW_UP = "POST /webhooks/{application_id}/{token}"
EDIT_FOLLOW_UP = "PATCH /webhooks/{application_id}/{token}/messages/{message_id}"
FOLLOW_UP_CASES = [
    (route, fault)
    for route in (FOLLOW_UP, EDIT_FOLLOW_UP)
    for fault in DISCORD_FAULTS
    # A webhook takes no nonce: a follow-up that got no answer is not sent again (last test).
    if route != FOLLOW_UP or fault not in OUTCOME_UNKNOWN
]


@pytest.mark.parametrize(("route", "fault"), FOLLOW_UP_CASES)
async def test_a_dish_command_answer_arrives_once_with_its_buttons_despite_a_fault(
    store: Store, monkeypatch: pytest.MonkeyPatch, route: str, fault: str
) -> None:
    async with discord_bot(store, monkeypatch) as (emulator, channel_id, ada):
        photo = emulator.add_file(jpeg_bytes(size=(96, 64)), "dish.jpg")
        emulator.slash_command(
            "dish", {"photo": photo, "question": "long story please"}, ada, channel_id
        )
        await emulator.wait_until(lambda: bool(emulator.calls(FOLLOW_UP)), 15)
        DISCORD_FAULTS[fault](emulator, route)
        await emulator.wait_until(
            lambda: any(m["components"] for m in emulator.messages_in(channel_id)), 30
        )
        exchange = await _answered(store)

    messages = [m for m in emulator.messages_in(channel_id) if m["author"]["bot"]]
    assert len([m for m in messages if m["components"]]) == 1, "the buttons are shown once"
    texts = [m["content"] for m in messages]
    assert len(texts) == len(set(texts)), "no part of the answer is shown twice"
    assert " ".join(texts).replace("\\", "").split() == LONG_ANSWER.split()
    assert exchange.status is ExchangeStatus.ANSWERED
    assert [c for c in emulator.calls(route) if c.status != 200 or c.late], "it did happen"


@pytest.mark.parametrize("fault", OUTCOME_UNKNOWN)
async def test_a_dish_command_follow_up_that_may_have_arrived_is_not_sent_twice(
    store: Store, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    # As with Telegram: a follow-up carries no nonce, so one that got no answer is not sent
    # again; every message is shown once, and that part may be missing.
    async with discord_bot(store, monkeypatch) as (emulator, channel_id, ada):
        photo = emulator.add_file(jpeg_bytes(size=(96, 64)), "dish.jpg")
        emulator.slash_command(
            "dish", {"photo": photo, "question": "long story please"}, ada, channel_id
        )
        await emulator.wait_until(lambda: bool(emulator.calls(FOLLOW_UP)), 15)
        DISCORD_FAULTS[fault](emulator, FOLLOW_UP)
        await emulator.wait_until(
            lambda: any(m["components"] for m in emulator.messages_in(channel_id)), 30
        )
        exchange = await _answered(store)

    messages = [m for m in emulator.messages_in(channel_id) if m["author"]["bot"]]
    assert len([m for m in messages if m["components"]]) == 1
    texts = [m["content"] for m in messages]
    assert len(texts) == len(set(texts))
    [failed] = [c for c in emulator.calls(FOLLOW_UP) if c.status != 200]
    assert [c for c in emulator.calls(FOLLOW_UP) if c.json == failed.json] == [failed]
    assert exchange.status is ExchangeStatus.ANSWERED


# -- the last part's id is lost --------------------------------------------------------------


class LastPartLost(RecordingPort):
    """A chat where the send of the answer's last part takes effect and its answer is lost
    (`DeliveryUnknown`): the message is shown, and the bot never learns its id."""

    async def send(
        self,
        where: Place,
        text: str,
        *,
        reply_to: str | None = None,
        buttons: Sequence[Button] = (),
    ) -> str:
        message_id = await super().send(where, text, reply_to=reply_to, buttons=buttons)
        if text.strip() and LONG_ANSWER.strip().endswith(text.strip()):
            raise DeliveryUnknown("the connection closed before Telegram answered")
        return message_id


async def _ask_for_the_long_answer(store: Store, port: RecordingPort, config: DialogConfig) -> Any:
    """Ask for the long answer (several messages) in a private chat and return the exchange,
    once it is stored and nothing more is done with it."""
    engine = Engine(ScriptedBackend(step_s=0.01), ModelSpec("scripted", "m"))
    async with engine:
        dialog = Dialog(store, engine, config)

        async def download() -> bytes:
            return jpeg_bytes(size=(96, 64))

        question = PhotoQuestion(
            person("42"), private_chat("42"), "7", PhotoFile(download), "long story please"
        )
        await asyncio.wait_for(dialog.handle(question, port), GUARD_S)
        # With the database down, the answer is stored in the background, then its buttons
        # go on: the worker doing it ends once nothing waits.
        background = dialog.answer_writes._worker
        if background is not None:
            await asyncio.wait_for(background, GUARD_S)
        await dialog.close()
    return await _answered(store)


def _parts_shown(port: RecordingPort) -> list[str]:
    return [text for text in port.texts("42") if text.strip()]


async def test_buttons_and_the_reply_id_never_go_on_an_earlier_part_when_the_last_is_lost(
    store: Store,
) -> None:
    port = LastPartLost()
    exchange = await _ask_for_the_long_answer(store, port, NO_MORE_PARTIALS)

    assert "\n\n".join(_parts_shown(port)).split() == LONG_ANSWER.split()
    with_buttons = [m for m in port.messages.values() if m.buttons]
    assert len(with_buttons) == 1, "the buttons went out with the last part, and only there"
    assert LONG_ANSWER.strip().endswith(with_buttons[0].text.strip())
    assert exchange.status is ExchangeStatus.ANSWERED
    # A reply to an earlier part is not a reply to the answer: no id is better than a wrong one.
    assert exchange.reply_message_id is None


async def test_buttons_added_once_the_database_is_back_skip_an_answer_whose_last_id_is_lost(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    finish = store.finish_exchange
    failures = iter(range(3))  # the dialog's tries fail; the background write succeeds

    async def down_for_a_while(exchange_id: int, **values: Any) -> Any:
        if next(failures, None) is not None:
            raise OperationalError("UPDATE exchanges", {}, Exception("database is locked"))
        return await finish(exchange_id, **values)

    monkeypatch.setattr(store, "finish_exchange", down_for_a_while)
    port = LastPartLost()
    config = DialogConfig(
        edit_interval_s=60.0, questions_per_minute=60, answer_write_retries_s=(0.01, 0.01)
    )
    exchange = await _ask_for_the_long_answer(store, port, config)

    assert "\n\n".join(_parts_shown(port)).split() == LONG_ANSWER.split()
    assert [m.text for m in port.messages.values() if m.buttons] == [], (
        "no rating buttons under a part that does not end the answer"
    )
    assert exchange.status is ExchangeStatus.ANSWERED
    assert exchange.reply_message_id is None
