"""Nothing a platform delivered is lost in a crash: what the bot received is kept in the
inbox until its handling ends, and what a process that died left there is handled again,
once, by the next start; an answer stored and never shown is shown.

The store's SQL runs on SQLite and PostgreSQL; the flows run the real python-telegram-bot
and discord.py against the emulators, and `dishbot run` itself (in this process) against an
OpenAI-compatible stand-in.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket
from sqlalchemy import update

from bot.core.recovery import MAX_REPLAYS, Recovery
from bot.store import ExchangeOwner, ExchangeStatus, InboxRecord, Store
from bot.store.models import Exchange, InboxEntry, utcnow
from bot.store.schema import upgrade
from tests.discord_emulator import DiscordEmulator
from tests.factories import add_photo, add_user, jpeg_bytes
from tests.openai_server import FakeOpenAIServer
from tests.scripted_backend import ScriptedBackend
from tests.telegram_emulator import TelegramEmulator
from tests.test_discord_bot import answer_to as discord_answer_to
from tests.test_discord_bot import send_photo as discord_photo
from tests.test_recovery import (
    ADA,
    ANSWER,
    CHAT,
    COLOUR,
    GUARD_S,
    QUESTION,
    answers_to,
    discord_bot,
    dishbot_serving,
    fetched_by_a_bot_now_gone,
    left_pending,
    one_answer,
    served_settings,
    status_of,
    with_store,
)
from tests.test_retraining_loop import until
from tests.test_telegram_bot import MODEL, buttons_of, running_bot

STALE_AFTER = timedelta(minutes=3)


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def gone_owner(store: Store) -> ExchangeOwner:
    """A process on this host that was killed."""
    return ExchangeOwner(store.owner.host, dead_pid(), "killed")


async def keys_of(store: Store, *, orphaned: bool = False) -> list[str]:
    if orphaned:
        entries = await store.orphaned_inbox(stale_after=STALE_AFTER)
    else:
        entries = await store.inbox()
    return [entry.key for entry in entries]


# -- the store ------------------------------------------------------------------------------


async def test_what_was_received_is_kept_until_its_handling_ends(store: Store) -> None:
    await store.add_to_inbox("telegram", [("1:10", '{"update_id": 10}'), ("1:11", "{}")])
    await store.add_to_inbox("telegram", [("1:10", "delivered again")])

    [first, second] = await store.inbox("telegram")
    assert (first.key, first.payload, first.attempts) == ("1:10", '{"update_id": 10}', 0)
    assert first.owner_token == store.owner.token
    assert second.key == "1:11"

    await store.remove_from_inbox("telegram", ["1:10"])
    assert await keys_of(store) == ["1:11"]


async def test_only_entries_of_gone_processes_are_orphaned(store: Store) -> None:
    far = ExchangeOwner("gpu-2", 4242, "far")
    await store.add_to_inbox("telegram", [("1:1", "{}")], owner=gone_owner(store))
    await store.add_to_inbox("telegram", [("1:2", "{}")])  # this process's own
    await store.add_to_inbox("discord", [("5:6", "{}")], owner=far)  # alive elsewhere
    await store.add_to_inbox("discord", [("5:7", "{}")], owner=far)
    async with store.engine.begin() as connection:
        await connection.execute(
            update(InboxEntry)
            .where(InboxEntry.key == "5:7")
            .values(owned_since=utcnow() - STALE_AFTER * 2)  # quiet for too long
        )

    assert await keys_of(store, orphaned=True) == ["1:1", "5:7"]


async def test_the_chats_asked_in_lately_are_found_with_their_newest_question(
    store: Store,
) -> None:
    user = await add_user(store, "7", platform="discord")
    photo = await add_photo(store)

    async def asked(chat_id: str, message_id: str, platform: str = "discord") -> int:
        exchange = await store.start_exchange(
            user_id=user.id,
            platform=platform,
            chat_id=chat_id,
            question=QUESTION,
            question_message_id=message_id,
            photo_sha256=photo.sha256,
        )
        return exchange.id

    await asked("100", "10")
    await asked("100", "9")  # an older message stored later: the newest is 10, not "9"
    await asked("200", "25")
    await asked("300", "31", platform="telegram")
    long_ago = await asked("400", "41")
    async with store.engine.begin() as connection:
        await connection.execute(
            update(Exchange)
            .where(Exchange.id == long_ago)
            .values(created_at=utcnow() - timedelta(hours=2))
        )

    chats = await store.recent_chats("discord", utcnow() - timedelta(hours=1))
    assert sorted(chats) == [("100", "10"), ("200", "25")]


async def test_two_processes_starting_together_take_each_entry_once(
    database_url: str, data_dir: Path, store: Store
) -> None:
    killed = gone_owner(store)
    keys = [f"1:{n}" for n in range(6)]
    await store.add_to_inbox("telegram", [(key, "{}") for key in keys], owner=killed)
    other = Store.open(database_url, data_dir)
    try:
        seen = await asyncio.gather(
            store.orphaned_inbox(stale_after=STALE_AFTER),
            other.orphaned_inbox(stale_after=STALE_AFTER),
        )

        async def claim_all(claimer: Store, entries: list[Any]) -> list[str]:
            claimed = [await claimer.claim_inbox_entry(entry) for entry in entries]
            return [entry.key for entry in claimed if entry is not None]

        by_one, by_other = await asyncio.gather(
            claim_all(store, seen[0]), claim_all(other, seen[1])
        )
    finally:
        await other.close()

    assert sorted(by_one + by_other) == keys
    for entry in await store.inbox():
        assert entry.attempts == 1
        mine = entry.key in by_one
        assert entry.owner_token == (store.owner.token if mine else other.owner.token)
    # A claimer's own now (the other store, in this same pid, looks like a restarted one).
    assert set(await keys_of(store, orphaned=True)).isdisjoint(by_one)


async def answered_unshown(
    store: Store, owner: ExchangeOwner, message: str, *, reply: str | None = None
) -> int:
    user = await add_user(store, "5")
    photo = await add_photo(store)
    exchange = await store.start_exchange(
        user_id=user.id,
        platform="telegram",
        chat_id="5",
        question="what is it?",
        question_message_id=message,
        photo_sha256=photo.sha256,
        owner=owner,
    )
    await store.finish_exchange(
        exchange.id, answer="char siu", model_version="m", latency_ms=5, reply_message_id=reply
    )
    return exchange.id


async def test_answers_stored_but_never_shown_by_a_gone_process_are_found_and_taken_once(
    store: Store,
) -> None:
    killed = gone_owner(store)
    unshown = await answered_unshown(store, killed, "1")
    await answered_unshown(store, killed, "2", reply="99")  # shown
    await answered_unshown(store, store.owner, "3")  # this process is still at it
    old = await answered_unshown(store, killed, "4")
    async with store.engine.begin() as connection:
        await connection.execute(
            update(Exchange)
            .where(Exchange.id == old)
            .values(finished_at=utcnow() - timedelta(hours=1))
        )

    found = await store.undelivered_answers(
        stale_after=STALE_AFTER, answered_within=timedelta(minutes=10)
    )

    assert [exchange.id for exchange in found] == [unshown]
    claimed = await store.claim_undelivered_answer(found[0])
    assert claimed is not None
    assert claimed.owner_token == store.owner.token
    assert await store.claim_undelivered_answer(found[0]) is None  # listed before the claim


# -- Telegram -------------------------------------------------------------------------------


@pytest.fixture
async def telegram() -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator() as emulator:
        yield emulator


@pytest.fixture
async def sqlite_store(tmp_path: Path, data_dir: Path) -> AsyncIterator[Store]:
    """The flows are the subject here; the store's SQL runs on both databases above."""
    store = Store.open(f"sqlite+aiosqlite:///{tmp_path / 'dishbot.db'}", data_dir)
    await upgrade(store.engine)
    try:
        yield store
    finally:
        await store.close()


