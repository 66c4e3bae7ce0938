"""The `dishbot` command as an operator uses it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.cli import main
from bot.store.database import open_engine
from bot.store.schema import current_revision, head_revision

POSTGRES_ONLY = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


def _dishbot(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script, as a person would."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("dishbot")), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


async def _revision(url: str) -> str | None:
    engine = open_engine(url)
    try:
        return await current_revision(engine)
    finally:
        await engine.dispose()


def test_help_lists_every_command() -> None:
    result = _dishbot("--help")

    assert result.returncode == 0
    for command in ("run", "config", "db"):
        assert command in result.stdout
    db_help = _dishbot("db", "--help")
    assert "upgrade" in db_help.stdout
    assert "current" in db_help.stdout


def test_db_upgrade_on_an_empty_directory_creates_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "fresh" / "data"
    monkeypatch.setenv("DISHBOT_DATA_DIR", str(data_dir))

    assert main(["db", "current"]) == 0
    assert "no database at" in capsys.readouterr().out
    assert not data_dir.exists()  # looking does not create it
    assert main(["db", "upgrade"]) == 0
    assert f"to revision {head_revision()} (head)" in capsys.readouterr().out

    assert (data_dir / "dishbot.db").is_file()
    assert main(["db", "current"]) == 0
    assert f"at revision {head_revision()} (head)" in capsys.readouterr().out
    assert main(["db", "upgrade"]) == 0
    assert "already at revision" in capsys.readouterr().out


async def test_db_upgrade_and_current_work_on_both_databases(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISHBOT_DATABASE_URL", database_url)

    result = _dishbot("db", "upgrade")

    assert result.returncode == 0, result.stderr
    assert await _revision(database_url) == head_revision()
    assert head_revision() in _dishbot("db", "current").stdout


def test_run_without_a_chat_token_says_which_token_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISHBOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DISHBOT_WEB__ENABLED", "false")  # else the web console is served

    assert main(["run"]) != 0

    error = capsys.readouterr().err
    last_line = error.strip().splitlines()[-1]
    assert last_line.startswith("dishbot: no chat platform is configured")
    assert "DISHBOT_TELEGRAM__TOKEN" in last_line
    assert "DISHBOT_DISCORD__TOKEN" in last_line
    assert "Traceback" not in error


@POSTGRES_ONLY
async def test_run_refuses_an_old_postgres_schema_and_names_the_command(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISHBOT_DATABASE_URL", database_url)

    result = _dishbot("run", env={"DISHBOT_TELEGRAM__TOKEN": "1:x"})

    assert result.returncode != 0
    assert "dishbot db upgrade" in result.stderr
    assert "Traceback" not in result.stderr
    assert await _revision(database_url) is None  # left for the operator to upgrade


def test_a_bad_setting_is_one_line_and_no_traceback() -> None:
    result = _dishbot("config", env={"DISHBOT_ENGINE__MAX_BATCH_SIZE": "lots"})

    assert result.returncode != 0
    assert result.stderr.count("\n") == 1
    assert "engine.max_batch_size" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_database_is_one_line_without_its_password() -> None:
    url = "postgresql://dishbot:pg-secret@127.0.0.1:9/dishbot"  # nothing listens on port 9

    result = _dishbot("db", "current", env={"DISHBOT_DATABASE_URL": url})

    assert result.returncode != 0
    assert result.stderr.startswith("dishbot: cannot use the database at ")
    assert result.stderr.count("\n") == 1
    assert "pg-secret" not in result.stderr


def test_output_piped_into_a_reader_that_stops_early_ends_quietly() -> None:
    # As `dishbot config | head -3` once head has its lines: the reader has closed the pipe.
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("dishbot")), "config"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    process.stdout.close()  # long before dishbot, still starting, writes anything
    _, error = process.communicate(timeout=60)

    assert error == ""
    assert process.returncode == 141  # as a shell reports cat or seq cut off the same way


def test_a_postgres_url_without_the_postgres_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # as if it were not installed
    monkeypatch.setenv("DISHBOT_DATABASE_URL", "postgresql://dishbot:pg-secret@127.0.0.1:9/db")

    assert main(["db", "current"]) == 1

    assert capsys.readouterr().err == (
        "dishbot: PostgreSQL needs the postgres extra: pip install 'dishbot[postgres]'\n"
    )
