"""Opening the database: URL normalisation and per-dialect connection set-up."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bot.errors import ConfigError, DatabaseUnavailable
from bot.settings import redact_url

# A plain `postgresql://` or `sqlite://` URL gets the async driver dishbot ships with.
_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}
# How long an SQLite write waits for another process's write (a backup, `dishbot export`)
# before giving up: long enough to ride out a short one, short enough that a user waiting on
# it hears an apology instead of silence. Writes of this process queue in the Store instead.
SQLITE_BUSY_TIMEOUT_MS = 10_000
# asyncpg's errors for a connection that is gone, refused or being shut down (by class name,
# so this module imports without the postgres extra).
_ASYNCPG_CONNECTION_ERRORS = frozenset(
    {
        "PostgresConnectionError",
        "ConnectionDoesNotExistError",
        "AdminShutdownError",
        "CrashShutdownError",
        "CannotConnectNowError",
        "TooManyConnectionsError",
    }
)
_SQLITE_UNAVAILABLE = ("database is locked", "database is busy", "unable to open", "disk i/o")


def async_url(url: str) -> URL:
    """Parse ``url`` and give it an async driver if it names none."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError("database_url is not a valid database URL") from None
    driver = _ASYNC_DRIVERS.get(parsed.drivername)
    if driver:
        parsed = parsed.set(drivername=driver)
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"database_url: {parsed.get_backend_name()} is not supported; use sqlite or postgresql"
        )
    return parsed


def missing_sqlite_file(url: str) -> Path | None:
    """The file of an SQLite URL if it does not exist yet (None for anything else)."""
    parsed = async_url(url)
    if not is_sqlite(parsed) or not parsed.database or parsed.database == ":memory:":
        return None
    path = Path(parsed.database)
    return None if path.exists() else path


def is_sqlite(url: URL) -> bool:
    """Whether ``url`` names an SQLite database."""
    return url.get_backend_name() == "sqlite"


def open_engine(url: str, **engine_options: Any) -> AsyncEngine:
    """An async engine for ``url``; an SQLite file's directory is created if missing."""
    parsed = async_url(url)
    if not is_sqlite(parsed):
        try:
            return create_async_engine(parsed, pool_pre_ping=True, **engine_options)
        except ModuleNotFoundError as error:
            if error.name != "asyncpg":
                raise
            raise ConfigError(
                "PostgreSQL needs the postgres extra: pip install 'dishbot[postgres]'"
            ) from None
    if parsed.database and parsed.database != ":memory:":
        folder = Path(parsed.database).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the database folder {folder}: {exc.strerror}"
            ) from None
    engine = create_async_engine(parsed, **engine_options)
    event.listen(engine.sync_engine, "connect", _configure_sqlite_connection)
    event.listen(engine.sync_engine, "begin", _begin_sqlite_transaction)
    return engine


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run beside the writer; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()
    # Python's sqlite3 begins transactions only before DML, so a migration's CREATE TABLEs
    # would each commit alone and a failed one would leave half a schema. Let SQLAlchemy
    # begin every transaction itself instead ("begin" below).
    dbapi_connection.isolation_level = None


def _begin_sqlite_transaction(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN")


@contextlib.asynccontextmanager
async def database_errors(url: str) -> AsyncIterator[None]:
    """Turn a failure to reach the database into one `DatabaseUnavailable` line."""
    try:
        yield
    except (DBAPIError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise DatabaseUnavailable(
            f"cannot use the database at {redact_url(url)}: {reason}"
        ) from exc


def is_connection_failure(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) says the database could not be used at all, as
    opposed to refusing this statement: such a failure may pass by itself."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _names_a_lost_connection(current):
            return True
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return False


def _names_a_lost_connection(error: BaseException) -> bool:
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    # Not InterfaceError as such: sqlite3 and asyncpg raise it for a bad parameter too.
    if isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    if isinstance(error, sqlite3.OperationalError):
        return any(words in str(error).lower() for words in _SQLITE_UNAVAILABLE)
    return any(
        cls.__module__.startswith("asyncpg") and cls.__name__ in _ASYNCPG_CONNECTION_ERRORS
        for cls in type(error).__mro__
    )
