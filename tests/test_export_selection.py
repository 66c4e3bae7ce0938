"""Which answers `dishbot export` trains on, and what it makes of ratings and corrections."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import update

from bot.settings import Settings, TrainingSettings
from bot.store import CorrectionStatus, PhotoRecord, Store, UserRecord
from bot.store.models import Correction
from bot.training import ExportOptions, ExportSummary, export_dataset
from bot.training.export.selection import Fate
from tests.factories import add_photo, add_user, answered, backdate, set_trust

ADMIN_ID = "900"


def settings_for(data_dir: Path, **training: Any) -> Settings:
    """Settings with one admin (telegram:900) and the given training settings."""
    return Settings(
        data_dir=data_dir, admins=[f"telegram:{ADMIN_ID}"], training=TrainingSettings(**training)
    )


async def export(
    store: Store,
    data_dir: Path,
    out_dir: Path,
    *,
    training: dict[str, Any] | None = None,
    settings: Settings | None = None,
    **options: Any,
) -> tuple[ExportSummary, list[dict[str, Any]]]:
    """Export everything into ``out_dir`` (no validation split) and read the records back."""
    options.setdefault("val_fraction", 0.0)
    settings = settings or settings_for(data_dir, **(training or {}))
    summary = await export_dataset(store, settings, out_dir, ExportOptions(**options))
    return summary, read_records(out_dir)


def read_records(out_dir: Path) -> list[dict[str, Any]]:
    """Every record of train.jsonl, then val.jsonl."""
    records = []
    for name in ("train.jsonl", "val.jsonl"):
        text = (out_dir / name).read_text(encoding="utf-8")
        records += [json.loads(line) for line in text.splitlines()]
    return records


def answers_of(records: list[dict[str, Any]]) -> list[str]:
    """The gpt turns of every record, in order."""
    return [
        turn["value"]
        for record in records
        for turn in record["conversations"]
        if turn["from"] == "gpt"
    ]


async def users(store: Store, count: int, first_id: int = 100) -> list[UserRecord]:
    """``count`` fresh ordinary users."""
    return [await add_user(store, str(first_id + n)) for n in range(count)]


async def photos(store: Store, count: int) -> list[PhotoRecord]:
    """``count`` different photos (colours far enough apart to survive JPEG)."""
    made = [
        await add_photo(store, color=(n % 16 * 16, n // 16 % 16 * 16, n // 256 * 16))
        for n in range(count)
    ]
    assert len({photo.sha256 for photo in made}) == count
    return made


# -- ratings -----------------------------------------------------------------------------


async def test_a_net_positive_answer_is_trained_on_in_the_models_own_words(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker, fan, critic = await users(store, 3)
    exchange = await answered(
        store, asker, photo=await add_photo(store), answer="肠粉，广东早茶点心。"
    )
    for user in (asker, fan):
        await store.record_rating(exchange.id, user.id, 1)
    await store.record_rating(exchange.id, critic.id, -1)

    summary, records = await export(store, data_dir, tmp_path / "out")

    assert answers_of(records) == ["肠粉，广东早茶点心。"]
    assert summary.answers == {Fate.EXPORTED: 1}
    assert (summary.votes_up, summary.votes_down) == (2, 1)


async def test_tied_unrated_and_net_negative_answers_are_not_trained_on_and_are_counted(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker, other = await users(store, 2)
    tied, unrated, negative = [
        await answered(store, asker, photo=photo, answer=f"answer {n}")
        for n, photo in enumerate(await photos(store, 3))
    ]
    await store.record_rating(tied.id, asker.id, 1)
    await store.record_rating(tied.id, other.id, -1)
    await store.record_rating(negative.id, asker.id, -1)
    del unrated

    summary, records = await export(store, data_dir, tmp_path / "out")

    assert records == []
    assert summary.answers == {Fate.TOO_FEW_VOTES: 1, Fate.UNRATED: 1, Fate.NET_NEGATIVE: 1}
    assert summary.excluded() == {Fate.NET_NEGATIVE: 1}
    assert summary.held_back() == {Fate.TOO_FEW_VOTES: 1, Fate.UNRATED: 1}
    assert summary.rating_distribution == {
        "net positive": 0,
        "tied": 1,
        "net negative": 1,
        "no votes": 1,
    }


async def test_min_votes_asks_for_a_wider_margin_of_thumbs_up(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    raters = await users(store, 3)
    one_up, two_up = [
        await answered(store, raters[0], photo=photo, answer=f"{n} up")
        for n, photo in zip((1, 2), await photos(store, 2), strict=True)
    ]
    await store.record_rating(one_up.id, raters[0].id, 1)
    for rater in raters[:2]:
        await store.record_rating(two_up.id, rater.id, 1)

    summary, records = await export(store, data_dir, tmp_path / "out", min_votes=2)

    assert answers_of(records) == ["2 up"]
    assert summary.answers[Fate.TOO_FEW_VOTES] == 1


async def test_banned_users_votes_and_questions_are_ignored(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker, critic, troll_a, troll_b = await users(store, 4)
    first, second = await photos(store, 2)
    bad_answer = await answered(store, asker, photo=first, answer="the wrong dish")
    await store.record_rating(bad_answer.id, critic.id, -1)
    for troll in (troll_a, troll_b):
        await store.record_rating(bad_answer.id, troll.id, 1)
        await store.set_user_banned(troll.id, True)
    trolls_question = await answered(store, troll_a, photo=second, answer="praised answer")
    await store.record_rating(trolls_question.id, critic.id, 1)

    summary, records = await export(store, data_dir, tmp_path / "out")

    assert records == []
    assert summary.answers == {Fate.NET_NEGATIVE: 1, Fate.BANNED_ASKER: 1}
    assert summary.ignored_ratings == 2


async def test_a_banned_users_correction_does_not_count_towards_agreement(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker, troll = await users(store, 2)
    exchange = await answered(store, asker, photo=await add_photo(store), answer="叉烧")
    for user in (asker, troll):
        await store.record_correction(exchange.id, user.id, "Dragon Pizza")
    await store.set_user_banned(troll.id, True)

    summary, records = await export(store, data_dir, tmp_path / "out")

    assert records == []
    assert summary.answers == {Fate.CORRECTION_NOT_ACCEPTED: 1}
    assert summary.ignored_corrections == 1


async def test_feedback_from_a_user_of_negative_trust_is_ignored(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker, distrusted = await users(store, 2)
    exchange = await answered(store, asker, photo=await add_photo(store))
    await store.record_rating(exchange.id, distrusted.id, 1)
    await set_trust(store, distrusted, -1)

    summary, records = await export(store, data_dir, tmp_path / "out")

    assert records == []
    assert summary.answers == {Fate.UNRATED: 1}
    assert summary.ignored_ratings == 1


# -- corrections -------------------------------------------------------------------------


async def test_an_admins_correction_is_accepted_and_becomes_the_target(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = (await users(store, 1))[0]
    admin = await add_user(store, ADMIN_ID)
    exchange = await answered(store, asker, photo=await add_photo(store), answer="叉烧")
    await store.record_rating(exchange.id, asker.id, -1)
    await store.record_correction(exchange.id, admin.id, "肠粉")

    summary, records = await export(store, data_dir, tmp_path / "out")

    assert answers_of(records) == ["这是肠粉。"]
    assert summary.answers == {Fate.EXPORTED: 1}


async def test_when_admins_correct_differently_the_latest_word_stands(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = (await users(store, 1))[0]
    first_admin, second_admin = await add_user(store, "900"), await add_user(store, "901")
    exchange = await answered(store, asker, photo=await add_photo(store), answer="叉烧")
    await store.record_correction(exchange.id, first_admin.id, "烧鹅")
    await store.record_correction(exchange.id, second_admin.id, "肠粉")
    two_admins = Settings(data_dir=data_dir, admins=["telegram:900", "telegram:901"])

    _, records = await export(store, data_dir, tmp_path / "out", settings=two_admins)

    assert answers_of(records) == ["这是肠粉。"]


async def test_one_ordinary_users_correction_is_held_back(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = (await users(store, 1))[0]
    exchange = await answered(store, asker, photo=await add_photo(store), answer="叉烧")
    await store.record_correction(exchange.id, asker.id, "肠粉")

    summary, records = await export(store, data_dir, tmp_path / "out")

    assert records == []
    assert summary.answers == {Fate.CORRECTION_NOT_ACCEPTED: 1}


async def test_k_users_giving_the_same_correction_after_normalisation_get_it_accepted(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    first, second = await users(store, 2)
    exchange = await answered(
        store, first, photo=await add_photo(store), question="What dish is this?", answer="char siu"
    )
    # Different case, width, punctuation and spacing: the same correction.
    await store.record_correction(exchange.id, first.id, "Cheung  fun!")
    await store.record_correction(exchange.id, second.id, "ＣＨＥＵＮＧ　ＦＵＮ。")

    _, records = await export(store, data_dir, tmp_path / "agreed")
    summary, stricter = await export(
        store, data_dir, tmp_path / "stricter", training={"agreeing_corrections": 3}
    )

    assert answers_of(records) == ["This is Cheung  fun."]
    assert stricter == []
    assert summary.answers == {Fate.CORRECTION_NOT_ACCEPTED: 1}


async def test_a_trusted_users_correction_is_accepted_alone(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker, expert = await users(store, 2)
    await set_trust(store, expert, 1)
    exchange = await answered(store, asker, photo=await add_photo(store), answer="叉烧")
    await store.record_correction(exchange.id, expert.id, "是肠粉，不是叉烧")

    _, records = await export(store, data_dir, tmp_path / "out")

    assert answers_of(records) == ["这是肠粉。"]


async def test_a_reviewed_correction_counts_and_a_rejected_one_does_not(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker, first, second = await users(store, 3)
    reviewed_photo, rejected_photo = await photos(store, 2)
    reviewed = await answered(store, asker, photo=reviewed_photo, answer="叉烧")
    await store.record_correction(reviewed.id, first.id, "烧鹅")
    rejected = await answered(store, asker, photo=rejected_photo, answer="叉烧")
    for user in (first, second):  # two users agree, but an admin rejected one of them
        await store.record_correction(rejected.id, user.id, "made-up dish")
    async with store.engine.begin() as connection:
        await connection.execute(
            update(Correction)
            .where(Correction.exchange_id == reviewed.id)
            .values(status=CorrectionStatus.ACCEPTED)
        )
        await connection.execute(
            update(Correction)
            .where(Correction.exchange_id == rejected.id, Correction.user_id == first.id)
            .values(status=CorrectionStatus.REJECTED)
        )

    summary, records = await export(store, data_dir, tmp_path / "out")

    assert answers_of(records) == ["这是烧鹅。"]
    assert summary.answers[Fate.CORRECTION_NOT_ACCEPTED] == 1


async def test_two_agreed_corrections_saying_different_things_hold_the_answer_back(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    a, b, c, d = await users(store, 4)
    exchange = await answered(store, a, photo=await add_photo(store), answer="叉烧")
    for user, text in ((a, "肠粉"), (b, "肠粉"), (c, "烧鹅"), (d, "烧鹅")):
        await store.record_correction(exchange.id, user.id, text)

    summary, records = await export(store, data_dir, tmp_path / "out")

    assert records == []
    assert summary.answers == {Fate.CORRECTIONS_DISAGREE: 1}


async def test_a_bare_name_becomes_a_short_answer_and_a_sentence_is_kept_as_written(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = (await users(store, 1))[0]
    admin = await add_user(store, ADMIN_ID)
    cases = [
        ("这是什么菜？", "肠粉", "这是肠粉。"),
        ("What dish is this?", "cheung fun", "This is cheung fun."),
        ("这个叫什么？", "that is 肠粉, not 叉烧", "这是肠粉。"),
        ("What is this?", "not char siu but roast goose", "This is roast goose."),
        (
            "这是什么？",
            "这是肠粉，用米浆蒸成，淋上甜酱油。",
            "这是肠粉，用米浆蒸成，淋上甜酱油。",
        ),
        ("Is it spicy?", "no", "no"),
    ]
    for (question, correction, _), photo in zip(
        cases, await photos(store, len(cases)), strict=True
    ):
        exchange = await answered(store, asker, photo=photo, question=question, answer="?")
        await store.record_correction(exchange.id, admin.id, correction)

    _, records = await export(store, data_dir, tmp_path / "out")

    by_question = {r["conversations"][0]["value"]: r["conversations"][1]["value"] for r in records}
    for question, correction, expected in cases:
        assert by_question[f"<image>\n{question}"] == expected, correction


# -- poisoning ---------------------------------------------------------------------------


async def test_five_fresh_accounts_agreeing_on_a_wrong_correction_lose_to_the_admins(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = (await users(store, 1))[0]
    sock_puppets = await users(store, 5, first_id=500)
    admin = await add_user(store, ADMIN_ID)
    exchange = await answered(store, asker, photo=await add_photo(store), answer="叉烧")
    for puppet in sock_puppets:
        await store.record_correction(exchange.id, puppet.id, "Dragon Pizza")
        await store.record_rating(exchange.id, puppet.id, -1)
    await store.record_correction(exchange.id, admin.id, "肠粉")

    _, records = await export(store, data_dir, tmp_path / "out")

    assert answers_of(records) == ["这是肠粉。"]
    assert "Dragon Pizza" not in (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8")


async def test_one_account_spamming_a_made_up_correction_gets_none_of_it_exported(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    askers = await users(store, 4)
    spammer = await add_user(store, "666")
    for n, photo in enumerate(await photos(store, 20)):
        exchange = await answered(store, askers[n % 4], photo=photo, answer=f"answer {n}")
        await store.record_correction(exchange.id, spammer.id, "Dragon Pizza, the best dish")
        await store.record_rating(exchange.id, spammer.id, -1)
        if n % 2:  # half the answers were liked by their askers
            await store.record_rating(exchange.id, askers[n % 4].id, 1)

    summary, records = await export(store, data_dir, tmp_path / "out")

    assert all("Dragon" not in answer for answer in answers_of(records))
    assert summary.answers[Fate.CORRECTION_NOT_ACCEPTED] == 20


async def test_a_trusted_account_spamming_corrections_contributes_at_most_n_samples(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    askers = await users(store, 10)
    spammer = await add_user(store, "666")
    await set_trust(store, spammer, 1)
    for asker, photo in zip(askers, await photos(store, 10), strict=True):
        exchange = await answered(store, asker, photo=photo, answer="叉烧")
        await store.record_correction(exchange.id, spammer.id, "Dragon Pizza")

    summary, records = await export(
        store, data_dir, tmp_path / "out", training={"max_samples_per_user": 3}
    )

    assert answers_of(records) == ["这是Dragon Pizza。"] * 3
    assert summary.answers[Fate.USER_CAP] == 7
    assert summary.samples_left_out == {Fate.USER_CAP: 7}


async def test_one_user_contributes_at_most_n_samples_but_admins_are_not_capped(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    prolific, casual = await users(store, 2)
    admin = await add_user(store, ADMIN_ID)
    all_photos = await photos(store, 12)
    for asker, some_photos in ((prolific, all_photos[:5]), (casual, all_photos[5:7])):
        for photo in some_photos:
            exchange = await answered(store, asker, photo=photo, answer=f"by {asker.id}")
            await store.record_rating(exchange.id, asker.id, 1)
    for photo in all_photos[7:]:
        exchange = await answered(store, admin, photo=photo, answer="by the admin")
        await store.record_rating(exchange.id, admin.id, 1)

    summary, records = await export(
        store, data_dir, tmp_path / "out", training={"max_samples_per_user": 2}
    )

    answers = answers_of(records)
    assert answers.count(f"by {prolific.id}") == 2
    assert answers.count(f"by {casual.id}") == 2
    assert answers.count("by the admin") == 5
    assert summary.answers[Fate.USER_CAP] == 3


# -- duplicates and conversations --------------------------------------------------------


async def test_the_same_photo_and_question_collapse_to_one_sample_the_better_vouched_for(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    first, second, third = await users(store, 3)
    admin = await add_user(store, ADMIN_ID)
    photo = await add_photo(store)
    liked = await answered(store, first, photo=photo, question="这是什么菜？", answer="叉烧")
    await store.record_rating(liked.id, first.id, 1)
    corrected = await answered(store, second, photo=photo, question="这是什么菜?", answer="叉烧")
    await store.record_correction(corrected.id, admin.id, "肠粉")
    other_question = await answered(store, third, photo=photo, question="辣吗？", answer="不辣")
    await store.record_rating(other_question.id, third.id, 1)

    summary, records = await export(store, data_dir, tmp_path / "out")

    assert sorted(answers_of(records)) == ["不辣", "这是肠粉。"]
    assert summary.answers == {Fate.EXPORTED: 2, Fate.DUPLICATE: 1}
    assert summary.samples_left_out == {Fate.DUPLICATE: 1}


async def test_a_conversation_on_one_photo_becomes_one_multi_turn_sample(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = (await users(store, 1))[0]
    photo = await add_photo(store)
    first = await answered(store, asker, photo=photo, question="这是什么菜？", answer="肠粉")
    second = await answered(
        store, asker, photo=photo, question="辣吗？", answer="不辣", parent_id=first.id
    )
    third = await answered(
        store, asker, photo=photo, question="怎么做？", answer="米浆蒸成。", parent_id=second.id
    )
    for exchange in (first, second, third):
        await store.record_rating(exchange.id, asker.id, 1)

    summary, records = await export(store, data_dir, tmp_path / "out")

    assert len(records) == 1
    assert [(t["from"], t["value"]) for t in records[0]["conversations"]] == [
        ("human", "<image>\n这是什么菜？"),
        ("gpt", "肠粉"),
        ("human", "辣吗？"),
        ("gpt", "不辣"),
        ("human", "怎么做？"),
        ("gpt", "米浆蒸成。"),
    ]
    assert summary.answers == {Fate.EXPORTED: 3}


async def test_a_conversation_stops_before_a_turn_that_does_not_qualify(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = (await users(store, 1))[0]
    photo = await add_photo(store)
    first = await answered(store, asker, photo=photo, question="这是什么菜？", answer="肠粉")
    wrong = await answered(
        store, asker, photo=photo, question="辣吗？", answer="很辣", parent_id=first.id
    )
    after = await answered(
        store, asker, photo=photo, question="为什么？", answer="因为辣椒", parent_id=wrong.id
    )
    await store.record_rating(first.id, asker.id, 1)
    await store.record_rating(wrong.id, asker.id, -1)
    await store.record_rating(after.id, asker.id, 1)

    summary, records = await export(store, data_dir, tmp_path / "out")

    assert [len(r["conversations"]) for r in records] == [2]
    assert answers_of(records) == ["肠粉"]
    assert summary.answers == {
        Fate.EXPORTED: 1,
        Fate.NET_NEGATIVE: 1,
        Fate.AFTER_UNQUALIFIED_TURN: 1,
    }


async def test_include_unrated_lets_an_unrated_turn_stand_as_context_never_alone(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = (await users(store, 1))[0]
    photo = await add_photo(store)
    unrated = await answered(store, asker, photo=photo, question="这是什么菜？", answer="肠粉")
    liked = await answered(
        store, asker, photo=photo, question="辣吗？", answer="不辣", parent_id=unrated.id
    )
    await answered(store, asker, photo=photo, question="贵吗？", answer="不贵", parent_id=liked.id)
    await store.record_rating(liked.id, asker.id, 1)

    strict, none = await export(store, data_dir, tmp_path / "strict")
    lenient, records = await export(store, data_dir, tmp_path / "lenient", include_unrated=True)

    assert none == []
    assert strict.answers == {Fate.UNRATED: 2, Fate.AFTER_UNQUALIFIED_TURN: 1}
    assert answers_of(records) == ["肠粉", "不辣"]  # the unrated last turn is not trained on
    assert lenient.answers == {Fate.EXPORTED: 2, Fate.UNRATED: 1}


async def test_a_follow_up_stored_without_its_photo_still_joins_the_conversation(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = (await users(store, 1))[0]
    first = await answered(store, asker, photo=await add_photo(store), answer="肠粉")
    follow_up = await answered(store, asker, question="辣吗？", answer="不辣", parent_id=first.id)
    for exchange in (first, follow_up):
        await store.record_rating(exchange.id, asker.id, 1)

    _, records = await export(store, data_dir, tmp_path / "out")

    assert [answers_of([r]) for r in records] == [["肠粉", "不辣"]]


async def test_follow_ups_that_branch_become_one_sample_per_branch(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker, friend = await users(store, 2)
    photo = await add_photo(store)
    first = await answered(store, asker, photo=photo, question="这是什么菜？", answer="肠粉")
    spicy = await answered(
        store, asker, photo=photo, question="辣吗？", answer="不辣", parent_id=first.id
    )
    price = await answered(
        store, friend, photo=photo, question="贵吗？", answer="不贵", parent_id=first.id
    )
    for exchange in (first, spicy, price):
        await store.record_rating(exchange.id, friend.id, 1)

    summary, records = await export(store, data_dir, tmp_path / "out")

    assert sorted(tuple(answers_of([r])) for r in records) == [("肠粉", "不贵"), ("肠粉", "不辣")]
    assert summary.answers == {Fate.EXPORTED: 3}


async def test_since_and_until_pick_conversations_by_their_first_question(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = (await users(store, 1))[0]
    march, april, may = await photos(store, 3)
    old = await answered(store, asker, photo=march, answer="march")
    in_range = await answered(store, asker, photo=april, answer="april")
    follow_up = await answered(store, asker, photo=april, answer="april too", parent_id=in_range.id)
    late = await answered(store, asker, photo=may, answer="may")
    for exchange, when in (
        (old, datetime(2025, 3, 31, 23, 59, tzinfo=UTC)),
        (in_range, datetime(2025, 4, 30, 23, 0, tzinfo=UTC)),
        (follow_up, datetime(2025, 5, 1, 1, 0, tzinfo=UTC)),  # later, but same conversation
        (late, datetime(2025, 5, 1, tzinfo=UTC)),
    ):
        await backdate(store, exchange, when)
        await store.record_rating(exchange.id, asker.id, 1)

    summary, records = await export(
        store,
        data_dir,
        tmp_path / "out",
        since=datetime(2025, 4, 1, tzinfo=UTC),
        until=datetime(2025, 5, 1, tzinfo=UTC),
    )

    assert answers_of(records) == ["april", "april too"]
    assert summary.answers_considered == 2


async def test_a_missing_photo_file_is_reported_and_everything_else_exported(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = (await users(store, 1))[0]
    kept, lost = await photos(store, 2)
    for photo in (kept, lost):
        exchange = await answered(store, asker, photo=photo, answer=f"on {photo.sha256[:6]}")
        await store.record_rating(exchange.id, asker.id, 1)
    (data_dir / lost.path).unlink()

    summary, records = await export(store, data_dir, tmp_path / "out")

    assert answers_of(records) == [f"on {kept.sha256[:6]}"]
    assert summary.missing_photos == 1
    assert summary.missing_photo_examples == (lost.sha256,)
    assert summary.answers == {Fate.EXPORTED: 1, Fate.PHOTO_MISSING: 1}
    assert any("missing" in line for line in summary.lines())
    assert not (tmp_path / "out" / "images" / f"{lost.sha256}.jpg").exists()
