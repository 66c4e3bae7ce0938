"""`dishbot export` as an operator runs it: options, progress on stderr, summary on stdout."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pexpect
import pytest

from bot.cli import main
from bot.store import Store
from bot.store.schema import upgrade
from bot.training import ExportError, parse_moment
from bot.training.export.progress import TerminalProgress
from tests.factories import add_photo, add_user, answered, backdate


async def _populate(data_dir: Path) -> None:
    """Three liked answers (March, April, May 2025), one unrated, one corrected by an admin."""
    store = Store.open(f"sqlite+aiosqlite:///{data_dir / 'dishbot.db'}", data_dir)
    await upgrade(store.engine)
    try:
        asker = await add_user(store, "1")
        admin = await add_user(store, "900")
        for month in (3, 4, 5):
            exchange = await answered(
                store, asker, photo=await add_photo(store, color=(month * 40, 0, 0))
            )
            await backdate(store, exchange, datetime(2025, month, 15, tzinfo=UTC))
            await store.record_rating(exchange.id, asker.id, 1)
        await answered(store, asker, photo=await add_photo(store, color=(0, 200, 0)))
        corrected = await answered(store, asker, photo=await add_photo(store, color=(0, 0, 200)))
        await backdate(store, corrected, datetime(2025, 4, 20, tzinfo=UTC))
        await store.record_correction(corrected.id, admin.id, "肠粉")
    finally:
        await store.close()


@pytest.fixture
def populated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory with a small database, named by DISHBOT_DATA_DIR; admin telegram:900."""
    data_dir = tmp_path / "data"
    asyncio.run(_populate(data_dir))
    monkeypatch.setenv("DISHBOT_DATA_DIR", str(data_dir))
    monkeypatch.setenv("DISHBOT_ADMINS", "telegram:900")
    return data_dir


def _records(out_dir: Path) -> list[dict[str, Any]]:
    text = "".join((out_dir / n).read_text(encoding="utf-8") for n in ("train.jsonl", "val.jsonl"))
    return [json.loads(line) for line in text.splitlines()]


