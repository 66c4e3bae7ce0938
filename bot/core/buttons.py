"""The bot's buttons and what their data means.

Button data carries ids, never state held in memory, so a button keeps working after the
bot restarts. Every payload fits Telegram's 64 bytes and Discord's 100-character custom id.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.core.limits import DISCORD_CUSTOM_ID_LENGTH, TELEGRAM_CALLBACK_DATA_BYTES
from bot.core.port import Button

PREFIX = "dishbot"  # lets an adapter tell its own buttons from anything else

THUMBS_UP = "👍"
THUMBS_DOWN = "👎"
PENCIL = "✏️"
CHOSEN = "✓"


@dataclass(frozen=True, slots=True)
class Rate:
    exchange_id: int
    value: int  # +1 or -1


@dataclass(frozen=True, slots=True)
class Correct:
    exchange_id: int


@dataclass(frozen=True, slots=True)
class ConfirmForget:
    platform_user_id: str  # only this user may confirm


@dataclass(frozen=True, slots=True)
class KeepData:
    platform_user_id: str


Action = Rate | Correct | ConfirmForget | KeepData


def encode(action: Action) -> str:
    """The button data for an action."""
    match action:
        case Rate(exchange_id, value):
            data = f"{PREFIX}:rate:{exchange_id}:{'up' if value > 0 else 'down'}"
        case Correct(exchange_id):
            data = f"{PREFIX}:fix:{exchange_id}"
        case ConfirmForget(user_id):
            data = f"{PREFIX}:forget:{user_id}"
        case KeepData(user_id):
            data = f"{PREFIX}:keep:{user_id}"
    if len(data.encode()) > min(TELEGRAM_CALLBACK_DATA_BYTES, DISCORD_CUSTOM_ID_LENGTH):
        raise ValueError(f"button data too long for the platforms: {data!r}")
    return data


def decode(data: str) -> Action | None:
    """The action behind button data, or None when it is not one of dishbot's buttons."""
    parts = data.split(":")
    if len(parts) < 3 or parts[0] != PREFIX:
        return None
    kind, rest = parts[1], parts[2:]
    if kind == "rate" and len(rest) == 2 and rest[0].isdigit() and rest[1] in ("up", "down"):
        return Rate(int(rest[0]), 1 if rest[1] == "up" else -1)
    if kind == "fix" and len(rest) == 1 and rest[0].isdigit():
        return Correct(int(rest[0]))
    if kind == "forget" and len(rest) == 1 and rest[0]:
        return ConfirmForget(rest[0])
    if kind == "keep" and len(rest) == 1 and rest[0]:
        return KeepData(rest[0])
    return None


def answer_buttons(exchange_id: int, chosen: int | None = None) -> tuple[Button, ...]:
    """👍 👎 ✏️ under an answer; ``chosen`` (+1 / -1) marks the rating just given."""
    up = THUMBS_UP + (f" {CHOSEN}" if chosen == 1 else "")
    down = THUMBS_DOWN + (f" {CHOSEN}" if chosen == -1 else "")
    return (
        Button(up, encode(Rate(exchange_id, 1))),
        Button(down, encode(Rate(exchange_id, -1))),
        Button(PENCIL, encode(Correct(exchange_id))),
    )


def forget_buttons(platform_user_id: str, yes: str, no: str) -> tuple[Button, ...]:
    """The confirmation under a /forget request."""
    return (
        Button(yes, encode(ConfirmForget(platform_user_id))),
        Button(no, encode(KeepData(platform_user_id))),
    )
