"""Shared fixtures: a fresh database per test on SQLite and on PostgreSQL, and a clean env.

PostgreSQL runs when DISHBOT_TEST_POSTGRES_URL names a server the tests may create
databases on (`.ci/start-postgres` starts one). With DISHBOT_TEST_REQUIRE_POSTGRES=1, as
in CI, a missing server fails the PostgreSQL half instead of skipping it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from bot.store import Store
from bot.store.schema import upgrade
from tests.tiny_model import build_tiny_internvl

os.environ.setdefault("HF_HUB_OFFLINE", "1")

POSTGRES_URL = os.environ.get("DISHBOT_TEST_POSTGRES_URL")
REQUIRE_POSTGRES = os.environ.get("DISHBOT_TEST_REQUIRE_POSTGRES") == "1"
DATABASES = ["sqlite", "postgresql"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No DISHBOT_* setting or dishbot.toml from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("DISHBOT_") and not name.startswith("DISHBOT_TEST_"):
            monkeypatch.delenv(name)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)


def _postgres_admin_url() -> str:
    if POSTGRES_URL:
        return POSTGRES_URL
    if REQUIRE_POSTGRES:
        pytest.fail("DISHBOT_TEST_REQUIRE_POSTGRES=1 but DISHBOT_TEST_POSTGRES_URL is not set")
    pytest.skip("set DISHBOT_TEST_POSTGRES_URL to run the PostgreSQL half")


async def _postgres_admin(sql: str) -> None:
    import asyncpg

    url = make_url(_postgres_admin_url()).set(drivername="postgresql")
    connection = await asyncpg.connect(url.render_as_string(hide_password=False))
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to a new, empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'data' / 'dishbot.db'}"
        return
    admin_url = make_url(_postgres_admin_url())
    name = f"dishbot_test_{uuid.uuid4().hex[:16]}"
    asyncio.run(_postgres_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(drivername="postgresql+asyncpg", database=name).render_as_string(
            hide_password=False
        )
    finally:
        asyncio.run(_postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def tiny_internvl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight InternVL checkpoint with its tokenizer, built once per session."""
    return build_tiny_internvl(tmp_path_factory.mktemp("tiny-internvl"))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
async def store(database_url: str, data_dir: Path) -> AsyncIterator[Store]:
    """A store on a freshly migrated database."""
    store = Store.open(database_url, data_dir)
    await upgrade(store.engine)
    try:
        yield store
    finally:
        await store.close()