def test_export_writes_the_dataset_reports_progress_and_prints_the_summary(
    populated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "dataset"

    assert main(["export", "--out", str(out)]) == 0

    captured = capsys.readouterr()
    assert captured.out.startswith("Exported 4 samples (")
    assert "Held back: 1 unrated." in captured.out
    assert f"Train: cd {out} && python -m xtuner.tools.train xtuner_config.py" in captured.out
    progress = captured.err.splitlines()
    assert progress[0] == "export: 0% (0/5 exchanges)"
    assert progress[-1] == "export: 100% (5/5 exchanges)"
    assert len(_records(out)) == 4
    assert (out / "manifest.json").is_file()


def test_export_options_filter_split_and_count(
    populated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "april"

    status = main(
        [
            "export",
            "--out",
            str(out),
            "--since",
            "2025-04-01",
            "--until",
            "2025-04-30",  # a bare date includes the whole day
            "--val-fraction",
            "0",
            "--min-votes",
            "1",
            "--no-include-unrated",
        ]
    )

    assert status == 0, capsys.readouterr().err
    answers = sorted(r["conversations"][1]["value"] for r in _records(out))
    assert answers == ["叉烧 (char siu)", "这是肠粉。"]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["filters"]["since"] == "2025-04-01T00:00:00+00:00"
    assert manifest["filters"]["until"] == "2025-05-01T00:00:00+00:00"
    assert manifest["filters"]["val_fraction"] == 0.0
    assert (out / "val.jsonl").read_text(encoding="utf-8") == ""


def test_a_higher_min_votes_on_the_command_line_holds_back_single_likes(
    populated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "--out", str(tmp_path / "strict"), "--min-votes", "2"]) == 0

    assert "3 too few votes" in capsys.readouterr().out
    assert len(_records(tmp_path / "strict")) == 1  # the admin's correction only


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        (["--since", "last tuesday"], "'last tuesday' is not a date"),
        (["--since", "2025-05-01", "--until", "2025-04-01"], "since must be before until"),
        (["--val-fraction", "1.5"], "validation fraction must be at least 0 and below 1"),
        (["--min-votes", "0"], "min votes must be at least 1"),
    ],
)
def test_a_bad_option_is_one_line_without_a_traceback(
    populated: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    complaint: str,
) -> None:
    assert main(["export", "--out", str(tmp_path / "out"), *arguments]) == 1

    error = capsys.readouterr().err
    assert error.startswith("dishbot: ")
    assert complaint in error
    assert error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_directory_it_did_not_write_in_one_line(
    populated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# mine", encoding="utf-8")

    assert main(["export", "--out", str(home)]) == 1

    error = capsys.readouterr().err
    assert error.strip() == (
        f"dishbot: {home} is not empty and was not written by `dishbot export`; "
        "give a new or empty directory"
    )
    assert [p.name for p in home.iterdir()] == [".bashrc"]


def test_export_without_a_database_says_so_and_creates_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISHBOT_DATA_DIR", str(tmp_path / "nothing"))

    assert main(["export", "--out", str(tmp_path / "out")]) == 1

    assert "no database at" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_export_in_a_terminal_draws_a_progress_bar(populated: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dishbot = str(Path(sys.executable).with_name("dishbot"))
    session = pexpect.spawn(
        dishbot,
        ["export", "--out", str(out)],
        env={**os.environ, "DISHBOT_DATA_DIR": str(populated), "DISHBOT_ADMINS": "telegram:900"},
        encoding="utf-8",
        timeout=60,
    )
    session.expect(pexpect.EOF)
    session.close()

    assert session.exitstatus == 0, session.before
    screen = session.before
    assert "\r[" + "#" * 30 + "] 100%  5/5 exchanges" in screen
    assert "Exported 4 samples" in screen


# -- the pieces --------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_redraws_in_place_at_most_ten_times_a_second() -> None:
    now = [0.0]
    terminal = _Terminal()
    progress = TerminalProgress(terminal, clock=lambda: now[0])

    progress(0, 200)
    progress(50, 200)  # too soon after the last draw: skipped
    now[0] = 0.5
    progress(100, 200)
    progress(200, 200)  # the end is always drawn
    progress.close()

    assert terminal.getvalue() == (
        "\r[..............................]   0%  0/200 exchanges"
        "\r[###############...............]  50%  100/200 exchanges"
        "\r[##############################] 100%  200/200 exchanges\n"
    )


def test_without_a_terminal_progress_is_a_plain_line_every_ten_percent() -> None:
    log = io.StringIO()
    progress = TerminalProgress(log)

    for done in range(0, 1001, 25):
        progress(done, 1000)
    progress.close()

    lines = log.getvalue().splitlines()
    assert len(lines) == 11
    assert lines[0] == "export: 0% (0/1,000 exchanges)"
    assert lines[5] == "export: 50% (500/1,000 exchanges)"
    assert "\r" not in log.getvalue()


@pytest.mark.parametrize(
    ("text", "end_of_day", "moment"),
    [
        ("2025-04-01", False, datetime(2025, 4, 1, tzinfo=UTC)),
        ("2025-04-30", True, datetime(2025, 5, 1, tzinfo=UTC)),
        ("2025-04-30T18:00", True, datetime(2025, 4, 30, 18, tzinfo=UTC)),
        ("2025-04-30T18:00+08:00", False, datetime(2025, 4, 30, 10, tzinfo=UTC)),
        ("2025-04-30T10:00:00Z", False, datetime(2025, 4, 30, 10, tzinfo=UTC)),
    ],
)
def test_dates_are_a_day_or_an_iso_time_in_utc(
    text: str, end_of_day: bool, moment: datetime
) -> None:
    assert parse_moment(text, end_of_day=end_of_day) == moment


def test_a_date_that_is_not_one_is_refused() -> None:
    with pytest.raises(ExportError, match="YYYY-MM-DD"):
        parse_moment("2025-13-01")
