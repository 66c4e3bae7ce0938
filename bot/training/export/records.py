"""Training records in the form XTuner's ``InternVL_V1_5_Dataset`` reads, and their length.

The loader (``xtuner/dataset/internvl_dataset.py``) is unforgiving in quiet ways, so every
record dishbot writes keeps these rules:

* one JSON object per line of a ``.jsonl`` file, UTF-8 as is (not ASCII-escaped), no blank
  lines;
* keys ``id``, ``image`` (one path, relative to the image folder: the loader asserts a
  single image), ``image_wh`` (``[width, height]``, which lets the loader estimate the
  length without tokenising) and ``conversations``;
* ``conversations`` alternates ``{"from": "human"}`` and ``{"from": "gpt"}``, starting with
  a human turn and ending with a gpt turn (any other role raises in the loader; a trailing
  human turn is dropped);
* the first human turn, and no other turn, holds ``<image>``, which the loader replaces
  with the image tokens (without it the image is silently ignored);
* past ``max_length`` tokens the loader truncates, possibly through the image tokens, so a
  record whose estimated length does not fit is not written at all.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from engine.images import grid_for
from engine.prompts import IMAGE_PLACEHOLDER, XTUNER_INTERNLM2_SYSTEM_PROMPT

# From InternVL2-2B's config.json, which the loader reads: 448-pixel tiles, up to 12 of them
# plus a thumbnail, each 256 tokens once the vision features are pixel-shuffled.
IMAGE_TOKENS_PER_TILE = 256
MAX_DYNAMIC_TILES = 12
# <img>, </img> and the newline after them.
IMAGE_MARKER_TOKENS = 3
# "<|im_start|>user\n", "<|im_end|>", "<|im_start|>assistant\n", "<|im_end|>" per turn.
TEMPLATE_TOKENS_PER_TURN = 12
SYSTEM_TEMPLATE_TOKENS = 6

# Characters written in a few tokens at most, one token each in the estimate: Chinese,
# Japanese and Korean, and full-width forms. Other non-ASCII characters may fall back to
# one token per UTF-8 byte.
_ONE_TOKEN_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_ONE_TOKEN = re.compile(f"[{_ONE_TOKEN_RANGES}]")
_BYTE_FALLBACK = re.compile(f"[^\\x00-\\x7f{_ONE_TOKEN_RANGES}]+")
_LINE_BREAK_ESCAPES = (("\x85", "\\u0085"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))

HUMAN = "human"
GPT = "gpt"


def estimate_text_tokens(text: str) -> int:
    """A cautious token count for ``text`` under InternLM2's tokenizer.

    ASCII counts two characters a token (English averages about four), CJK one token a
    character, anything else one token per UTF-8 byte (the tokenizer's byte fallback).
    """
    if text.isascii():
        return math.ceil(len(text) / 2)
    one_token = len(_ONE_TOKEN.findall(text))
    fallback = "".join(_BYTE_FALLBACK.findall(text))
    ascii_characters = len(text) - one_token - len(fallback)
    return math.ceil(ascii_characters / 2) + one_token + len(fallback.encode("utf-8", "replace"))


def image_tokens(width: int, height: int) -> int:
    """Tokens the loader spends on an image of this size: its tiles plus a thumbnail."""
    columns, rows = grid_for(width, height, MAX_DYNAMIC_TILES)
    return (columns * rows + 1) * IMAGE_TOKENS_PER_TILE + IMAGE_MARKER_TOKENS


def estimate_tokens(width: int, height: int, turns: Sequence[tuple[str, str]]) -> int:
    """A cautious estimate of a record's length as the loader tokenises it.

    System prompt, template, image tokens and every question and answer.
    """
    total = SYSTEM_TEMPLATE_TOKENS + estimate_text_tokens(XTUNER_INTERNLM2_SYSTEM_PROMPT)
    total += image_tokens(width, height)
    for question, answer in turns:
        total += TEMPLATE_TOKENS_PER_TURN
        total += estimate_text_tokens(question) + estimate_text_tokens(answer)
    return total


def build_record(
    record_id: str, image: str, width: int, height: int, turns: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """One training record: the photo, then each (question, answer) as a human and a gpt turn.

    The questions and answers must already be cleaned of markup (`clean_turn_text`); the
    answers must not be empty.
    """
    if not turns:
        raise ValueError("a record needs at least one question and answer")
    conversations: list[dict[str, str]] = []
    for position, (question, answer) in enumerate(turns):
        if not answer:
            raise ValueError("an answer in a training record must not be empty")
        if position == 0:
            question = f"{IMAGE_PLACEHOLDER}\n{question}" if question else IMAGE_PLACEHOLDER
        conversations.append({"from": HUMAN, "value": question})
        conversations.append({"from": GPT, "value": answer})
    return {
        "id": record_id,
        "image": image,
        "image_wh": [width, height],
        "conversations": conversations,
    }


def record_line(record: dict[str, Any]) -> str:
    """``record`` as one line of JSON Lines: UTF-8 text as is, ending in a newline.

    The characters some line readers (Python's ``str.splitlines`` among them) take for line
    breaks, which JSON allows raw, are escaped: U+0085, U+2028 and U+2029.
    """
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    for character, escaped in _LINE_BREAK_ESCAPES:
        text = text.replace(character, escaped)
    return text + "\n"
