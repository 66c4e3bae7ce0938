"""The database goes away for a while: users hear an apology, nothing is half-written, and
service resumes by itself when it is back."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from bot.core.dialog import Dialog, DialogConfig
from bot.core.events import PhotoFile, PhotoQuestion
from bot.core.i18n import say
from bot.errors import NotFound
from bot.store import Store, database
from bot.store.models import Exchange, ExchangeStatus, Photo
from bot.store.schema import upgrade
from engine.engine import Engine
from engine.types import ModelSpec
from tests.factories import jpeg_bytes
from tests.recording_port import GUARD_S, RecordingPort, person, private_chat
from tests.scripted_backend import ScriptedBackend

START_POSTGRES = Path(__file__).resolve().parent.parent / ".ci" / "start-postgres"
APOLOGY = say("store_unavailable", "en")


@contextlib.asynccontextmanager
async def serving(store: Store) -> AsyncIterator[Dialog]:
    engine = Engine(ScriptedBackend(step_s=0.02), ModelSpec("scripted", "dishbot-test"))
    async with engine:
        yield Dialog(store, engine, DialogConfig(edit_interval_s=0.01, questions_per_minute=60))


async def ask(
    dialog: Dialog,
    port: RecordingPort,
    user: str,
    message: str,
    colour: int,
    text: str = "what is it?",
) -> str:
    """Ask about a photo as ``user`` and return what the bot last said in reply."""

    async def download() -> bytes:
        return jpeg_bytes((colour, 40, 80))

    who, where = person(user), private_chat(user)
    question = PhotoQuestion(who, where, message, PhotoFile(download), text)
    await asyncio.wait_for(dialog.handle(question, port), GUARD_S)
    return port.texts(user)[-1]


def answered(reply: str) -> bool:
    return "dishbot-test says" in reply


async def stored(store: Store) -> tuple[list[tuple[str | None, ExchangeStatus]], list[str]]:
    """Every exchange (its question message and status) and every stored photo's path."""
    async with store.engine.connect() as connection:
        exchanges = (
            await connection.execute(
                select(Exchange.question_message_id, Exchange.status).order_by(Exchange.id)
            )
        ).all()
        photos = (await connection.scalars(select(Photo.path))).all()
        return [(m, s) for m, s in exchanges], list(photos)


def photo_files(data_dir: Path) -> list[str]:
    root = data_dir / "photos"
    return sorted(str(p.relative_to(data_dir)) for p in root.rglob("*") if p.is_file())


# -- SQLite locked by another writer -----------------------------------------------------------


async def test_sqlite_locked_by_another_writer_gets_an_apology_then_answers_again(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "SQLITE_BUSY_TIMEOUT_MS", 200)
    db_file = data_dir / "dishbot.db"
    store = Store.open(f"sqlite+aiosqlite:///{db_file}", data_dir)
    await upgrade(store.engine)
    port = RecordingPort()
    # Another process (a backup, an export) holds SQLite's one write lock for a long time.
    other_writer = sqlite3.connect(db_file, isolation_level=None)
    try:
        async with serving(store) as dialog:
            other_writer.execute("BEGIN IMMEDIATE")
            assert await ask(dialog, port, "1", "m1", colour=10) == APOLOGY
            other_writer.execute("ROLLBACK")
            assert answered(await ask(dialog, port, "1", "m2", colour=20))
        exchanges, photos = await stored(store)
    finally:
        other_writer.close()
        await store.close()

    assert exchanges == [("m2", ExchangeStatus.ANSWERED)], "nothing of the first was written"
    assert photo_files(data_dir) == sorted(photos)
    assert len(photos) == 1


# -- PostgreSQL restarted under load --------------------------------------------------------


@dataclass
class ThrowAwayPostgres:
    """A PostgreSQL server of the test's own, which it may stop and start."""

    data: Path
    url: str
    pg_ctl: str

    def _pg_ctl(self, *args: str) -> None:
        run_as = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
        command = [*run_as, self.pg_ctl, "-D", str(self.data), "-w", *args]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")

    def start(self) -> None:
        # As .ci/start-postgres started it: pg_ctl keeps no options of its own across a stop.
        port = make_url(self.url).port
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {self.data} -c fsync=off"
        self._pg_ctl("-l", str(self.data / "server.log"), "-o", options, "start")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def own_postgres() -> Iterator[ThrowAwayPostgres]:
    bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bindirs:
        pytest.skip("the PostgreSQL server binaries are not installed")
    pg_ctl = str(Path(bindirs[-1]).with_name("pg_ctl"))
    root = Path(tempfile.mkdtemp(prefix="dishbot-pg-"))
    root.chmod(0o755)  # the server runs as postgres when the tests run as root
    data = root / "data"
    started = subprocess.run(
        [str(START_POSTGRES), str(data), str(_free_port())],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    server = ThrowAwayPostgres(data, started.stdout.strip(), pg_ctl)
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            server._pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


async def test_postgresql_restarted_under_load_gets_apologies_then_answers_without_restart(
    own_postgres: ThrowAwayPostgres, data_dir: Path
) -> None:
    url = make_url(own_postgres.url).set(drivername="postgresql+asyncpg")
    store = Store.open(url.render_as_string(hide_password=False), data_dir)
    await upgrade(store.engine)
    port = RecordingPort()
    try:
        async with serving(store) as dialog:
            assert answered(await ask(dialog, port, "1", "m1", colour=10))
            # Under load: questions are being answered when the server goes down.
            in_flight = [
                asyncio.create_task(ask(dialog, port, f"busy{n}", "s1", 100 + 40 * n, "slow one"))
                for n in range(3)
            ]
            await port.until(lambda: all(port.texts(f"busy{n}") for n in range(3)))

            own_postgres.stop()
            for reply in await asyncio.gather(*in_flight):
                # The answer could not be stored: an apology (the recovery of such answers
                # is the crash-recovery's part), never silence or a crash.
                assert reply == APOLOGY or answered(reply)
            # Several users ask while it is down: each hears the apology, the bot carries on.
            replies = await asyncio.gather(
                *(ask(dialog, port, str(user), "m2", colour=user) for user in range(2, 7))
            )
            assert replies == [APOLOGY] * 5

            own_postgres.start()
            # The pool's connections died with the server: new ones are made, no restart.
            assert answered(await ask(dialog, port, "1", "m3", colour=30))
            assert answered(await ask(dialog, port, "2", "m4", colour=40))
        exchanges, photos = await stored(store)
    finally:
        await store.close()

    asked_at_rest = [(m, status) for m, status in exchanges if m != "s1"]
    assert asked_at_rest == [
        ("m1", ExchangeStatus.ANSWERED),
        ("m3", ExchangeStatus.ANSWERED),
        ("m4", ExchangeStatus.ANSWERED),
    ]
    assert photo_files(data_dir) == sorted(photos), "every file has its row and every row its file"
    assert len(photos) == 6


async def test_a_statement_the_database_refuses_is_not_taken_for_an_outage(store: Store) -> None:
    # A constraint violation is a bug or a race, not the database being away: it keeps its
    # own error (and the generic apology), so an operator is not sent to check the server.
    with pytest.raises(NotFound):
        await store.start_exchange(user_id=999_999, platform="telegram", chat_id="1", question="?")
    for statement, parameters in [
        ("SELECT * FROM no_such_table", {}),
        ("SELECT :value", {"value": object()}),  # a parameter the driver cannot send
    ]:
        with pytest.raises(DBAPIError) as raised:
            async with store.engine.connect() as connection:
                await connection.execute(text(statement), parameters)
        assert not database.is_connection_failure(raised.value), statement
