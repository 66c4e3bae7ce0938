"""Who owns a pending question, and which pending questions nothing can still answer."""

from __future__ import annotations

import asyncio
import subprocess
from datetime import timedelta
from pathlib import Path

from sqlalchemy import update

from bot.store import ExchangeOwner, ExchangeRecord, ExchangeStatus, Store
from bot.store.models import Exchange, utcnow
from tests.factories import add_photo, add_user

STALE_AFTER = timedelta(minutes=3)


def dead_pid() -> int:
    """The pid of a process that has ended (and, just now, not been reused)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def live_pid() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "30"])


async def ask(store: Store, owner: ExchangeOwner | None = None, message: str = "1") -> int:
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
    return exchange.id


async def owned_since(store: Store, exchange_id: int, ago: timedelta) -> None:
    async with store.engine.begin() as connection:
        await connection.execute(
            update(Exchange).where(Exchange.id == exchange_id).values(owned_since=utcnow() - ago)
        )


async def orphan_ids(store: Store, busy: set[int] | None = None) -> list[int]:
    orphans = await store.orphaned_exchanges(stale_after=STALE_AFTER, busy=busy or set())
    return [exchange.id for exchange in orphans]


async def test_a_question_records_the_process_that_answers_it(store: Store) -> None:
    exchange_id = await ask(store)

    exchange = await store.get_exchange(exchange_id)

    assert exchange is not None
    assert (exchange.host, exchange.pid, exchange.owner_token) == (
        store.owner.host,
        store.owner.pid,
        store.owner.token,
    )
    assert exchange.owned_since is not None


async def test_questions_of_a_dead_or_restarted_process_are_orphaned_not_a_live_ones(
    store: Store,
) -> None:
    host = store.owner.host
    sleeper = live_pid()
    try:
        dead = await ask(store, ExchangeOwner(host, dead_pid(), "dead"), "1")
        # A restarted container: pid 1 again, but another run of the bot.
        restarted = await ask(store, ExchangeOwner(host, store.owner.pid, "before"), "2")
        alive = await ask(store, ExchangeOwner(host, sleeper.pid, "alive"), "3")
        mine = await ask(store, None, "4")
        elsewhere = await ask(store, ExchangeOwner("gpu-2", 4242, "far"), "5")
        elsewhere_quiet = await ask(store, ExchangeOwner("gpu-3", 4242, "quiet"), "6")
        await owned_since(store, elsewhere_quiet, STALE_AFTER + timedelta(seconds=1))

        orphans = await orphan_ids(store)
    finally:
        sleeper.kill()
        sleeper.wait()

    assert orphans == [dead, restarted, elsewhere_quiet]
    assert {alive, mine, elsewhere}.isdisjoint(orphans)


async def test_this_processs_own_stuck_question_is_orphaned_unless_it_is_still_busy(
    store: Store,
) -> None:
    stuck = await ask(store, None, "1")
    await owned_since(store, stuck, STALE_AFTER * 2)

    assert await orphan_ids(store, busy={stuck}) == []
    assert await orphan_ids(store) == [stuck]


async def test_answered_and_failed_questions_are_never_orphans(store: Store) -> None:
    gone = ExchangeOwner(store.owner.host, dead_pid(), "dead")
    answered = await ask(store, gone, "1")
    failed = await ask(store, gone, "2")
    await store.finish_exchange(answered, answer="char siu", model_version="m", latency_ms=1)
    await store.fail_exchange(failed, error="timed out")

    assert await orphan_ids(store) == []


async def test_a_claimed_question_belongs_to_its_claimer_and_is_not_orphaned_again(
    store: Store,
) -> None:
    exchange_id = await ask(store, ExchangeOwner("gpu-2", 4242, "far"), "1")
    await owned_since(store, exchange_id, STALE_AFTER * 2)
    [orphan] = await store.orphaned_exchanges(stale_after=STALE_AFTER)

    claimed = await store.claim_exchange(orphan)

    assert claimed is not None
    assert claimed.status is ExchangeStatus.PENDING
    assert (claimed.host, claimed.pid, claimed.owner_token) == (
        store.owner.host,
        store.owner.pid,
        store.owner.token,
    )
    assert await orphan_ids(store) == []
    assert await store.claim_exchange(orphan) is None  # listed before it was claimed


async def test_two_processes_starting_together_claim_each_question_once(
    database_url: str, data_dir: Path, store: Store
) -> None:
    gone = ExchangeOwner(store.owner.host, dead_pid(), "dead")
    asked = [await ask(store, gone, str(message)) for message in range(1, 7)]
    other = Store.open(database_url, data_dir)
    try:
        seen_by_one = await store.orphaned_exchanges(stale_after=STALE_AFTER)
        seen_by_other = await other.orphaned_exchanges(stale_after=STALE_AFTER)

        async def claim_all(claimer: Store, orphans: list[ExchangeRecord]) -> list[int]:
            claimed = [await claimer.claim_exchange(orphan) for orphan in orphans]
            return [exchange.id for exchange in claimed if exchange is not None]

        by_one, by_other = await asyncio.gather(
            claim_all(store, seen_by_one), claim_all(other, seen_by_other)
        )
    finally:
        await other.close()

    assert sorted(by_one + by_other) == asked
    tokens = {store.owner.token: by_one, other.owner.token: by_other}
    for exchange_id in asked:
        exchange = await store.get_exchange(exchange_id)
        assert exchange is not None
        assert exchange_id in tokens[exchange.owner_token or ""]