def photo_update(telegram: TelegramEmulator, caption: str = QUESTION) -> dict[str, Any]:
    file_id = telegram.add_file(jpeg_bytes(COLOUR, size=(96, 64)))
    update: dict[str, Any] = telegram.send_photo_message(ADA, CHAT, file_id, caption=caption)
    return update


def telegram_key(telegram: TelegramEmulator, update: dict[str, Any]) -> str:
    return f"{telegram.token.partition(':')[0]}:{update['update_id']}"


async def inbox_empties(store: Store) -> None:
    async def poll() -> None:
        while await store.inbox():  # noqa: ASYNC110 - polls the database
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), GUARD_S)


async def test_an_update_stays_in_the_inbox_while_its_photo_downloads_and_leaves_it_answered(
    telegram: TelegramEmulator, sqlite_store: Store
) -> None:
    telegram.hang_next("getFile", 1.0, processed=True)  # Telegram slow to hand the photo
    async with running_bot(telegram, sqlite_store) as bot:
        update = photo_update(telegram)
        await until(lambda: bool(telegram.calls("getFile")), GUARD_S)
        during = await sqlite_store.inbox("telegram")
        answer = await bot.answer_to(ADA, CHAT, update)
        await inbox_empties(sqlite_store)

    [kept] = during
    assert kept.key == telegram_key(telegram, update)
    assert json.loads(kept.payload)["message"]["message_id"] == update["message"]["message_id"]
    assert answer["text"] == f"{MODEL} says: {QUESTION}"


