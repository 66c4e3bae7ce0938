"""Platform-neutral pieces of the dialog: the words, the language choice, button data, limits."""

from __future__ import annotations

import asyncio
import string

import pytest
from sqlalchemy import select

from bot.core import buttons
from bot.core.dialog import Dialog, DialogConfig, RateLimiter, Verdict
from bot.core.events import PhotoFile, PhotoQuestion
from bot.core.i18n import MESSAGES, image_reason, language_of, say
from bot.core.limits import DISCORD_CUSTOM_ID_LENGTH, TELEGRAM_CALLBACK_DATA_BYTES
from bot.core.text import visible_text
from bot.store import Store
from bot.store.models import Exchange, ExchangeStatus
from engine import images
from engine.engine import Engine
from engine.types import ModelSpec
from tests.factories import jpeg_bytes
from tests.recording_port import GUARD_S, RecordingPort, person, private_chat
from tests.scripted_backend import ScriptedBackend


def _placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


@pytest.mark.parametrize("key", sorted(MESSAGES))
def test_every_sentence_exists_in_both_languages_with_the_same_blanks(key: str) -> None:
    english, chinese = MESSAGES[key]["en"], MESSAGES[key]["zh"]
    assert english.strip()
    assert chinese.strip()
    assert _placeholders(english) == _placeholders(chinese)


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        ("zh-hans", None, "zh"),
        ("zh-TW", None, "zh"),
        ("en-US", None, "en"),
        (None, None, "en"),
        ("en", "这是什么菜？", "zh"),  # written in Chinese: answered in Chinese
        ("zh-hans", "is this spicy?", "en"),  # asked in English: answered in English
        ("zh-hans", "🍜?", "zh"),  # nothing to go by in the text: the platform's language
    ],
)
def test_the_language_follows_the_question_then_the_platform_setting(
    code: str | None, text: str | None, expected: str
) -> None:
    assert language_of(code, text) == expected


def test_known_image_refusals_are_translated_and_others_kept() -> None:
    assert image_reason(images.CORRUPT_IMAGE, "zh") == "图片数据不完整或已损坏"
    assert image_reason(images.CORRUPT_IMAGE, "en") == images.CORRUPT_IMAGE
    assert image_reason("the photo is larger than 20 MB", "zh") == "the photo is larger than 20 MB"
    assert say("bad_image", "en", reason="x") == "I can't use that image: x."


LARGEST_ID = 2**63 - 1  # the largest PostgreSQL bigint
DISCORD_USER_ID = "1234567890123456789012"  # snowflakes are up to 20 digits; a margin


@pytest.mark.parametrize(
    "action",
    [
        buttons.Rate(LARGEST_ID, 1),
        buttons.Rate(LARGEST_ID, -1),
        buttons.Correct(LARGEST_ID),
        buttons.ConfirmForget(DISCORD_USER_ID),
        buttons.KeepData(DISCORD_USER_ID),
    ],
)
def test_button_data_round_trips_and_fits_both_platforms(action: buttons.Action) -> None:
    data = buttons.encode(action)
    assert buttons.decode(data) == action
    assert len(data.encode()) <= TELEGRAM_CALLBACK_DATA_BYTES
    assert len(data) <= DISCORD_CUSTOM_ID_LENGTH


@pytest.mark.parametrize(
    "data",
    [
        "",
        "rate:1:up",
        "dishbot:rate:x:up",
        "dishbot:rate:1:sideways",
        "dishbot:fix:",
        "other:fix:1",
        # What a forged press sends: non-ASCII digits str.isdigit() takes, ids no store has,
        # signs, padding and other spellings int() would read.
        "dishbot:rate:²:up",
        "dishbot:fix:٣",
        "dishbot:fix:１",
        "dishbot:rate:99999999999999999999999:up",
        f"dishbot:rate:{2**63}:up",
        "dishbot:rate:0:up",
        "dishbot:rate:-1:up",
        "dishbot:rate:+1:up",
        "dishbot:rate:01:up",
        "dishbot:rate: 1:up",
        "dishbot:rate:1_0:up",
        "dishbot:rate:1:up:extra",
        "dishbot:forget:" + "9" * 200,
        "dishbot:forget:../../x",
        "dishbot:keep:a b",
    ],
)
def test_foreign_or_mangled_button_data_is_not_an_action(data: str) -> None:
    assert buttons.decode(data) is None


