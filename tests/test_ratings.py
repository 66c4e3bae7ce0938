"""👍/👎: one rating per user per answer, changeable, safe under concurrent and retried writes."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from bot.errors import NotFound
from bot.store import Store
from bot.store.models import Rating, utcnow
from tests.factories import add_photo, add_user, answered


async def test_200_concurrent_rating_writes_leave_one_row_per_user_with_their_last_press(
    store: Store,
) -> None:
    author = await add_user(store, "1")
    exchange = await answered(store, author, photo=await add_photo(store))
    raters = [await add_user(store, str(100 + i)) for i in range(20)]

    # Each of the 20 users presses 10 times; the writes run all at once, in random order.
    start = utcnow()
    presses = []
    last_value = {}
    for user in raters:
        for n in range(10):
            value = random.choice((1, -1))
            presses.append((user.id, value, start + timedelta(milliseconds=n)))
            last_value[user.id] = value
    random.shuffle(presses)

    await asyncio.gather(
        *(
            store.record_rating(exchange.id, user_id, value, rated_at=at)
            for user_id, value, at in presses
        )
    )

    ratings = await store.ratings(exchange.id)
    assert len(ratings) == 20
    assert {r.user_id: r.value for r in ratings} == last_value


async def test_a_user_can_change_their_rating(store: Store) -> None:
    user = await add_user(store, "7")
    exchange = await answered(store, user)

    await store.record_rating(exchange.id, user.id, 1)
    changed = await store.record_rating(exchange.id, user.id, -1)

    assert changed.value == -1
    assert [(r.user_id, r.value) for r in await store.ratings(exchange.id)] == [(user.id, -1)]


async def test_a_late_retry_of_an_older_press_does_not_undo_a_newer_one(store: Store) -> None:
    user = await add_user(store, "7")
    exchange = await answered(store, user)
    first_press = utcnow()

    await store.record_rating(exchange.id, user.id, -1, rated_at=first_press + timedelta(seconds=2))
    stored = await store.record_rating(exchange.id, user.id, 1, rated_at=first_press)

    assert stored.value == -1


async def test_the_same_press_written_twice_leaves_one_row(store: Store) -> None:
    user = await add_user(store, "7")
    exchange = await answered(store, user)
    pressed = utcnow()

    await store.record_rating(exchange.id, user.id, 1, rated_at=pressed)
    await store.record_rating(exchange.id, user.id, 1, rated_at=pressed)

    async with store.engine.connect() as connection:
        assert await connection.scalar(select(func.count()).select_from(Rating)) == 1


async def test_a_rating_is_up_or_down_and_nothing_else(store: Store) -> None:
    user = await add_user(store, "7")
    exchange = await answered(store, user)

    with pytest.raises(ValueError, match="-1"):
        await store.record_rating(exchange.id, user.id, 5)
    # The database itself refuses it too, whoever writes.
    async with store.engine.begin() as connection:
        with pytest.raises(IntegrityError):
            await connection.execute(
                Rating.__table__.insert().values(
                    exchange_id=exchange.id,
                    user_id=user.id,
                    value=0,
                    created_at=utcnow(),
                    rated_at=utcnow(),
                )
            )


async def test_rating_an_answer_that_does_not_exist_is_not_found(store: Store) -> None:
    user = await add_user(store, "7")

    with pytest.raises(NotFound):
        await store.record_rating(999_999, user.id, 1)
