"""The figures the admin console's overview charts: questions per day and ratings per version."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from sqlalchemy import update

from bot.store import DayStats, Store, VersionRatings
from bot.store.models import Exchange
from tests.factories import add_user, answered, backdate

DAY_ONE = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)


async def test_questions_per_day_with_how_they_ended_and_the_latency_percentiles(
    store: Store,
) -> None:
    asker = await add_user(store, "1")
    for n, latency_ms in enumerate([100, 200, 300, 400, 1000]):
        exchange = await answered(store, asker, chat_id=str(n))
        await _set_latency(store, exchange.id, latency_ms)
        await backdate(store, exchange, DAY_ONE + timedelta(minutes=n))
    pending = await store.start_exchange(
        user_id=asker.id, platform="telegram", chat_id="9", question="?", question_message_id="p"
    )
    failed = await store.fail_exchange(pending.id, error="backend down", latency_ms=99_999)
    await backdate(store, failed, DAY_ONE + timedelta(days=1))
    too_old = await answered(store, asker, chat_id="old")
    await backdate(store, too_old, DAY_ONE - timedelta(days=40))

    days = await store.question_days(DAY_ONE - timedelta(days=1))

    assert days == [
        DayStats(date(2026, 11, 2), 5, 5, 0, latency_p50_ms=300, latency_p95_ms=1000),
        DayStats(date(2026, 11, 3), 1, 0, 1, latency_p50_ms=None, latency_p95_ms=None),
    ]


async def test_thumbs_up_rate_per_model_version(store: Store) -> None:
    asker, first, second = [await add_user(store, str(n)) for n in range(3)]
    old = await answered(store, asker, chat_id="a")
    new = await answered(store, asker, chat_id="b")
    await _set_version(store, old.id, "base")
    await _set_version(store, new.id, "run-1")
    await store.record_rating(old.id, first.id, -1)
    await store.record_rating(old.id, second.id, 1)
    await store.record_rating(new.id, first.id, 1)

    ratings = await store.ratings_by_model_version()

    assert ratings == [VersionRatings("base", 1, 1), VersionRatings("run-1", 1, 0)]
    assert [r.up_rate for r in ratings] == [0.5, 1.0]


async def _set_latency(store: Store, exchange_id: int, latency_ms: int) -> None:
    async with store.engine.begin() as connection:
        await connection.execute(
            update(Exchange).where(Exchange.id == exchange_id).values(latency_ms=latency_ms)
        )


async def _set_version(store: Store, exchange_id: int, name: str) -> None:
    async with store.engine.begin() as connection:
        await connection.execute(
            update(Exchange).where(Exchange.id == exchange_id).values(model_version=name)
        )