def test_answer_buttons_mark_only_the_chosen_rating() -> None:
    labels = [button.label for button in buttons.answer_buttons(7, chosen=-1)]
    assert labels == ["👍", "👎 ✓", "✏️"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_limit_is_a_sliding_minute_per_user() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_minute=2, clock=clock)

    assert limiter.allow("ada")
    clock.now += 30
    assert limiter.allow("ada")
    assert not limiter.allow("ada"), "a third question within the minute is refused"
    assert limiter.allow("lin"), "other users are not affected"
    clock.now += 30.5  # the first question is now more than a minute old
    assert limiter.allow("ada")
    assert not limiter.allow("ada"), "a refused question does not count, the second still does"


def test_a_flood_over_the_rate_limit_is_told_once_per_window() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_minute=1, clock=clock)

    verdicts = [limiter.check("ada") for _ in range(4)]
    assert verdicts == [
        Verdict.ALLOWED,
        Verdict.REFUSED,
        Verdict.REFUSED_AGAIN,
        Verdict.REFUSED_AGAIN,
    ]
    clock.now += 60
    assert limiter.check("ada") is Verdict.ALLOWED
    assert limiter.check("ada") is Verdict.REFUSED, "a new window, a new notice"


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("肠\u200b粉", "肠粉"),  # a zero-width space would make it another dish to the export
        ("\u202e粉肠", "粉肠"),  # a right-to-left override shows the text reversed
        ("\u2067rice roll\u2069\u200f", "rice roll"),
        ("\ufeffspicy?\x00", "spicy?"),
        ("line one\nline two", "line one\nline two"),
        ("👨\u200d🍳 chef's dish", "👨\u200d🍳 chef's dish"),  # joined emoji stay joined
        ("  \u200b  ", ""),
        ("肠\u200c粉\u200d", "肠粉"),  # joiners that join nothing
        ("\x1cmapo\x85 tofu\x1f", "mapo tofu"),  # controls Python counts as whitespace
        ("ch\u00adar siu", "char siu"),  # a soft hyphen
        ("می\u200cخواهم", "می\u200cخواهم"),  # Persian needs its zero-width non-joiner
        ("🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f haggis",) * 2,
    ],
)
def test_what_users_type_is_kept_as_seen_without_invisible_characters(
    typed: str, meant: str
) -> None:
    assert visible_text(typed) == meant


def test_the_rate_limiter_forgets_users_idle_for_a_minute() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_minute=1, clock=clock)
    for user in range(RateLimiter.SWEEP_EVERY):
        limiter.check(f"telegram:{user}")
    assert len(limiter) == RateLimiter.SWEEP_EVERY

    clock.now += 61
    for _ in range(RateLimiter.SWEEP_EVERY):
        limiter.check("ada")

    assert len(limiter) == 1, "a million one-off users do not stay in memory"
    assert limiter.check("telegram:1") is Verdict.ALLOWED


# -- an answer behind a long queue -------------------------------------------------------------


async def test_an_answer_is_not_held_back_by_places_in_line_the_chat_had_no_slot_to_show(
    store: Store,
) -> None:
    # A chat shows a notice at most once an edit slot (an hour here). The engine announces
    # every place in line as the queue moves; under load hundreds of them pile up behind a
    # waiting question. Its answer must not wait for each one to get a slot of its own:
    # that kept questions pending, with no word to their users, for minutes.
    engine = Engine(ScriptedBackend(capacity=1, step_s=0.05), ModelSpec("scripted", "dishbot-test"))
    port = RecordingPort()
    config = DialogConfig(edit_interval_s=3600.0, questions_per_minute=60)

    async def ask(dialog: Dialog, user: str) -> None:
        async def download() -> bytes:
            return jpeg_bytes((int(user) * 40, 40, 80))

        question = PhotoQuestion(person(user), private_chat(user), "m1", PhotoFile(download))
        await asyncio.wait_for(dialog.handle(question, port), GUARD_S)

    async with engine:
        dialog = Dialog(store, engine, config)
        ahead = [asyncio.create_task(ask(dialog, str(user))) for user in (1, 2, 3)]
        await asyncio.wait_for(_until_waiting(engine, 2), GUARD_S)
        await ask(dialog, "4")  # two ahead of it, then one: two places to tell
        await asyncio.gather(*ahead)

    async with store.engine.connect() as connection:
        statuses = (await connection.scalars(select(Exchange.status))).all()
    shown = [message for message in port.messages.values() if message.chat_id == "4"]
    assert len(shown) == 1, "the place in line became the answer"
    assert "dishbot-test says" in shown[0].text
    assert shown[0].buttons, "the answer came with its rating buttons"
    assert statuses == [ExchangeStatus.ANSWERED] * 4


async def _until_waiting(engine: Engine, count: int) -> None:
    while engine.stats().waiting < count:  # noqa: ASYNC110 - polls the engine
        await asyncio.sleep(0.01)
