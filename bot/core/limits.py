"""Platform limits, named once. Adapters pass the ones that apply to core code."""

from __future__ import annotations

from typing import Final

TELEGRAM_MESSAGE_LENGTH: Final = 4096  # UTF-16 code units of text, after entity parsing
TELEGRAM_CAPTION_LENGTH: Final = 1024
TELEGRAM_CALLBACK_DATA_BYTES: Final = 64
TELEGRAM_BOT_DOWNLOAD_BYTES: Final = 20 * 1024 * 1024  # getFile refuses bigger files
DISCORD_MESSAGE_LENGTH: Final = 2000  # characters
DISCORD_CUSTOM_ID_LENGTH: Final = 100
DISCORD_ACK_SECONDS: Final = 3.0  # an interaction must be acknowledged within this
