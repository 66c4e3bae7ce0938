"""The schema comes from Alembic migrations, the same ones on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from bot.store.database import open_engine
from bot.store.models import Base
from bot.store.schema import current_revision, downgrade, head_revision, upgrade

SCHEMA_TABLES = set(Base.metadata.tables)


def _table_names(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names()) - {"alembic_version"}


def _differences_from_models(connection: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


async def test_migrations_upgrade_to_head_and_downgrade_to_base(database_url: str) -> None:
    engine = open_engine(database_url)
    try:
        assert await current_revision(engine) is None

        await upgrade(engine)
        assert await current_revision(engine) == head_revision()
        async with engine.connect() as connection:
            assert await connection.run_sync(_table_names) == SCHEMA_TABLES

        await downgrade(engine, "base")
        assert await current_revision(engine) is None
        async with engine.connect() as connection:
            assert await connection.run_sync(_table_names) == set()

        await upgrade(engine)  # and back up again, as after a rollback of a release
        assert await current_revision(engine) == head_revision()
    finally:
        await engine.dispose()


async def test_migrated_schema_matches_the_orm_models(database_url: str) -> None:
    engine = open_engine(database_url)
    try:
        await upgrade(engine)
        async with engine.connect() as connection:
            assert await connection.run_sync(_differences_from_models) == []
    finally:
        await engine.dispose()


async def test_a_migration_that_fails_half_way_leaves_no_half_schema(database_url: str) -> None:
    engine = open_engine(database_url)
    try:
        async with engine.begin() as connection:  # a leftover table in the way
            await connection.exec_driver_sql("CREATE TABLE ratings (x INTEGER)")

        with pytest.raises(DBAPIError):
            await upgrade(engine)

        async with engine.connect() as connection:
            assert await connection.run_sync(_table_names) == {"ratings"}
        assert await current_revision(engine) is None
        async with engine.begin() as connection:
            await connection.exec_driver_sql("DROP TABLE ratings")
        await upgrade(engine)  # and once it is out of the way, the upgrade goes through
        assert await current_revision(engine) == head_revision()
    finally:
        await engine.dispose()
