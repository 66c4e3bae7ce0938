"""Errors of the training export, each a sentence an admin can act on."""

from __future__ import annotations

from bot.errors import DishbotError


class ExportError(DishbotError):
    """The export cannot run as asked: a bad output directory, date or option."""
