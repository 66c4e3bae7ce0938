"""Errors the bot raises on purpose. Each carries a message fit to show a person."""

from __future__ import annotations


class DishbotError(Exception):
    """Base of every expected failure; `str(error)` is a complete, user-facing sentence."""


class ConfigError(DishbotError):
    """The settings are missing, malformed or contradictory."""


class DatabaseUnavailable(DishbotError):
    """The database cannot be reached or opened."""


class StoreUnavailable(DatabaseUnavailable):
    """While serving, the database could not be used (connection lost or refused, a server
    restarting, SQLite locked by another writer past the busy timeout). Nothing of the failed
    call was written; the same call may succeed a moment later."""


class SchemaOutdated(DishbotError):
    """The database schema is not at the revision this version of dishbot needs."""

    def __init__(self, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        found = f"revision {current}" if current else "no dishbot schema"
        super().__init__(
            f"the database has {found}, this dishbot needs {head}; run `dishbot db upgrade` first"
        )


class NotFound(DishbotError):
    """A row the caller named does not exist."""


class AlreadyAsked(DishbotError):
    """A question whose message was stored before: a redelivered update, or an edit."""

    def __init__(self, exchange_id: int) -> None:
        self.exchange_id = exchange_id
        super().__init__(f"that message was asked already (exchange {exchange_id})")


class AlreadyAnswered(DishbotError):
    """An answered question was about to get another answer; the first one stands."""

    def __init__(self, exchange_id: int) -> None:
        self.exchange_id = exchange_id
        super().__init__(f"exchange {exchange_id} is answered already")
