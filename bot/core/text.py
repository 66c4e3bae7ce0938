"""Text in and out: what a user typed, cleaned; a long answer cut into messages a platform
accepts, at natural boundaries."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

_WORD_BREAK = re.compile(r"\s+")
# Where a cut reads best, best first: a paragraph, a line, a sentence, a clause, a word.
_BOUNDARIES = (
    re.compile(r"\n\s*\n"),
    re.compile(r"\n"),
    re.compile(r"(?<=[.!?])\s+|(?<=[。！？…])"),
    re.compile(r"(?<=[;:,，；：、])\s*"),
    _WORD_BREAK,
)


def utf16_length(text: str) -> int:
    """Length in UTF-16 code units, the way Telegram counts message length."""
    return len(text.encode("utf-16-le")) // 2


def split_message(text: str, limit: int, length: Callable[[str], int] = len) -> list[str]:
    """Split ``text`` into non-empty pieces no longer than ``limit`` as ``length`` measures.

    Each cut falls on the best boundary in the last part of the piece (a paragraph break,
    then a line break, a sentence end, a clause, a space); only a run with none of those is
    cut mid-word. Whitespace at a cut is dropped; nothing else is lost or reordered.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    pieces: list[str] = []
    rest = text.strip()
    while rest:
        if length(rest) <= limit:
            pieces.append(rest)
            break
        cut = _longest_prefix(rest, limit, length)
        head, tail = _cut_at_boundary(rest[:cut], rest[cut:])
        pieces.append(head)
        rest = tail.lstrip()
    return pieces


def _longest_prefix(text: str, limit: int, length: Callable[[str], int]) -> int:
    """How many characters of ``text`` fit in ``limit`` (binary search: ``length`` grows)."""
    low, high = 1, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if length(text[:middle]) <= limit:
            low = middle
        else:
            high = middle - 1
    return low


def _cut_at_boundary(window: str, after: str) -> tuple[str, str]:
    """Split ``window`` at its last good boundary; the remainder goes back in front of ``after``.

    A boundary in the first half of the window is not worth it (it would leave a short
    message); then the next kind of boundary is tried.
    """
    for boundary in _BOUNDARIES:
        if boundary is _WORD_BREAK and after[:1].isspace():
            return window.rstrip(), after  # the window ends exactly between two words
        matches = [m for m in boundary.finditer(window) if m.end() > len(window) // 2]
        if matches:
            last = matches[-1]
            head = window[: last.start()].rstrip() or window[: last.end()]
            if head.strip():
                return head, window[last.end() :] + after
    return window, after


# Invisible characters that change how text reads, sorts and compares without being seen:
# zero-width spaces, the BOM and word joiners, soft hyphens, and bidirectional marks,
# overrides and isolates ("\u202e" shows "肠粉" as "粉肠"). Emoji tag characters (the Scottish
# flag) carry meaning and stay.
_INVISIBLE = frozenset(
    "\u00ad\u061c\u180e\u200b\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff"
    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
# The zero-width joiner and non-joiner shape emoji sequences, Persian and Indic scripts, and
# mean nothing next to a space, an edge, or Chinese, Japanese or Korean writing, where they
# would only make "肠\u200c粉" another dish than "肠粉".
_JOINERS = frozenset("\u200c\u200d")
_NO_JOINING = re.compile(r"[\s\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_KEPT_CONTROLS = frozenset("\t\n\r")


def visible_text(text: str) -> str:
    """``text`` as a person meant it: without control characters (line breaks and tabs
    stay), invisible characters, and joiners where they join nothing, and without space at
    either end."""
    kept = [
        character
        for character in text
        if character not in _INVISIBLE
        and (character in _KEPT_CONTROLS or unicodedata.category(character) != "Cc")
    ]
    return "".join(
        character
        for index, character in enumerate(kept)
        if character not in _JOINERS or _joins(kept, index)
    ).strip()


def _joins(characters: list[str], index: int) -> bool:
    if index == 0 or index == len(characters) - 1:
        return False
    neighbours = (characters[index - 1], characters[index + 1])
    return not any(n in _JOINERS or _NO_JOINING.match(n) for n in neighbours)
