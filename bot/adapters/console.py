"""`dishbot chat`: ask the configured model about a photo from the terminal."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TextIO

from bot.engine_setup import build_engine
from bot.errors import DishbotError
from bot.model_startup import ModelStartup, TerminalStatus
from bot.settings import Settings
from engine.engine import Answer, Request, RequestHandle, TextDelta
from engine.errors import BadImage, EngineError
from engine.images import MAX_IMAGE_BYTES, load_image
from engine.types import Turn

DEFAULT_QUESTION = "What dish is this?"
CONSOLE_KEY = "console"
PROMPT = "> "


class ChatError(DishbotError):
    """`dishbot chat` cannot go on; the message says why."""


async def chat(
    settings: Settings,
    image_path: Path,
    question: str | None,
    *,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    follow_ups: bool | None = None,
) -> None:
    """Answer ``question`` about the photo, streaming; then take follow-ups until EOF.

    Follow-up questions are read when ``follow_ups`` is True, or by default when stdin is a
    terminal. The photo is checked before the model loads, so a bad one fails fast.
    """
    data = _read_photo(image_path)
    try:
        await load_image(
            data,
            max_tiles=settings.engine.max_tiles,
            time_budget_s=settings.engine.decode_time_budget_s,
        )
    except BadImage as exc:
        raise ChatError(f"cannot use {image_path}: {exc.reason}") from None
    interactive = stdin.isatty() if follow_ups is None else follow_ups
    history: list[Turn] = []
    asked = question or DEFAULT_QUESTION
    engine = build_engine(settings)
    startup = ModelStartup(settings, engine, listeners=(TerminalStatus(),), log_failure=False)
    if not await startup.start(engine.model):
        raise ChatError(startup.status.message)
    try:
        while True:
            request = Request(
                key=CONSOLE_KEY, question=asked, images=(data,), history=tuple(history)
            )
            answer = await _stream_answer(await engine.submit(request), stdout)
            history.append(Turn(asked, answer.text))
            if not interactive:
                return
            follow_up = await _read_question(stdin, stdout)
            if follow_up is None:
                return
            asked = follow_up
    except EngineError as exc:
        raise ChatError(str(exc)) from exc
    finally:
        await engine.stop()


def _read_photo(path: Path) -> bytes:
    """The file's bytes, at most one past the size limit: enough for the decoder to refuse
    an oversized photo in its own words without reading all of it."""
    try:
        with path.open("rb") as photo:
            return photo.read(MAX_IMAGE_BYTES + 1)
    except FileNotFoundError:
        raise ChatError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ChatError(f"{path} is a directory, not a photo") from None
    except PermissionError:
        raise ChatError(f"{path} cannot be read (permission denied)") from None


async def _stream_answer(handle: RequestHandle, stdout: TextIO) -> Answer:
    async for event in handle:
        if isinstance(event, TextDelta):
            stdout.write(event.text)
            stdout.flush()
        elif isinstance(event, Answer):
            stdout.write("\n")
            stdout.flush()
            return event
    raise ChatError("the model gave no answer")


async def _read_question(stdin: TextIO, stdout: TextIO) -> str | None:
    """The next non-empty line, or None at end of input."""
    while True:
        stdout.write(PROMPT)
        stdout.flush()
        line = await asyncio.to_thread(stdin.readline)
        if not line:
            stdout.write("\n")
            return None
        if line.strip():
            return line.strip()
