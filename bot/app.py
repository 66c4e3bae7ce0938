"""Wiring: settings -> store -> (engine, chat adapters), started and stopped in order."""

from __future__ import annotations

import logging

from bot.errors import ConfigError, DishbotError
from bot.settings import Settings
from bot.store import Store
from bot.store.database import async_url, database_errors, is_sqlite
from bot.store.schema import ensure_schema

log = logging.getLogger(__name__)

TOKEN_VARIABLES = {"telegram": "DISHBOT_TELEGRAM__TOKEN", "discord": "DISHBOT_DISCORD__TOKEN"}


class NoChatPlatform(DishbotError):
    """`dishbot run` has nothing to run: no chat platform can be started."""


class App:
    """One running dishbot: its store and, once they exist, its engine and chat adapters."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def open_store(self) -> Store:
        """Open the store with its schema at head.

        SQLite, the embedded default, is upgraded in place. A PostgreSQL database may be
        shared by several processes, so it is upgraded only by an operator's explicit
        `dishbot db upgrade`; until then dishbot refuses to start.
        """
        url = self.settings.db_url
        store = Store.open(url, self.settings.data_dir)
        try:
            async with database_errors(url):
                revision = await ensure_schema(store.engine, auto_upgrade=is_sqlite(async_url(url)))
        except BaseException:
            await store.close()
            raise
        log.info("database schema at revision %s", revision)
        return store

    def configured_platforms(self) -> list[str]:
        """The chat platforms that have a token."""
        tokens = {"telegram": self.settings.telegram.token, "discord": self.settings.discord.token}
        return [name for name, token in tokens.items() if token is not None]

    async def run(self) -> None:
        """Run until stopped."""
        store = await self.open_store()
        try:
            platforms = self.configured_platforms()
            if not platforms:
                raise NoChatPlatform(
                    "no chat platform is configured: set "
                    + " or ".join(TOKEN_VARIABLES.values())
                    + " (or `token` under [telegram] / [discord] in dishbot.toml)"
                )
            raise ConfigError(
                f"{', '.join(platforms)} is configured, but this version of dishbot has no "
                "chat adapters yet"
            )
        finally:
            await store.close()
