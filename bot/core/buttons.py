"""The bot's buttons and what their data means.

Button data carries ids, never state held in memory, so a button keeps working after the
bot restarts. Every payload fits Telegram's 64 bytes and Discord's 100-character custom id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bot.core.limits import DISCORD_CUSTOM_ID_LENGTH, TELEGRAM_CALLBACK_DATA_BYTES
from bot.core.port import Button

PREFIX = "dishbot"  # lets an adapter tell its own buttons from anything else
MAX_ID = 2**63 - 1  # the largest id the store hands out (a PostgreSQL bigint)
MAX_USER_ID_LENGTH = 40  # platform user ids are snowflakes and the like, well under this
_USER_ID = re.compile(r"[A-Za-z0-9_:-]+")

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
    """The action behind button data, or None when it is not one of dishbot's buttons.

    Button data comes from the platform as the client sent it, so anyone can forge it: it is
    parsed strictly (ids in ASCII digits, no sign, no leading zero, within the store's range)
    and anything else is None, never an exception.
    """
    prefix, _, payload = data.partition(":")
    if prefix != PREFIX or len(data) > DISCORD_CUSTOM_ID_LENGTH:
        return None
    kind, _, rest = payload.partition(":")
    match kind, rest.split(":"):
        case "rate", [exchange, ("up" | "down") as direction]:
            exchange_id = _parse_id(exchange)
            if exchange_id is None:
                return None
            return Rate(exchange_id, 1 if direction == "up" else -1)
        case "fix", [exchange]:
            exchange_id = _parse_id(exchange)
            return None if exchange_id is None else Correct(exchange_id)
        case "forget", _ if _is_user_id(rest):
            return ConfirmForget(rest)
        case "keep", _ if _is_user_id(rest):
            return KeepData(rest)
    return None


def _parse_id(text: str) -> int | None:
    """A stored id written as dishbot writes it, or None.

    ``str.isdigit`` would take "²" or "٣" (and ``int`` then fails or reads them as digits);
    only ASCII digits are ids here.
    """
    if not text.isascii() or not text.isdigit() or len(text) > len(str(MAX_ID)):
        return None
    value = int(text)
    if value < 1 or value > MAX_ID or str(value) != text:
        return None
    return value


def _is_user_id(text: str) -> bool:
    return len(text) <= MAX_USER_ID_LENGTH and _USER_ID.fullmatch(text) is not None


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
