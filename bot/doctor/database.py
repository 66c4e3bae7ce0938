"""The database: reachable, and at a schema revision `dishbot run` can start on."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from alembic.script import ScriptDirectory
from alembic.util import CommandError

from bot.doctor.context import Context
from bot.doctor.findings import Finding, fail, ok, with_fix
from bot.doctor.probes import nearest_existing
from bot.doctor.runner import NETWORK_TIMEOUT_S
from bot.errors import ConfigError, DatabaseUnavailable
from bot.settings import redact_url
from bot.store.database import (
    async_url,
    database_errors,
    is_sqlite,
    missing_sqlite_file,
    open_engine,
)
from bot.store.schema import alembic_config, current_revision, head_revision

UPGRADE = "run `dishbot db upgrade`"
SET_URL = "check DISHBOT_DATABASE_URL"


async def check_database(context: Context) -> Finding:
    """The database line: where it is, its revision against the newest, and what to do."""
    url = context.settings.db_url
    try:
        sqlite = is_sqlite(async_url(url))
        missing = missing_sqlite_file(url)
    except ConfigError as exc:
        return fail("database", with_fix(str(exc), "set DISHBOT_DATABASE_URL"))
    if missing is not None:
        return _not_yet_created(missing)
    where = redact_url(url)
    head = head_revision()
    try:
        revision = await _revision(url)
    except (DatabaseUnavailable, ConfigError) as exc:
        return fail("database", with_fix(str(exc), SET_URL))
    if revision == head:
        return ok("database", f"{where} at revision {head} (the newest)")
    if revision is not None and not _is_known(revision):
        problem = f"{where} is at revision {revision}, which this dishbot does not know"
        return fail("database", with_fix(problem, "a newer dishbot migrated it: upgrade dishbot"))
    found = f"at revision {revision}" if revision else "empty (no dishbot schema)"
    if sqlite:
        return ok("database", f"{where} {found}, newest is {head}: upgraded at first run")
    return fail("database", with_fix(f"{where} is {found}, newest is {head}", UPGRADE))


async def _revision(url: str) -> str | None:
    engine = open_engine(url)
    try:
        async with asyncio.timeout(NETWORK_TIMEOUT_S), database_errors(url):
            return await current_revision(engine)
    except TimeoutError:  # a server that accepts connections but never answers
        raise DatabaseUnavailable(
            f"the database at {redact_url(url)} did not answer within {NETWORK_TIMEOUT_S:g} s"
        ) from None
    finally:
        await engine.dispose()


def _is_known(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def _not_yet_created(path: Path) -> Finding:
    """A missing SQLite file is fine when its folder can be made and written to."""
    folder = nearest_existing(path.parent)
    if not os.access(folder, os.W_OK | os.X_OK):
        problem = f"cannot create {path}: {folder} is not writable"
        return fail("database", with_fix(problem, "set DISHBOT_DATA_DIR to a writable folder"))
    return ok("database", f"SQLite at {path}: will be created at first run")
