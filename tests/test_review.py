"""Reviewing corrections: what waits for an admin, and how their verdict overrides the rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.errors import NotFound
from bot.store import CorrectionStatus, Store
from bot.training.export.selection import Fate
from tests.factories import add_photo, answered
from tests.test_export_selection import answers_of, export, users


async def test_answers_with_new_corrections_wait_for_review_with_every_correction(
    store: Store,
) -> None:
    asker, first, second = await users(store, 3)
    photo = await add_photo(store)
    corrected = await answered(store, asker, photo=photo, answer="叉烧")
    follow_up = await answered(
        store, asker, question="辣吗？", answer="不辣", parent_id=corrected.id
    )
    untouched = await answered(store, asker, photo=await add_photo(store, (10, 200, 10)))
    await store.record_correction(corrected.id, first.id, "肠粉")
    await store.record_correction(corrected.id, second.id, "cheung fun")
    await store.record_correction(follow_up.id, first.id, "有点辣")

    waiting = await store.corrections_to_review()

    assert [item.exchange.id for item in waiting] == [follow_up.id, corrected.id]
    assert untouched.id not in [item.exchange.id for item in waiting]
    assert [item.photo_sha256 for item in waiting] == [photo.sha256, photo.sha256]
    both = waiting[1].corrections
    assert [(c.text, c.author.id, c.status) for c in both] == [
        ("肠粉", first.id, CorrectionStatus.NEW),
        ("cheung fun", second.id, CorrectionStatus.NEW),
    ]
    assert both[0].author.display_name == f"user {first.platform_user_id}"


async def test_accepting_one_correction_rejects_the_others_and_ends_the_review(
    store: Store,
) -> None:
    asker, first, second = await users(store, 3)
    exchange = await answered(store, asker, photo=await add_photo(store), answer="叉烧")
    chosen = await store.record_correction(exchange.id, first.id, "肠粉 ")
    await store.record_correction(exchange.id, second.id, "烧鹅")

    accepted = await store.accept_correction(chosen.id, "  布拉肠粉 ")

    assert (accepted.status, accepted.text) == (CorrectionStatus.ACCEPTED, "布拉肠粉")
    statuses = {c.user_id: c.status for c in await store.corrections(exchange.id)}
    assert statuses == {first.id: CorrectionStatus.ACCEPTED, second.id: CorrectionStatus.REJECTED}
    assert await store.corrections_to_review() == []


async def test_rejecting_an_answers_corrections_ends_its_review(store: Store) -> None:
    asker, first = await users(store, 2)
    exchange = await answered(store, asker, photo=await add_photo(store))
    await store.record_correction(exchange.id, first.id, "made up")

    assert await store.reject_corrections(exchange.id) == 1

    assert [c.status for c in await store.corrections(exchange.id)] == [CorrectionStatus.REJECTED]
    assert await store.corrections_to_review() == []


async def test_accepting_a_correction_that_does_not_exist_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.accept_correction(12345)


async def test_trust_can_be_given_and_taken_away(store: Store) -> None:
    (user,) = await users(store, 1)

    await store.set_user_trust(user.id, 1)
    trusted = await store.get_user(user.id)
    await store.set_user_trust(user.id, 0)
    ordinary = await store.get_user(user.id)

    assert trusted is not None
    assert trusted.trust == 1
    assert ordinary is not None
    assert ordinary.trust == 0
    with pytest.raises(NotFound):
        await store.set_user_trust(999_999, 1)


# -- the verdict overrides the automatic rules of selection ------------------------------


async def test_one_users_correction_accepted_in_review_is_trained_on(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker, first = await users(store, 2)
    exchange = await answered(store, asker, photo=await add_photo(store), answer="叉烧")
    correction = await store.record_correction(exchange.id, first.id, "肠粉")
    before, _ = await export(store, data_dir, tmp_path / "before")

    await store.accept_correction(correction.id)
    _, records = await export(store, data_dir, tmp_path / "after")

    assert before.answers == {Fate.CORRECTION_NOT_ACCEPTED: 1}
    assert answers_of(records) == ["这是肠粉。"]


async def test_a_fixed_and_accepted_correction_is_trained_on_as_fixed(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker, first, second = await users(store, 3)
    exchange = await answered(store, asker, photo=await add_photo(store), answer="叉烧")
    typo = await store.record_correction(exchange.id, first.id, "长粉")
    await store.record_correction(exchange.id, second.id, "烧鹅")  # a dispute, until reviewed

    await store.accept_correction(typo.id, "肠粉")
    _, records = await export(store, data_dir, tmp_path / "out")

    assert answers_of(records) == ["这是肠粉。"]


async def test_corrections_many_users_agreed_on_stay_out_once_rejected(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker, *agreeing = await users(store, 4)
    exchange = await answered(store, asker, photo=await add_photo(store), answer="叉烧")
    for user in agreeing:
        await store.record_correction(exchange.id, user.id, "made-up dish")
    _, before = await export(store, data_dir, tmp_path / "before")

    await store.reject_corrections(exchange.id)
    summary, after = await export(store, data_dir, tmp_path / "after")

    assert answers_of(before) == ["这是made-up dish。"]
    assert after == []
    assert summary.answers == {Fate.UNRATED: 1}
