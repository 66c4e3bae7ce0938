"""Four answers finishing together in a busy Telegram group: how late each one is shown.

The real python-telegram-bot with its real AIORateLimiter (20 calls a minute per group)
against the Bot API emulator, the real dialog, engine and store, and the scripted backend
streaming four answers word by word for about five seconds and finishing them together.

Printed side by side: the code before the call budget (a git revision, `main` by default,
run in a subprocess) and the code here. Each column is the delay from the model finishing
an answer to its final message reaching Telegram, and the calls the group received.

    python bench/busy_group.py [--before-rev main]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEOPLE = 4
WORDS = 96  # streamed one every STEP_S: about five seconds
STEP_S = 0.05


async def _scenario() -> dict[str, Any]:
    from pydantic import SecretStr

    from bot.adapters.telegram import TelegramAdapter
    from bot.core.dialog import Dialog, DialogConfig
    from bot.settings import TelegramSettings
    from bot.store import Store
    from bot.store.schema import upgrade
    from engine.engine import Engine
    from engine.types import GenerationJob, JobFinished, ModelSpec
    from tests.factories import jpeg_bytes
    from tests.scripted_backend import ScriptedBackend
    from tests.telegram_emulator import Chat, TelegramEmulator, User

    finished: list[float] = []

    class Backend(ScriptedBackend):
        async def generate(self, jobs: Sequence[GenerationJob]) -> AsyncGenerator[Any, None]:
            async for event in super().generate(jobs):
                if isinstance(event, JobFinished):
                    finished.append(time.monotonic())
                yield event

    group = Chat.group(-1001234567890, "Foodies")
    words = " ".join(["pork"] * WORDS)
    with tempfile.TemporaryDirectory() as data:
        store = Store.open(f"sqlite+aiosqlite:///{data}/dishbot.db", Path(data))
        await upgrade(store.engine)
        async with TelegramEmulator() as telegram:
            engine = Engine(Backend(capacity=PEOPLE, step_s=STEP_S), ModelSpec("scripted", "m"))
            async with engine:
                dialog = Dialog(store, engine, DialogConfig(questions_per_minute=60))
                settings = TelegramSettings(
                    token=SecretStr(telegram.token),
                    base_url=telegram.base_url,
                    base_file_url=telegram.base_file_url,
                )
                adapter = TelegramAdapter(settings, dialog)
                await adapter.start()
                try:
                    photo = telegram.add_file(jpeg_bytes(size=(96, 64)))
                    mention = f"@{telegram.bot_user['username']}"
                    for n in range(PEOPLE):
                        person = User(300 + n, f"Diner {n}")
                        telegram.send_photo_message(
                            person, group, photo, caption=f"{mention} {n} {words}"
                        )
                    finals = await _finals(telegram, group.id)
                finally:
                    await adapter.stop()
        await store.close()
    calls = [c for c in telegram.calls() if c.params.get("chat_id") == group.id]
    ready = max(finished)
    return {
        "delays_s": sorted(max(0.0, round(c.at - ready, 1)) for c in finals),
        "group_calls": len(calls),
        "typing": len([c for c in calls if c.method == "sendChatAction"]),
    }


async def _finals(telegram: Any, chat_id: int) -> list[Any]:
    def final(call: Any) -> bool:
        return call.params.get("chat_id") == chat_id and "reply_markup" in call.params

    async def poll() -> list[Any]:
        while len(found := [c for c in telegram.calls() if final(c)]) < PEOPLE:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return found

    return await asyncio.wait_for(poll(), 120)


def _run_before(revision: str) -> dict[str, Any]:
    """The scenario on the code of ``revision``, in a subprocess importing that code."""
    with tempfile.TemporaryDirectory() as checkout:
        archive = Path(checkout) / "code.tar"
        with archive.open("wb") as out:
            subprocess.run(
                ["git", "archive", revision, "bot", "engine", "tests"],
                cwd=ROOT,
                check=True,
                stdout=out,
            )
        with tarfile.open(archive) as tar:
            tar.extractall(checkout, filter="data")
        env = {**os.environ, "PYTHONPATH": checkout}
        done = subprocess.run(
            [sys.executable, __file__, "--scenario"],
            env=env,
            cwd=checkout,
            check=True,
            capture_output=True,
            text=True,
        )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _row(name: str, result: dict[str, Any]) -> str:
    delays = " ".join(f"{d:5.1f}" for d in result["delays_s"])
    return f"{name:<14}{delays:<26}{result['group_calls']:>11}{result['typing']:>8}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-rev", default="main", help="the code before (a git revision)")
    parser.add_argument("--scenario", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.scenario:
        print(json.dumps(asyncio.run(_scenario())))
        return
    sys.path.insert(0, str(ROOT))
    before = _run_before(options.before_rev)
    after = asyncio.run(_scenario())
    print(f"{PEOPLE} answers finishing together in a Telegram group (AIORateLimiter: 20/min)")
    print(f"{'':<14}{'shown, s after ready':<26}{'group calls':>11}{'typing':>8}")
    print(_row(f"before ({options.before_rev})", before))
    print(_row("after", after))


if __name__ == "__main__":
    main()
