"""Questions and answers as the dialog stores them."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from bot.errors import AlreadyAnswered, AlreadyAsked, NotFound
from bot.store import CorrectionStatus, ExchangeStatus, Store
from bot.store.models import Correction, CorrectionPrompt, utcnow
from tests.factories import add_photo, add_user, answered


async def test_a_question_is_pending_until_answered_with_latency_and_model_version(
    store: Store,
) -> None:
    user = await add_user(store, "5")
    photo = await add_photo(store)

    pending = await store.start_exchange(
        user_id=user.id,
        platform="telegram",
        chat_id="-1001",
        question="is this spicy?",
        question_message_id="77",
        photo_sha256=photo.sha256,
    )
    assert pending.status is ExchangeStatus.PENDING
    assert pending.answer is None

    done = await store.finish_exchange(
        pending.id,
        answer="Mapo tofu: yes, quite spicy.",
        model_version="internvl2-2b",
        latency_ms=1234,
        reply_message_id="78",
    )
    assert done.status is ExchangeStatus.ANSWERED
    assert (done.answer, done.model_version, done.latency_ms) == (
        "Mapo tofu: yes, quite spicy.",
        "internvl2-2b",
        1234,
    )
    assert done.finished_at is not None
    assert done.finished_at >= done.created_at
    assert await store.get_exchange(pending.id) == done


async def test_a_failed_question_keeps_its_reason(store: Store) -> None:
    user = await add_user(store, "5")
    pending = await store.start_exchange(
        user_id=user.id, platform="discord", chat_id="9", question="?", question_message_id="1"
    )

    failed = await store.fail_exchange(pending.id, error="timed out in the queue")

    assert failed.status is ExchangeStatus.FAILED
    assert failed.error == "timed out in the queue"
    assert failed.answer is None


async def test_a_message_delivered_twice_is_one_exchange(store: Store) -> None:
    user = await add_user(store, "5")
    first = await store.start_exchange(
        user_id=user.id, platform="telegram", chat_id="42", question="?", question_message_id="9"
    )
    with pytest.raises(AlreadyAsked) as again:
        await store.start_exchange(
            user_id=user.id,
            platform="telegram",
            chat_id="42",
            question="edited?",
            question_message_id="9",
        )
    other_chat = await store.start_exchange(
        user_id=user.id, platform="telegram", chat_id="43", question="?", question_message_id="9"
    )

    assert again.value.exchange_id == first.id
    assert await store.was_asked("telegram", "42", "9")
    assert not await store.was_asked("telegram", "42", "10")
    assert other_chat.id != first.id
    assert (await store.get_exchange(first.id)) == first, "the first question stands"


async def test_an_answered_question_keeps_the_answer_people_rated(store: Store) -> None:
    user = await add_user(store, "5")
    first = await answered(store, user, question="这是什么菜？", answer="叉烧")
    await store.record_rating(first.id, user.id, 1)

    with pytest.raises(AlreadyAnswered):
        await store.finish_exchange(first.id, answer="肠粉", model_version="v2", latency_ms=5)

    kept = await store.get_exchange(first.id)
    assert kept is not None
    assert (kept.answer, kept.status) == ("叉烧", ExchangeStatus.ANSWERED)


async def test_a_reply_to_an_answer_finds_the_conversation_oldest_first(store: Store) -> None:
    user = await add_user(store, "5")
    photo = await add_photo(store)
    first = await answered(store, user, photo=photo, question="这是什么菜？", answer="叉烧")
    second = await answered(
        store, user, photo=photo, question="is it sweet?", answer="yes", parent_id=first.id
    )
    assert second.reply_message_id is not None

    found = await store.find_exchange_by_reply("telegram", "42", second.reply_message_id)
    assert found is not None
    assert found.id == second.id
    history = await store.conversation(second.id)
    assert [(e.question, e.answer) for e in history] == [
        ("这是什么菜？", "叉烧"),
        ("is it sweet?", "yes"),
    ]
    assert await store.find_exchange_by_reply("telegram", "999", second.reply_message_id) is None


async def test_answering_an_unknown_exchange_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.finish_exchange(424242, answer="x", model_version=None, latency_ms=1)


async def test_a_user_is_stored_once_and_keeps_what_a_later_update_omits(store: Store) -> None:
    created = await store.upsert_user("telegram", "31", display_name="Mei", language="zh")
    updated = await store.upsert_user("telegram", "31", display_name="Mei Ling")

    assert updated.id == created.id
    assert (updated.display_name, updated.language) == ("Mei Ling", "zh")
    assert await store.find_user("discord", "31") is None
    await store.set_user_banned(created.id, True)
    banned = await store.find_user("telegram", "31")
    assert banned is not None
    assert banned.banned


async def test_an_answer_that_arrives_after_a_failure_clears_the_error(store: Store) -> None:
    user = await add_user(store, "5")
    pending = await store.start_exchange(
        user_id=user.id, platform="telegram", chat_id="1", question="?", question_message_id="3"
    )
    await store.fail_exchange(pending.id, error="timed out")

    late = await store.finish_exchange(pending.id, answer="叉烧", model_version="m", latency_ms=9)

    assert late.status is ExchangeStatus.ANSWERED
    assert late.error is None


async def test_changing_a_correction_sends_it_back_for_review(store: Store) -> None:
    user = await add_user(store, "5")
    exchange = await answered(store, user)
    first = await store.record_correction(exchange.id, user.id, "肠粉")
    async with store.engine.begin() as connection:
        await connection.execute(
            update(Correction).where(Correction.id == first.id).values(status="accepted")
        )

    changed = await store.record_correction(exchange.id, user.id, "  虾饺  ")

    assert changed.text == "虾饺"
    assert changed.status is CorrectionStatus.NEW
    assert [c.id for c in await store.corrections(exchange.id)] == [first.id]


async def test_a_correction_prompt_is_answered_once_and_only_by_who_was_asked(
    store: Store,
) -> None:
    author, other = await add_user(store, "1"), await add_user(store, "2")
    exchange = await answered(store, author, photo=await add_photo(store))
    await store.remember_correction_prompt(exchange.id, author.id, "telegram", "chat", "77")

    asked, someone_else = author.platform_user_id, other.platform_user_id
    assert await store.take_correction_prompt("telegram", "chat", "77", someone_else) is None
    assert await store.take_correction_prompt("telegram", "other chat", "77", asked) is None
    assert await store.take_correction_prompt("discord", "chat", "77", asked) is None
    assert await store.take_correction_prompt("telegram", "chat", "77", asked) == exchange.id
    assert await store.take_correction_prompt("telegram", "chat", "77", asked) is None


async def test_unanswered_correction_prompts_are_dropped_after_a_week(store: Store) -> None:
    user = await add_user(store, "1")
    exchange = await answered(store, user, photo=await add_photo(store))
    await store.remember_correction_prompt(exchange.id, user.id, "telegram", "chat", "old")
    async with store._write() as session:
        await session.execute(
            update(CorrectionPrompt).values(created_at=utcnow() - timedelta(days=8))
        )

    await store.remember_correction_prompt(exchange.id, user.id, "telegram", "chat", "new")

    assert await store.take_correction_prompt("telegram", "chat", "old", "1") is None
    assert await store.take_correction_prompt("telegram", "chat", "new", "1") == exchange.id


async def test_a_prompt_for_an_answer_that_is_gone_is_not_found(store: Store) -> None:
    user = await add_user(store, "1")

    with pytest.raises(NotFound):
        await store.remember_correction_prompt(12345, user.id, "telegram", "chat", "1")


async def test_forgetting_a_user_drops_the_prompts_they_were_asked_and_those_about_them(
    store: Store,
) -> None:
    author, other = await add_user(store, "1"), await add_user(store, "2")
    theirs = await answered(store, author, photo=await add_photo(store))
    mine = await answered(store, other, photo=await add_photo(store, (10, 20, 30)))
    await store.remember_correction_prompt(theirs.id, other.id, "telegram", "chat", "1")
    await store.remember_correction_prompt(mine.id, author.id, "telegram", "chat", "2")
    await store.remember_correction_prompt(mine.id, other.id, "telegram", "chat", "3")

    await store.forget(author.id)

    assert await store.take_correction_prompt("telegram", "chat", "1", "2") is None
    assert await store.take_correction_prompt("telegram", "chat", "3", "2") == mine.id
    async with store._read() as session:
        assert await session.scalar(select(func.count()).select_from(CorrectionPrompt)) == 0
