"""Text as the export compares it and writes it.

Two corrections "agree" when their comparison keys are equal: the same words once case,
character width (full-width ＣＨＡＲ ＳＩＵ, half-width katakana), punctuation and runs of
whitespace are set aside. The same key decides whether two questions are duplicates.

Text written into a training record is first cleaned of markup that XTuner's loader or the
tokenizer would act on: a user who types ``<image>`` in a follow-up would otherwise make the
loader splice a second copy of the image tokens in, and ``<|im_end|>`` would end a turn.
"""

from __future__ import annotations

import re
import unicodedata

from engine.prompts import CONTROL_MARKERS

# Markup with a meaning to InternVL2's loader, its tokenizers or lmdeploy: the markers
# serving keeps out of prompts (image placeholders, image and grounding tags, SentencePiece's
# specials: a tokenizer turns a typed "</s>" into the end of the sequence), ChatML-style
# control tokens (<|im_end|>, InternLM2's <|action_start|>, ...) and InternLM2's
# [UNUSED_TOKEN_n] pieces.
CONTROL_TOKENS = CONTROL_MARKERS
CHATML_TOKEN = r"<\|[A-Za-z0-9_]{1,40}\|>"
UNUSED_TOKEN = r"\[UNUSED_TOKEN_[0-9]{1,6}\]"
_LONGEST_CONTROL = max(len(f"<|{'x' * 40}|>"), *map(len, CONTROL_TOKENS))
# Every control token ends in ">" or "]", so one can only end where one was just kept.
_TOKEN_ENDS = frozenset(">]")
_CONTROL_AT_END = re.compile(
    "(?:" + "|".join([*map(re.escape, CONTROL_TOKENS), CHATML_TOKEN, UNUSED_TOKEN]) + ")$"
)
_SPACES = re.compile(r"\s+")


def comparison_key(text: str) -> str:
    """``text`` reduced to what matters when comparing what people wrote.

    NFKC folds width and compatibility forms, casefold folds case (ß and ss too),
    punctuation is dropped and whitespace runs become one space.
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    without_punctuation = "".join(
        " " if unicodedata.category(char).startswith("P") else char for char in folded
    )
    return _SPACES.sub(" ", without_punctuation).strip()


def clean_turn_text(text: str) -> str:
    """``text`` fit to stand in a training record: no loader markup, valid UTF-8, trimmed."""
    # A lone surrogate cannot be written as UTF-8; keep the rest of the text.
    valid = text.encode("utf-8", "replace").decode("utf-8")
    return remove_control_markup(valid).strip()


def remove_control_markup(text: str) -> str:
    """``text`` with every control token removed, including those that removing others forms.

    Removing ``<image>`` from ``<im<image>age>`` leaves ``<image>``; so the text is rebuilt a
    character at a time, and a token is dropped as soon as it appears at the end of what is
    kept. What is kept never holds a token, so the result holds none, and cleaning it again
    changes nothing. It takes time in proportion to the text, however deep the nesting.
    """
    kept: list[str] = []
    for character in text:
        kept.append(character)
        if character not in _TOKEN_ENDS:
            continue
        token = _CONTROL_AT_END.search("".join(kept[-_LONGEST_CONTROL:]))
        if token is not None:
            del kept[-len(token.group()) :]
    return "".join(kept)