async def test_updates_the_bot_does_not_act_on_leave_the_inbox_too(
    telegram: TelegramEmulator, sqlite_store: Store
) -> None:
    async with running_bot(telegram, sqlite_store):
        sent = telegram.send_text(ADA, CHAT, "hello")
        telegram.edit_user_message(CHAT, sent["message"]["message_id"], text="hello again")
        await until(lambda: telegram.pending_updates == 0, GUARD_S)
        await inbox_empties(sqlite_store)


async def test_an_update_a_killed_bot_had_fetched_is_answered_once_when_dishbot_starts(
    tmp_path: Path, telegram: TelegramEmulator
) -> None:
    update = photo_update(telegram)
    await fetched_by_a_bot_now_gone(telegram)  # and kept in the inbox, before its photo came
    async with FakeOpenAIServer(default_reply=ANSWER) as model:
        settings = served_settings(tmp_path, telegram, model)

        async def kept_by_a_killed_bot(store: Store) -> None:
            entry = (telegram_key(telegram, update), json.dumps(update))
            await store.add_to_inbox("telegram", [entry], owner=gone_owner(store))

        await with_store(settings, kept_by_a_killed_bot)

        async with dishbot_serving(settings, telegram):
            answer = await one_answer(telegram, update["message"])
            await with_store(settings, inbox_empties)

    assert answer["text"] == ANSWER.text
    assert [label for label, _ in buttons_of(answer)] == ["👍", "👎", "✏️"]
    [asked] = model.requests
    assert asked.question == QUESTION
    assert len(answers_to(telegram, update["message"])) == 1


async def test_a_replayed_update_whose_question_was_stored_is_not_asked_twice(
    tmp_path: Path, telegram: TelegramEmulator
) -> None:
    update = photo_update(telegram)
    await fetched_by_a_bot_now_gone(telegram)
    async with FakeOpenAIServer(default_reply=ANSWER) as model:
        settings = served_settings(tmp_path, telegram, model)

        async def stored_by_a_killed_bot(store: Store) -> int:
            killed = gone_owner(store)
            entry = (telegram_key(telegram, update), json.dumps(update))
            await store.add_to_inbox("telegram", [entry], owner=killed)
            left = await left_pending(store, update["message"], QUESTION, owner=killed)
            return left.id

        exchange_id = await with_store(settings, stored_by_a_killed_bot)

        async with dishbot_serving(settings, telegram):
            await one_answer(telegram, update["message"])
            await with_store(settings, inbox_empties)
        exchange = await with_store(settings, lambda store: status_of(store, exchange_id))

    assert len(model.requests) == 1
    assert len(answers_to(telegram, update["message"])) == 1
    assert exchange.status is ExchangeStatus.ANSWERED


