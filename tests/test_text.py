"""Long answers are cut into messages at paragraph and sentence boundaries."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.core.limits import TELEGRAM_MESSAGE_LENGTH
from bot.core.text import split_message, utf16_length


def _visible(text: str) -> str:
    return re.sub(r"\s", "", text)


def test_a_short_answer_is_one_message() -> None:
    assert split_message("  叉烧 (char siu): sweet, sticky, roasted.  ", 4096) == [
        "叉烧 (char siu): sweet, sticky, roasted."
    ]


def test_a_long_answer_is_cut_between_paragraphs() -> None:
    first = "Char siu is Cantonese barbecued pork. " * 50
    second = "It is glazed with honey and roasted until sticky. " * 50
    text = f"{first.strip()}\n\n{second.strip()}"

    pieces = split_message(text, 3000)

    assert pieces == [first.strip(), second.strip()]


def test_without_paragraphs_the_cut_falls_after_a_sentence() -> None:
    text = "这是叉烧。" * 30 + "它是甜的！" * 30

    pieces = split_message(text, 100)

    assert all(len(piece) <= 100 for piece in pieces)
    assert all(piece.endswith(("。", "！")) for piece in pieces)
    assert "".join(pieces) == text


def test_an_answer_over_telegrams_limit_arrives_whole_in_several_messages() -> None:
    text = "\n\n".join(f"Paragraph {n}: " + "steamed rice rolls, " * 40 for n in range(12))

    pieces = split_message(text, TELEGRAM_MESSAGE_LENGTH, utf16_length)

    assert len(pieces) > 1
    assert all(utf16_length(piece) <= TELEGRAM_MESSAGE_LENGTH for piece in pieces)
    assert _visible("".join(pieces)) == _visible(text)


def test_telegram_counts_emoji_as_two_units() -> None:
    text = "🥟" * 10

    pieces = split_message(text, 8, utf16_length)

    assert pieces == ["🥟" * 4, "🥟" * 4, "🥟" * 2]


def test_a_word_longer_than_the_limit_is_cut_inside() -> None:
    assert split_message("a" * 25, 10) == ["a" * 10, "a" * 10, "a" * 5]


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        split_message("text", 0)


@given(
    text=st.text(alphabet=st.sampled_from(list("ab 叉烧🥟.。!\n,")), max_size=400),
    limit=st.integers(1, 60),
    telegram=st.booleans(),
)
def test_pieces_fit_are_never_empty_and_keep_every_visible_character(
    text: str, limit: int, telegram: bool
) -> None:
    length = utf16_length if telegram else len
    if telegram and limit < 2:
        limit = 2  # one emoji needs two UTF-16 units

    pieces = split_message(text, limit, length)

    assert all(0 < length(piece) <= limit for piece in pieces)
    assert all(piece.strip() for piece in pieces)
    assert _visible("".join(pieces)) == _visible(text)
