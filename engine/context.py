"""Fitting a conversation into the model's context: a conservative token estimate, and the
history trimmed oldest turns first.

The estimate needs no tokenizer, so it is cheap enough for the event loop and the same for
every backend (the remote one's tokenizer is not even known here). It errs on the long side:

* a character counts as one token. InternLM2's and Qwen's tokenizers put several Latin
  characters in a token and one or more CJK characters in a token, so real prompts are
  shorter than this says (a rare character split into bytes is the exception, and the
  zero-width spaces `engine.prompts` puts into control tokens add a handful);
* each message costs `MESSAGE_OVERHEAD_TOKENS` for its ChatML markup;
* an image costs `IMAGE_TOKENS_PER_TILE` for each of InternVL's tiles, plus one thumbnail
  tile when there are several, plus its ``<img>``/``</img>`` markers;
* the answer's ``max_new_tokens`` are reserved too: the context bounds prompt plus answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.errors import PromptTooLong
from engine.images import DecodedImage, grid_for
from engine.types import Turn

IMAGE_TOKENS_PER_TILE = 256  # InternVL2/3: a 448-pixel tile is 256 tokens after pixel shuffle
IMAGE_MARKER_TOKENS = 4  # <img>, </img> and the newline after them, with room to spare
MESSAGE_OVERHEAD_TOKENS = 8  # "<|im_start|>role\n" ... "<|im_end|>\n"


def image_tokens(image: DecodedImage, max_tiles: int) -> int:
    """The tokens ``image`` becomes: its tiles, a thumbnail when there are several, markers."""
    columns, rows = grid_for(*image.image.size, max_tiles)
    tiles = columns * rows
    if tiles > 1:
        tiles += 1  # the thumbnail
    return tiles * IMAGE_TOKENS_PER_TILE + IMAGE_MARKER_TOKENS


def text_tokens(text: str) -> int:
    """An upper estimate of one message's tokens: a token per character, plus its markup."""
    return len(text) + MESSAGE_OVERHEAD_TOKENS


def turn_tokens(turn: Turn) -> int:
    """An upper estimate of an earlier question and answer."""
    return text_tokens(turn.question) + text_tokens(turn.answer)


def fit_history(
    history: Sequence[Turn],
    *,
    context_tokens: int,
    system_prompt: str,
    question: str,
    images: Sequence[DecodedImage],
    max_tiles: int,
    max_new_tokens: int,
) -> tuple[Turn, ...]:
    """The newest turns of ``history`` that fit in ``context_tokens``, in their order.

    What must always be sent (system prompt, question, photos) and the answer's room come
    first; turns are added from the newest back until the next one would not fit. Raises
    `PromptTooLong` when even the question and its photos do not fit.
    """
    needed = (
        text_tokens(system_prompt)
        + text_tokens(question)
        + sum(image_tokens(image, max_tiles) for image in images)
        + max_new_tokens
        + MESSAGE_OVERHEAD_TOKENS  # the open assistant turn
    )
    room = context_tokens - needed
    if room < 0:
        raise PromptTooLong(
            f"the question and its photos need about {needed} tokens; "
            f"the model reads {context_tokens} at once"
        )
    kept = 0
    for turn in reversed(history):
        room -= turn_tokens(turn)
        if room < 0:
            break
        kept += 1
    return tuple(history[len(history) - kept :])
