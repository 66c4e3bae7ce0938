"""`dishbot chat`: the console adapter, offline with a tiny model."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from bot.adapters.console import chat
from bot.settings import load_settings
from engine.engine import Engine, Request, RequestHandle
from tests.factories import jpeg_bytes

DISHBOT = str(Path(sys.executable).with_name("dishbot"))


@pytest.fixture
def tiny_model_env(tiny_internvl: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "HF_HUB_OFFLINE": "1",
        "DISHBOT_ENGINE__BACKEND": "transformers",
        "DISHBOT_ENGINE__MODEL": str(tiny_internvl),
        "DISHBOT_ENGINE__DEVICE": "cpu",
        "DISHBOT_ENGINE__MAX_NEW_TOKENS": "12",
        "DISHBOT_LOG_LEVEL": "WARNING",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "char_siu.jpg"
    path.write_bytes(jpeg_bytes(size=(800, 600)))
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DISHBOT, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_chat_answers_a_photo_offline_with_the_tiny_model(
    tiny_model_env: dict[str, str], photo: Path
) -> None:
    result = _run("chat", str(photo), "这是什么菜？")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() != ""
    assert result.stdout.endswith("\n")
    assert "Traceback" not in result.stderr


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    cases: dict[str, tuple[Path, str]] = {}
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    cases["empty"] = (empty, "the file is empty")
    text = tmp_path / "notes.jpg"
    text.write_text("char siu, 2 portions", encoding="utf-8")
    cases["text"] = (text, "not a JPEG, PNG, WebP or HEIC image")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg_bytes(size=(800, 600))[:1500])
    cases["truncated"] = (truncated, "truncated or corrupt")
    gif = tmp_path / "dance.gif"
    gif.write_bytes(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")
    cases["gif"] = (gif, "not a JPEG, PNG, WebP or HEIC image")
    huge = tmp_path / "huge.jpg"
    with huge.open("wb") as handle:  # sparse: 21 MB on paper, nothing on disk
        handle.truncate(21 * 1024 * 1024)
    cases["too large"] = (huge, "larger than 20 MB")
    cases["missing"] = (tmp_path / "nowhere.jpg", "does not exist")
    cases["directory"] = (tmp_path, "is a directory")
    return cases


@pytest.mark.parametrize(
    "case", ["empty", "text", "truncated", "gif", "too large", "missing", "directory"]
)
def test_chat_rejects_a_bad_image_with_one_clear_line(
    case: str, tiny_model_env: dict[str, str], tmp_path: Path
) -> None:
    path, reason = _bad_files(tmp_path)[case]

    result = _run("chat", str(path), "?")

    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dishbot: ")
    assert reason in lines[0]


async def test_follow_up_questions_carry_the_conversation_so_far(
    tiny_model_env: dict[str, str], photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted: list[Request] = []
    original_submit = Engine.submit

    async def recording_submit(self: Engine, request: Request) -> RequestHandle:
        submitted.append(request)
        return await original_submit(self, request)

    monkeypatch.setattr(Engine, "submit", recording_submit)
    out = io.StringIO()

    await chat(
        load_settings(),
        photo,
        "这是什么菜？",
        stdin=io.StringIO("is it sweet?\n\nwhere is it from?\n"),
        stdout=out,
        follow_ups=True,
    )

    assert [r.question for r in submitted] == ["这是什么菜？", "is it sweet?", "where is it from?"]
    (first_turn,) = submitted[1].history
    assert first_turn.question == "这是什么菜？"
    assert out.getvalue().startswith(first_turn.answer + "\n")
    assert [t.question for t in submitted[2].history] == ["这是什么菜？", "is it sweet?"]
    assert all(r.images == submitted[0].images for r in submitted)


def test_chat_in_a_terminal_takes_follow_ups_until_end_of_input(
    tiny_model_env: dict[str, str], photo: Path
) -> None:
    session = pexpect.spawn(
        DISHBOT,
        ["chat", str(photo), "这是什么菜？"],
        env={**os.environ, **tiny_model_env},
        encoding="utf-8",
        timeout=120,
    )
    session.expect_exact("> ")
    session.sendline("is it spicy?")
    session.expect_exact("> ")
    session.sendeof()
    session.expect(pexpect.EOF)
    session.close()

    assert session.exitstatus == 0


def test_chat_on_cpu_picks_the_hf_native_default_and_offline_says_how_to_get_it(
    photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISHBOT_ENGINE__BACKEND", "transformers")  # as auto picks without a GPU
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DISHBOT_ENGINE__MODEL", raising=False)

    result = _run("chat", str(photo))

    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "OpenGVLab/InternVL3-1B-hf is not downloaded yet" in last_line
    assert "HF_HUB_OFFLINE" in last_line
    assert "DISHBOT_ENGINE__MODEL" in last_line
    assert "Traceback" not in result.stderr


def test_chat_with_a_remote_code_model_on_cpu_names_the_format_and_a_checkpoint_that_has_it(
    photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISHBOT_ENGINE__BACKEND", "transformers")
    monkeypatch.setenv("DISHBOT_ENGINE__MODEL", "OpenGVLab/InternVL2-2B")

    result = _run("chat", str(photo))

    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "needs a model in transformers' native format" in result.stderr
    assert "DISHBOT_ENGINE__MODEL=OpenGVLab/InternVL3-1B-hf" in result.stderr
    assert "OpenGVLab/InternVL2-2B is in OpenGVLab's own format" in result.stderr
