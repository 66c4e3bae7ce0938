"""Platform limits, named once. Adapters pass the ones that apply to core code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

TELEGRAM_MESSAGE_LENGTH: Final = 4096  # UTF-16 code units of text, after entity parsing
TELEGRAM_CAPTION_LENGTH: Final = 1024
TELEGRAM_CALLBACK_DATA_BYTES: Final = 64
TELEGRAM_BOT_DOWNLOAD_BYTES: Final = 20 * 1024 * 1024  # getFile refuses bigger files
DISCORD_MESSAGE_LENGTH: Final = 2000  # characters
DISCORD_CUSTOM_ID_LENGTH: Final = 100
DISCORD_ACK_SECONDS: Final = 3.0  # an interaction must be acknowledged within this


@dataclass(frozen=True, slots=True)
class CallLimit:
    """At most ``calls`` calls in any ``per_s`` seconds."""

    calls: int
    per_s: float


# How many calls a bot may make to one chat, and to the platform overall, before it is told
# to wait (a 429). Typing actions, edits and button changes count like messages.
TELEGRAM_GROUP_CALLS: Final = CallLimit(20, 60.0)
# Telegram asks for "about one message a second" in a private chat and tolerates short bursts.
TELEGRAM_PRIVATE_CALLS: Final = CallLimit(5, 5.0)
TELEGRAM_OVERALL_CALLS: Final = CallLimit(30, 1.0)
DISCORD_CHANNEL_CALLS: Final = CallLimit(5, 5.0)
DISCORD_OVERALL_CALLS: Final = CallLimit(50, 1.0)
