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

from engine.prompts import IMAGE_PLACEHOLDER

# Markup with a meaning to InternVL2's loader or its tokenizer: the image placeholder, the
# image and grounding tags, and InternLM2's ChatML control tokens (<|im_start|>, ...).
_MARKUP = re.compile(
    "|".join(
        [
            re.escape(IMAGE_PLACEHOLDER),
            r"</?img>",
            r"<IMG_CONTEXT>",
            r"</?(?:quad|ref|box)>",
            r"<\|[A-Za-z_]+\|>",
        ]
    )
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
    return _MARKUP.sub("", valid).strip()
