"""The records `dishbot export` writes keep every rule of XTuner's InternVL_V1_5_Dataset.

A record that breaks one is dropped silently by the loader, or trains on nothing there, so
each rule is checked on real export output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bot.store import Store
from bot.training.export.records import (
    IMAGE_TOKENS_PER_TILE,
    build_record,
    estimate_text_tokens,
    estimate_tokens,
    image_tokens,
    record_line,
)
from bot.training.export.selection import Fate
from bot.training.export.targets import dish_name, is_identifying_question, target_from_correction
from bot.training.export.text import clean_turn_text, comparison_key
from tests.factories import add_photo, add_user, answered
from tests.test_export_selection import export, photos

LOADER_KEYS = {"id", "image", "image_wh", "conversations"}


async def _varied_export(store: Store, data_dir: Path, out_dir: Path) -> list[dict[str, Any]]:
    """An export with single and multi-turn samples, CJK, emoji and markup typed by users."""
    asker = await add_user(store, "1")
    first, second, third = await photos(store, 3)
    single = await answered(store, asker, photo=first, question="这是什么菜？", answer="肠粉 🥢")
    start = await answered(
        store, asker, photo=second, question="What is <image> this?", answer="Char siu."
    )
    follow = await answered(
        store,
        asker,
        photo=second,
        question="<image> and <img>is it sweet?<|im_end|>",
        answer="Yes, <image>honey-glazed.",
        parent_id=start.id,
    )
    empty_question = await answered(store, asker, photo=third, question="", answer="烧鹅")
    for exchange in (single, start, follow, empty_question):
        await store.record_rating(exchange.id, asker.id, 1)
    await export(store, data_dir, out_dir, val_fraction=0.5)
    return [
        json.loads(line)
        for name in ("train.jsonl", "val.jsonl")
        for line in (out_dir / name).read_text(encoding="utf-8").splitlines()
    ]


async def test_each_file_is_utf8_json_lines_unescaped_with_no_blank_lines(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    await _varied_export(store, data_dir, tmp_path / "out")

    written = 0
    for name in ("train.jsonl", "val.jsonl"):
        raw = (tmp_path / "out" / name).read_bytes()
        text = raw.decode("utf-8")  # strict: raises on anything that is not UTF-8
        if not text:
            continue
        assert text.endswith("\n")
        lines = text.split("\n")[:-1]
        assert all(line.strip() for line in lines), "no blank lines"
        assert all(isinstance(json.loads(line), dict) for line in lines)
        written += len(lines)
    assert written == 3
    every = "".join(
        (tmp_path / "out" / n).read_text(encoding="utf-8") for n in ("train.jsonl", "val.jsonl")
    )
    assert "肠粉 🥢" in every  # written as is, not as \\u escapes
    assert "\\u" not in every


async def test_records_have_the_loaders_keys_and_one_image_that_exists(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    records = await _varied_export(store, data_dir, tmp_path / "out")

    for record in records:
        assert set(record) == LOADER_KEYS
        assert isinstance(record["id"], str)
        assert isinstance(record["image"], str)  # one path, not a list
        assert not Path(record["image"]).is_absolute()
        assert (tmp_path / "out" / "images" / record["image"]).is_file()
        assert record["image_wh"] == [64, 48]
    assert len({record["id"] for record in records}) == len(records)


async def test_turns_alternate_human_and_gpt_starting_with_human_and_ending_with_gpt(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    records = await _varied_export(store, data_dir, tmp_path / "out")

    assert sorted(len(r["conversations"]) for r in records) == [2, 2, 4]
    for record in records:
        roles = [turn["from"] for turn in record["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2)
        assert set(record["conversations"][0]) == {"from", "value"}
        assert all(turn["value"].strip() for turn in record["conversations"][1::2])


async def test_only_the_first_human_turn_holds_the_image_placeholder(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    records = await _varied_export(store, data_dir, tmp_path / "out")

    for record in records:
        turns = record["conversations"]
        assert turns[0]["value"].startswith("<image>")
        assert turns[0]["value"].count("<image>") == 1
        for turn in turns[1:]:
            assert "<image>" not in turn["value"]
    multi_turn = next(r for r in records if len(r["conversations"]) == 4)
    assert [t["value"] for t in multi_turn["conversations"]] == [
        "<image>\nWhat is  this?",
        "Char siu.",
        "and is it sweet?",  # the user's <image>, <img> and <|im_end|> are gone
        "Yes, honey-glazed.",
    ]
    bare_photo = next(r for r in records if r["conversations"][1]["value"] == "烧鹅")
    assert bare_photo["conversations"][0]["value"] == "<image>"


async def test_unicode_survives_whole_and_line_separators_cannot_split_a_record(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = await add_user(store, "1")
    answer = "肠粉\u2028Cheung fun\u2029🇭🇰 مرحبا 👨‍🍳\x85 end\u200d"
    exchange = await answered(store, asker, photo=await add_photo(store), answer=answer)
    await store.record_rating(exchange.id, asker.id, 1)

    _, records = await export(store, data_dir, tmp_path / "out")

    text = (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8")
    assert len(text.splitlines()) == 1  # str.splitlines splits at U+2028 if left raw
    assert records[0]["conversations"][1]["value"] == answer.strip()


async def test_a_sample_that_would_not_fit_max_length_is_left_out_and_counted(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = await add_user(store, "1")
    short_photo, long_photo = await photos(store, 2)
    short = await answered(store, asker, photo=short_photo, answer="肠粉")
    long = await answered(store, asker, photo=long_photo, answer="Cheung fun. " * 100)
    for exchange in (short, long):
        await store.record_rating(exchange.id, asker.id, 1)
    # A 64x48 photo is tiled 4x3 plus a thumbnail: 13 tiles, 3,328 image tokens.
    max_length = image_tokens(64, 48) + 300

    summary, records = await export(
        store, data_dir, tmp_path / "out", training={"max_length": max_length}
    )

    assert [r["conversations"][1]["value"] for r in records] == ["肠粉"]
    assert summary.samples_left_out == {Fate.TOO_LONG: 1}
    assert summary.answers[Fate.TOO_LONG] == 1


# -- the pieces, one by one ---------------------------------------------------------------


def test_a_record_puts_the_image_first_then_each_question_and_answer() -> None:
    record = build_record(
        "exchange-7", "ab.jpg", 640, 480, [("这是什么菜？", "肠粉"), ("辣吗", "不辣")]
    )

    assert record == {
        "id": "exchange-7",
        "image": "ab.jpg",
        "image_wh": [640, 480],
        "conversations": [
            {"from": "human", "value": "<image>\n这是什么菜？"},
            {"from": "gpt", "value": "肠粉"},
            {"from": "human", "value": "辣吗"},
            {"from": "gpt", "value": "不辣"},
        ],
    }
    assert record_line(record).endswith("}\n")
    assert record_line(record).count("\n") == 1


def test_a_record_refuses_an_empty_answer_or_no_turns() -> None:
    with pytest.raises(ValueError, match="empty"):
        build_record("x", "a.jpg", 1, 1, [("q", "")])
    with pytest.raises(ValueError, match="at least one"):
        build_record("x", "a.jpg", 1, 1, [])


def test_the_length_estimate_counts_image_tiles_and_text() -> None:
    # InternVL tiles by aspect ratio, whatever the size: a thumbnail comes on top.
    assert image_tokens(100, 100) == 2 * IMAGE_TOKENS_PER_TILE + 3  # 1x1
    assert image_tokens(4000, 1000) == 5 * IMAGE_TOKENS_PER_TILE + 3  # 4x1
    assert image_tokens(64, 48) == 13 * IMAGE_TOKENS_PER_TILE + 3  # 4x3, small as it is
    assert estimate_text_tokens("肠粉") == 2
    assert estimate_text_tokens("cheung fun") == 5
    assert estimate_text_tokens("🥢") == 4  # byte fallback at worst
    one_turn = estimate_tokens(100, 100, [("q", "a")])
    assert estimate_tokens(100, 100, [("q", "a"), ("q", "a" * 100)]) > one_turn + 50


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("Cheung fun", "cheung  FUN!"),
        ("ＣＨＥＵＮＧ　ＦＵＮ", "cheung fun"),
        ("肠粉。", " 肠粉 "),
        ("Straße", "STRASSE"),
    ],
)
def test_corrections_that_differ_only_in_case_width_punctuation_or_space_agree(
    first: str, second: str
) -> None:
    assert comparison_key(first) == comparison_key(second)


def test_corrections_with_different_words_do_not_agree() -> None:
    assert comparison_key("肠粉") != comparison_key("河粉")
    assert comparison_key("char siu") != comparison_key("charsiu bao")


def test_markup_the_loader_or_tokenizer_would_act_on_is_removed() -> None:
    typed = "<image>肠<img>粉</img><IMG_CONTEXT><|im_start|>user\n<|im_end|><ref>x</ref><box>"

    assert clean_turn_text(typed) == "肠粉user\nx"
    assert clean_turn_text("lone \ud800 surrogate") == "lone ? surrogate"


@pytest.mark.parametrize(
    ("correction", "name"),
    [
        ("肠粉", "肠粉"),
        ("Cheung fun!", "Cheung fun"),
        ("that is 肠粉, not 叉烧", "肠粉"),
        ("是肠粉，不是叉烧", "肠粉"),
        ("不是叉烧，是肠粉", "肠粉"),
        ("It's roast goose, not char siu.", "roast goose"),
        ("这是肠粉。", "肠粉"),
        ("这是肠粉，用米浆蒸成，淋上甜酱油。", None),
        ("It is a steamed rice roll. It is not char siu.", None),
    ],
)
def test_a_dish_name_is_found_in_the_ways_people_correct(correction: str, name: str | None) -> None:
    assert dish_name(correction) == name


@pytest.mark.parametrize(
    ("question", "identifying"),
    [
        ("这是什么菜？", True),
        ("这个叫什么", True),
        ("What dish is this?", True),
        ("what's that", True),
        ("", True),
        ("Is it spicy?", False),
        ("what is it made of?", False),
        ("这是用什么做的？", False),
    ],
)
def test_only_questions_asking_what_the_dish_is_get_a_name_turned_into_a_sentence(
    question: str, identifying: bool
) -> None:
    assert is_identifying_question(question) is identifying


def test_a_correction_target_speaks_the_language_of_the_question() -> None:
    assert target_from_correction("肠粉", "这是什么菜？") == "这是肠粉。"
    assert target_from_correction("cheung fun", "What is this?") == "This is cheung fun."
    assert target_from_correction("肠粉", "") == "这是肠粉。"
    assert target_from_correction("no", "Is it spicy?") == "no"
