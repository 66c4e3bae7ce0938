"""The schema comes from Alembic migrations, the same ones on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

from bot.store.database import open_engine
from bot.store.models import Base
from bot.store.schema import current_revision, downgrade, head_revision, upgrade

SCHEMA_TABLES = set(Base.metadata.tables)
NOW = datetime(2026, 12, 1, tzinfo=UTC)


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


async def test_0003_keeps_old_runs_and_versions_and_allows_one_running_run(
    database_url: str,
) -> None:
    engine = open_engine(database_url)
    try:
        await upgrade(engine, "0002")
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO model_versions (id, name, path, metrics, is_active, created_at) "
                    "VALUES (1, 'base', '/m/base', '{}', true, :now), "
                    "(2, 'old', '/m/old', '{}', false, :now)"
                ),
                {"now": NOW},
            )
            await connection.execute(
                text(
                    "INSERT INTO training_runs (id, status, parameters, metrics, created_at) "
                    "VALUES (1, 'succeeded', '{}', '{}', :now), (2, 'running', '{}', '{}', :now), "
                    "(3, 'queued', '{}', '{}', :now)"
                ),
                {"now": NOW},
            )

        await upgrade(engine)

        async with engine.begin() as connection:
            runs = (
                await connection.execute(
                    text("SELECT id, stage, is_running, error FROM training_runs ORDER BY id")
                )
            ).all()
            assert [(r.id, r.stage, bool(r.is_running)) for r in runs] == [
                (1, "done", False),
                (2, "failed", False),
                (3, "failed", False),
            ]
            assert runs[1].error
            assert "0003" in runs[1].error
            history = (
                await connection.execute(text("SELECT model_version_id FROM model_activations"))
            ).all()
            assert [row.model_version_id for row in history] == [1]
            insert_running = text(
                "INSERT INTO training_runs (id, stage, is_running, force, dry_run, parameters, "
                "progress, notes, created_at, updated_at) "
                "VALUES (:id, 'training', true, false, false, '{}', '{}', '[]', :now, :now)"
            )
            await connection.execute(insert_running, {"id": 4, "now": NOW})
        async with engine.begin() as connection:
            with pytest.raises(IntegrityError):  # a second running run
                await connection.execute(insert_running, {"id": 5, "now": NOW})

        await downgrade(engine, "0002")

        async with engine.connect() as connection:
            statuses = (
                await connection.execute(text("SELECT id, status FROM training_runs ORDER BY id"))
            ).all()
        assert [tuple(row) for row in statuses] == [
            (1, "succeeded"),
            (2, "failed"),
            (3, "failed"),
            (4, "running"),
        ]
    finally:
        await engine.dispose()
