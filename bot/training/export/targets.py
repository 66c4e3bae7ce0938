"""What the model should have said, built from a user's correction.

People correct the way they talk: a bare name ("肠粉", "cheung fun"), a name against the
wrong one ("that is 肠粉, not 叉烧", "是肠粉，不是叉烧"), or a whole sentence. A name, when
the question asked what the dish is, becomes a short answer that names it ("这是肠粉。",
"This is cheung fun."); anything else is kept as written, since it already is an answer.
"""

from __future__ import annotations

import re

from bot.training.export.text import clean_turn_text

MAX_DISH_NAME_CHARACTERS = 40
MAX_DISH_NAME_WORDS = 6
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
# A name holds no sentence or clause punctuation, line break or negation.
_NOT_A_NAME = re.compile(r"[.!?。！？;；:：,，、\n]|\bnot\b|不是|\bisn'?t\b", re.IGNORECASE)
_TRAILING_STOP = re.compile(r"[\s.!?。！？~～…]+$")
_LEADING_ENGLISH = re.compile(
    r"^(?:no[,，]?\s+)?(?:(?:it|this|that)(?:\s+is|'s|’s|\s+was)|it'?s|its)\s+(?:an?\s+|the\s+)?",
    re.IGNORECASE,
)
_LEADING_CHINESE = re.compile(r"^(?:不对[，,]?\s*)?(?:这道菜|这个|这)?(?:应该)?是")
# "X, not Y" / "X rather than Y" / "是X，不是Y" / "X而不是Y": the name is X.
_NAME_THEN_WRONG = re.compile(
    r"^(?P<name>.+?)\s*(?:[,，]\s*|\s+)(?:not|rather than|instead of|而不是|不是)\s*.+$",
    re.IGNORECASE,
)
_CHINESE_NAME_THEN_WRONG = re.compile(r"^(?P<name>.+?)[,，]?\s*(?:而不是|不是).+$")
# "不是Y，是X" / "not Y but X" / "not Y, it's X": the name is X.
_WRONG_THEN_NAME = re.compile(
    r"^(?:不是|not)\s*.+?(?:[,，]\s*|\s+)(?:而是|是|but|it'?s|it is|this is)\s*(?P<name>.+)$",
    re.IGNORECASE,
)
# Questions asking what the dish is, as opposed to how it tastes or what is in it.
_IDENTIFYING_QUESTION = re.compile(
    r"什么菜|叫什么|是什么[\s?？。!！]*$|是啥|啥菜|哪道菜|什么名|名字"
    r"|^\s*(?:what|which)(?:\s+kind\s+of|\s+sort\s+of)?(?:\s+(?:dish|food|meal))?"
    r"(?:\s+is|'s|’s)?\s+(?:this|that|it)(?:\s+(?:dish|food|called))?[\s?!.]*$"
    r"|^\s*what\s+(?:dish|food)\b|\bname\s+of\b|\bwhat\s+is\s+it\s+called\b",
    re.IGNORECASE,
)


def is_identifying_question(question: str) -> bool:
    """Whether ``question`` asks what the dish is (an empty question, a bare photo, does)."""
    return not question.strip() or _IDENTIFYING_QUESTION.search(question.strip()) is not None


def dish_name(text: str) -> str | None:
    """The dish ``text`` names, if it is a name (possibly set against a wrong one); else None."""
    candidate = _TRAILING_STOP.sub("", clean_turn_text(text))
    candidate = _strip_lead_in(candidate)
    for pattern in (_WRONG_THEN_NAME, _NAME_THEN_WRONG, _CHINESE_NAME_THEN_WRONG):
        match = pattern.match(candidate)
        if match:
            candidate = _strip_lead_in(match.group("name"))
            break
    candidate = candidate.strip(" ,，、\"'“”‘’「」『』")
    return candidate if _is_bare_name(candidate) else None


def _strip_lead_in(text: str) -> str:
    text = text.strip()
    text = _LEADING_ENGLISH.sub("", text, count=1)
    return _LEADING_CHINESE.sub("", text, count=1).strip()


def _is_bare_name(text: str) -> bool:
    return (
        0 < len(text) <= MAX_DISH_NAME_CHARACTERS
        and len(text.split()) <= MAX_DISH_NAME_WORDS
        and not _NOT_A_NAME.search(text)
    )


def writes_chinese(text: str) -> bool:
    """Whether ``text`` contains Chinese, Japanese or Korean characters."""
    return _CJK.search(text) is not None


def target_from_correction(correction: str, question: str) -> str:
    """The answer to train on, from an accepted correction of the answer to ``question``.

    A dish name, when the question asked what the dish is, becomes a short sentence naming
    it, in the language of the question; any other correction is kept as written.
    """
    written = clean_turn_text(correction)
    name = dish_name(written)
    if name is None or not is_identifying_question(question):
        return written
    in_chinese = writes_chinese(question) if question.strip() else writes_chinese(name)
    return f"这是{name}。" if in_chinese else f"This is {name}."


def dish_label(answer: str) -> str:
    """A short label for the dish an answer names, for counting the most frequent dishes.

    dishbot's prompt asks the model to name the dish first, so the label is the answer's
    first clause, less any "this is" lead-in.
    """
    first_clause = re.split(r"[.!?。！？\n,，:：;；]", clean_turn_text(answer), maxsplit=1)[0]
    label = _strip_lead_in(first_clause).strip(" \"'“”「」")
    return label[:MAX_DISH_NAME_CHARACTERS]
