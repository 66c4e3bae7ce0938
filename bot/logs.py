"""Log set-up: one format, and no secret ever reaches a log line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

REDACTED = "***"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactingFormatter(logging.Formatter):
    """Formats a record, then replaces every known secret in the text, tracebacks included.

    Libraries log URLs with tokens in them (the Telegram Bot API puts the token in the
    path), so scrubbing the finished line is the only place that catches them all.
    """

    def __init__(self, secrets: Iterable[str], fmt: str = LOG_FORMAT) -> None:
        super().__init__(fmt)
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text


def configure_logging(level: str, secrets: Iterable[str], stream: object = None) -> None:
    """Send every logger's records to stderr (or ``stream``) through the redacting formatter."""
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(RedactingFormatter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request URL at INFO, and Telegram's URLs carry the token;
    # alembic narrates every connection it configures.
    for chatty in ("httpx", "alembic"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
