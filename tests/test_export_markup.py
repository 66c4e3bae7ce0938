"""Markup typed by users never reaches an exported record, however it is nested.

XTuner's loader splices the image tokens in for every ``<image>`` it finds, and the
tokenizer turns ``<|im_end|>`` and its kin into control tokens; a record that carries one a
user typed trains the model on a broken conversation.
"""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from bot.store import Store
from bot.training.export import text
from bot.training.export.text import clean_turn_text
from tests.factories import add_photo, add_user, answered
from tests.test_export_selection import ADMIN_ID, export

# What InternVL2's loader or its tokenizers act on, as the issue lists it; the cleaner's own
# list and its pattern for ChatML tokens (names of up to 40 characters) are checked too.
ISSUE_TOKENS = (
    "<image>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "[UNUSED_TOKEN_145]",  # InternLM2's SentencePiece spelling of <|im_end|>
)
CONTROL_TOKENS = (*ISSUE_TOKENS, *text.CONTROL_TOKENS)
_CHATML_TOKEN = re.compile(text.CHATML_TOKEN)
_UNUSED_TOKEN = re.compile(text.UNUSED_TOKEN)


def control_sequences_in(text: str) -> list[str]:
    """Every control token that ``text`` contains."""
    found = [token for token in CONTROL_TOKENS if token in text]
    return found + _CHATML_TOKEN.findall(text) + _UNUSED_TOKEN.findall(text)


def _fragments(token: str) -> list[str]:
    return [
        token[start:end] for start in range(len(token)) for end in range(start + 1, len(token) + 1)
    ]


FRAGMENTS = sorted(
    {f for token in CONTROL_TOKENS for f in _fragments(token)} | {"a", " ", "肠", "\n"}
)


def _split_open(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A control token with ``inner`` pushed into it somewhere: ``<im`` + inner + ``age>``."""
    return st.tuples(st.sampled_from(CONTROL_TOKENS), st.integers(0, 15), inner).map(
        lambda parts: parts[0][: parts[1]] + parts[2] + parts[0][parts[1] :]
    )


# Fragments of the tokens side by side, and tokens split open around other such text.
HOSTILE_TEXT = st.recursive(
    st.lists(st.sampled_from(FRAGMENTS), max_size=8).map("".join),
    lambda inner: st.one_of(_split_open(inner), st.lists(inner, max_size=4).map("".join)),
    max_leaves=24,
)


@given(HOSTILE_TEXT)
def test_no_control_sequence_survives_cleaning_whatever_the_nesting(typed: str) -> None:
    cleaned = clean_turn_text(typed)

    assert control_sequences_in(cleaned) == []
    assert clean_turn_text(cleaned) == cleaned


def test_markup_hidden_inside_markup_is_removed_too() -> None:
    assert clean_turn_text("<im<image>age>肠粉") == "肠粉"
    assert clean_turn_text("a<|im_<|x|>end|>b") == "ab"
    assert clean_turn_text("<<i<image>m<img>a<IMG_CONTEXT>ge>>") == "<>"


async def test_nested_markup_from_one_user_gives_one_image_placeholder_per_record(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = await add_user(store, "1")
    admin = await add_user(store, ADMIN_ID)
    photo = await add_photo(store)
    first = await answered(
        store, asker, photo=photo, question="<im<image>age>这是什么菜？", answer="叉烧"
    )
    follow = await answered(
        store,
        asker,
        photo=photo,
        question="<|im_<|x|>end|><im<image>age>甜吗？",
        answer="<im<image>age>甜的。<|im_<|x|>end|>",
        parent_id=first.id,
    )
    await store.record_correction(first.id, admin.id, "<im<image>age>肠粉")
    await store.record_rating(follow.id, asker.id, 1)

    _, records = await export(store, data_dir, tmp_path / "out")

    assert records
    for record in records:
        values = [turn["value"] for turn in record["conversations"]]
        assert "".join(values).count("<image>") == 1, values
        assert values[0].startswith("<image>\n")
        assert control_sequences_in("".join(values).replace("<image>", "", 1)) == []
    assert [turn["value"] for turn in records[0]["conversations"]] == [
        "<image>\n这是什么菜？",
        "这是肠粉。",
        "甜吗？",
        "甜的。",
    ]
