"""Bringing a database to the schema this code needs, through Alembic and nothing else."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.errors import DatabaseUnavailable, SchemaOutdated

MIGRATIONS_DIR = Path(str(files("migrations")))


def alembic_config() -> Config:
    """An Alembic configuration pointing at dishbot's migrations, wherever it is installed."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    """The newest migration revision shipped with this code."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "dishbot ships at least one migration"
    return head


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or None for a database dishbot never touched."""
    async with engine.connect() as connection:
        return await connection.run_sync(_current_revision)


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply every migration up to ``revision``."""
    async with engine.begin() as connection:
        await connection.run_sync(_run_command, "upgrade", revision)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    """Undo migrations down to ``revision`` (``base`` removes the whole schema)."""
    async with engine.begin() as connection:
        await connection.run_sync(_run_command, "downgrade", revision)


def _is_known(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def _run_command(connection: Connection, name: str, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    getattr(command, name)(config, revision)


async def ensure_schema(engine: AsyncEngine, *, auto_upgrade: bool) -> str:
    """Make sure the schema is at head: upgrade it if allowed, else raise `SchemaOutdated`."""
    head = head_revision()
    current = await current_revision(engine)
    if current == head:
        return head
    if current is not None and not _is_known(current):
        raise DatabaseUnavailable(
            f"the database is at revision {current}, which this dishbot does not know; "
            "it was probably migrated by a newer version"
        )
    if not auto_upgrade:
        raise SchemaOutdated(current, head)
    await upgrade(engine)
    return head