async def test_an_update_that_took_its_handlers_down_each_time_is_dropped_and_logged(
    telegram: TelegramEmulator, sqlite_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    update = photo_update(telegram)
    await fetched_by_a_bot_now_gone(telegram)
    key = telegram_key(telegram, update)
    entry = (key, json.dumps(update))
    await sqlite_store.add_to_inbox("telegram", [entry], owner=gone_owner(sqlite_store))
    async with sqlite_store.engine.begin() as connection:
        await connection.execute(update_attempts(key, MAX_REPLAYS))

    async with running_bot(telegram, sqlite_store) as bot:
        recovery = Recovery(
            sqlite_store,
            bot.dialog,
            {"telegram": bot.adapter.port},
            request_timeout_s=120,
            replayers={"telegram": bot.adapter},
        )
        with caplog.at_level(logging.ERROR, logger="bot.core.recovery"):
            await recovery.sweep()
        await recovery.close()

    assert await sqlite_store.inbox() == []
    assert telegram.calls("getFile") == []
    assert telegram.calls("sendMessage") == []  # not answered, nor apologised for
    assert f"delivery {key} was handled again {MAX_REPLAYS} times" in caplog.text


async def test_a_replay_that_failed_is_tried_again_by_the_next_sweep_of_the_same_process(
    telegram: TelegramEmulator, sqlite_store: Store
) -> None:
    update = photo_update(telegram)
    await fetched_by_a_bot_now_gone(telegram)
    entry = (telegram_key(telegram, update), json.dumps(update))
    await sqlite_store.add_to_inbox("telegram", [entry], owner=gone_owner(sqlite_store))

    async with running_bot(telegram, sqlite_store) as bot:
        tries: list[str] = []

        class FlakyReplayer:
            async def replay(self, entry: InboxRecord) -> None:
                tries.append(entry.key)
                if len(tries) == 1:
                    raise ConnectionResetError("the platform dropped the connection")
                await bot.adapter.replay(entry)

        recovery = Recovery(
            sqlite_store,
            bot.dialog,
            {"telegram": bot.adapter.port},
            request_timeout_s=120,
            replayers={"telegram": FlakyReplayer()},
        )
        await recovery.sweep()
        await recovery.sweep()  # RECOVER_INTERVAL_S later
        answer = await one_answer(telegram, update["message"])
        await inbox_empties(sqlite_store)
        await recovery.close()

    assert answer["text"] == f"{MODEL} says: {QUESTION}"
    assert len(tries) == 2


def update_attempts(key: str, attempts: int) -> Any:
    return update(InboxEntry).where(InboxEntry.key == key).values(attempts=attempts)


# -- Discord --------------------------------------------------------------------------------


@pytest.fixture
async def discord_emulator(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[DiscordEmulator]:
    async with DiscordEmulator() as emulator:
        # discord.py reads its endpoints from class attributes; monkeypatch puts them back.
        monkeypatch.setattr(discord.http.Route, "BASE", emulator.api_base)
        monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(emulator.gateway_url))
        yield emulator


async def test_a_discord_message_a_killed_bot_received_is_fetched_and_answered_once(
    discord_emulator: DiscordEmulator, sqlite_store: Store
) -> None:
    emulator = discord_emulator
    channel = emulator.add_channel(emulator.add_guild("Foodies"), "dishes")
    ada = emulator.add_user("ada", global_name="Ada")
    asked = discord_photo(emulator, channel, ada, QUESTION, mentions_bot=True)
    assert emulator.forget_undelivered() == 1  # the killed bot had it from the gateway
    payload = {"channel_id": str(channel), "message_id": asked["id"]}
    entry = (f"{channel}:{asked['id']}", json.dumps(payload))
    await sqlite_store.add_to_inbox("discord", [entry], owner=gone_owner(sqlite_store))

    async with discord_bot(emulator, sqlite_store, ScriptedBackend()) as adapter:
        recovery = Recovery(
            sqlite_store,
            adapter.dialog,
            {"discord": adapter.port},
            request_timeout_s=120,
            replayers={"discord": adapter},
        )
        await recovery.sweep()
        answer = await discord_answer_to(emulator, channel, asked)
        await inbox_empties(sqlite_store)
        await recovery.close()

    assert answer["content"] == f"{MODEL} says: {QUESTION}"
    assert answer["message_reference"]["message_id"] == asked["id"]
    assert [m for m in emulator.messages_in(channel) if m["components"]] == [answer]


def replies_in(emulator: DiscordEmulator, channel: int) -> list[str]:
    """The ids of the messages the bot's messages in ``channel`` reply to, oldest first."""
    return [
        m["message_reference"]["message_id"]
        for m in emulator.messages_in(channel)
        if "message_reference" in m
    ]


async def test_a_discord_photo_a_killed_bot_never_read_is_answered_once_at_the_next_start(
    discord_emulator: DiscordEmulator, sqlite_store: Store
) -> None:
    emulator = discord_emulator
    ada = emulator.add_user("ada", global_name="Ada")
    dm = emulator.add_dm_channel(ada)
    async with discord_bot(emulator, sqlite_store, ScriptedBackend()):
        first = discord_photo(emulator, dm, ada, QUESTION)
        await discord_answer_to(emulator, dm, first)
    # Written to the gateway connection of a bot killed before it read them.
    missed = discord_photo(emulator, dm, ada, QUESTION, colour=(30, 160, 90))
    chatter = emulator.send_message(dm, ada, "thanks!")
    emulator.forget_undelivered()  # none of it reaches the next session

    backend = ScriptedBackend()
    async with discord_bot(emulator, sqlite_store, backend) as adapter:
        answer = await discord_answer_to(emulator, dm, missed)
        assert adapter.catching_up is not None
        await adapter.catching_up
        await inbox_empties(sqlite_store)
    again = ScriptedBackend()
    async with discord_bot(emulator, sqlite_store, again) as adapter:  # and a later start
        assert adapter.catching_up is not None
        await adapter.catching_up

    assert answer["content"] == f"{MODEL} says: {QUESTION}"
    assert len(backend.jobs) == 1
    assert again.jobs == []  # the later start asks the model nothing
    # Each photo answered once; the text (which would get a hint) not handled at all.
    assert replies_in(emulator, dm) == [first["id"], missed["id"]]
    assert chatter["id"] not in replies_in(emulator, dm)


async def test_a_discord_photo_both_kept_in_the_inbox_and_caught_up_is_answered_once(
    discord_emulator: DiscordEmulator, sqlite_store: Store
) -> None:
    emulator = discord_emulator
    ada = emulator.add_user("ada", global_name="Ada")
    dm = emulator.add_dm_channel(ada)
    async with discord_bot(emulator, sqlite_store, ScriptedBackend()):
        first = discord_photo(emulator, dm, ada, QUESTION)
        await discord_answer_to(emulator, dm, first)
    # The killed bot had read this one and kept it in the inbox, but never stored its
    # question: the recovery replays it, and catching up finds it too.
    asked = discord_photo(emulator, dm, ada, QUESTION, colour=(30, 160, 90))
    emulator.forget_undelivered()
    payload = {"channel_id": str(dm), "message_id": asked["id"]}
    entry = (f"{dm}:{asked['id']}", json.dumps(payload))
    await sqlite_store.add_to_inbox("discord", [entry], owner=gone_owner(sqlite_store))

    async with discord_bot(emulator, sqlite_store, ScriptedBackend()) as adapter:
        recovery = Recovery(
            sqlite_store,
            adapter.dialog,
            {"discord": adapter.port},
            request_timeout_s=120,
            replayers={"discord": adapter},
        )
        await recovery.sweep()
        await discord_answer_to(emulator, dm, asked)
        assert adapter.catching_up is not None
        await adapter.catching_up
        await inbox_empties(sqlite_store)
        await recovery.close()

    assert replies_in(emulator, dm) == [first["id"], asked["id"]]


# -- an answer stored, never shown ------------------------------------------------------------


async def test_an_answer_a_killed_bot_stored_but_never_showed_is_shown_with_its_buttons(
    telegram: TelegramEmulator, sqlite_store: Store
) -> None:
    update = photo_update(telegram)
    await fetched_by_a_bot_now_gone(telegram)
    left = await left_pending(sqlite_store, update["message"], QUESTION)  # a killed owner
    await sqlite_store.finish_exchange(
        left.id, answer=ANSWER.text, model_version=MODEL, latency_ms=900
    )
    backend = ScriptedBackend()

    async with running_bot(telegram, sqlite_store, backend) as bot:
        recovery = Recovery(
            sqlite_store, bot.dialog, {"telegram": bot.adapter.port}, request_timeout_s=120
        )
        await recovery.sweep()
        answer = await one_answer(telegram, update["message"])
        await until(lambda: not recovery.busy, GUARD_S)  # its message id is stored too
        await recovery.close()

    assert answer["text"] == ANSWER.text
    assert [label for label, _ in buttons_of(answer)] == ["👍", "👎", "✏️"]
    assert backend.jobs == []  # shown as stored: nothing asked of the model again
    exchange = await status_of(sqlite_store, left.id)
    assert exchange.reply_message_id == str(answer["message_id"])
