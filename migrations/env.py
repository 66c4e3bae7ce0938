"""Alembic environment for dishbot.

dishbot runs migrations itself (`dishbot db upgrade`, or `dishbot run` on SQLite) and
hands its own connection in through ``config.attributes["connection"]``. The plain
`alembic` command works too: it reads ``sqlalchemy.url`` from alembic.ini if set, else
dishbot's settings (DISHBOT_DATABASE_URL, dishbot.toml).
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from bot.store.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(**options: object) -> None:
    # Batch mode lets later migrations alter SQLite tables (copy-and-move).
    context.configure(target_metadata=target_metadata, render_as_batch=True, **options)


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from bot.settings import load_settings

    return load_settings().db_url


def run_migrations_offline() -> None:
    """Write the SQL to stdout instead of running it (`alembic upgrade head --sql`)."""
    from bot.store.database import async_url

    _configure(url=async_url(_database_url()), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine() -> None:
    from bot.store.database import open_engine

    engine = open_engine(_database_url())
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_run_on)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
    else:
        asyncio.run(_run_with_own_engine())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
