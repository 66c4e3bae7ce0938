"""`dishbot run` on a fresh machine: the web console serves at once, whatever the model does.

The app runs in this process over real SQLite, the real web adapter on a real port and the
real transformers backend; the Hugging Face hub is switched off (HF_HUB_OFFLINE) with an
empty cache, as on a machine that has never downloaded anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot import model_source, model_startup
from bot.app import App, ModelNotServed
from bot.core.i18n import say
from bot.engine_setup import engine_to_start
from bot.model_source import DownloadProgress
from bot.model_startup import (
    ModelStartup,
    ModelStatus,
    Phase,
    TerminalStatus,
    downloading_message,
    scrubbed,
)
from bot.settings import Settings, load_settings
from bot.store import Store
from bot.training.versions import activate, ensure_base_version
from tests.factories import jpeg_bytes
from tests.openai_server import FakeOpenAIServer

GUARD_S = 60.0  # a safety net for a broken test, not a timing claim


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def hub_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub and nothing in its cache, as on a machine that never downloaded a model."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def _fresh_settings(tmp_path: Path, **engine: Any) -> Settings:
    return load_settings(data_dir=tmp_path / "data", web={"port": _free_port()}, engine=engine)


class Running:
    """`dishbot run` in this process, and a browser-less visitor of its web console."""

    def __init__(self, app: App, task: asyncio.Task[None], url: str) -> None:
        self.app = app
        self.task = task
        self.url = url
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # an IP

    async def get(self, path: str) -> tuple[int, str]:
        async with self.http.get(self.url + path) as response:
            return response.status, await response.text()

    async def get_json(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.url + path) as response:
            return response.status, await response.json()

    async def until_status(self, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async def poll() -> dict[str, Any]:
            while True:
                _, status = await self.get_json("model-status")
                if done(status):
                    return dict(status)
                await asyncio.sleep(0.05)

        return await asyncio.wait_for(poll(), GUARD_S)

    async def ask(self, question: str, until: Callable[[dict[str, Any]], bool]) -> str:
        """Ask about a photo through the page's own endpoints (cookie, CSRF token, the
        answer stream); the text of the first bot message ``until`` accepts."""
        _, page = await self.get("")
        data = re.search(r'id="page-data">(.*?)</script>', page, re.S)
        assert data is not None, "the page carries no data"
        headers = {"X-CSRF-Token": json.loads(data.group(1))["csrf"]}
        async with self.http.get(self.url + "events") as events:
            form = aiohttp.FormData(default_to_multipart=True)
            form.add_field("photo", jpeg_bytes(), filename="dish.jpg", content_type="image/jpeg")
            form.add_field("question", question)
            async with self.http.post(self.url + "ask", data=form, headers=headers) as asked:
                assert asked.status == 202, await asked.text()
            async with asyncio.timeout(GUARD_S):
                async for line in events.content:
                    if not line.startswith(b"data: "):
                        continue
                    update = json.loads(line[len(b"data: ") :])
                    if update["kind"] == "message" and update["author"] == "bot" and until(update):
                        return str(update["text"])
        raise AssertionError("the answer stream ended without a reply")


@contextlib.asynccontextmanager
async def dishbot_run(settings: Settings) -> AsyncIterator[Running]:
    stop = asyncio.Event()
    app = App(settings)
    task = asyncio.create_task(app.run(stop))
    url = f"http://127.0.0.1:{settings.web.port}/"
    running = Running(app, task, url)
    try:
        async with asyncio.timeout(GUARD_S):
            while True:
                assert not task.done(), "dishbot run ended before serving its console"
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    await running.get("healthz")
                    break
                await asyncio.sleep(0.05)
        yield running
    finally:
        await running.http.close()
        stop.set()
        await asyncio.wait_for(task, GUARD_S)


async def test_with_no_model_to_be_had_the_console_serves_and_says_what_to_set(
    tmp_path: Path, hub_offline: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = _fresh_settings(tmp_path)  # nothing configured: auto, the default model

    async with dishbot_run(settings) as dishbot:
        status = await dishbot.until_status(lambda status: status["phase"] == "failed")
        page_status, page = await dishbot.get("")
        ready_status, readiness = await dishbot.get_json("readyz")
        await asyncio.sleep(0.5)
        still_running = not dishbot.task.done()

    assert status["ready"] is False
    assert "OpenGVLab/InternVL3-1B-hf is not downloaded yet" in status["message"]
    assert "DISHBOT_ENGINE__MODEL" in status["message"]
    assert page_status == 200
    assert 'id="photo"' in page
    assert 'id="model-status"' in page
    assert "DISHBOT_ENGINE__MODEL" in page
    assert ready_status == 503
    assert readiness["problems"]["model"] == status["message"]
    assert still_running
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("DISHBOT_ENGINE__MODEL" in message for message in errors)


async def test_a_question_when_the_model_cannot_be_had_gets_an_apology_not_a_promise(
    tmp_path: Path, hub_offline: None, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _fresh_settings(tmp_path)

    async with dishbot_run(settings) as dishbot:
        await dishbot.until_status(lambda status: status["phase"] == "failed")
        # The page is closed as soon as the first words arrive, with more on the way.
        reply = await dishbot.ask("what dish is this?", until=lambda update: True)
        await asyncio.sleep(0.5)

    assert reply == say("unavailable", "en")  # not "still getting ready": it will not be
    # A visitor who leaves is no error of the server's.
    assert not [record for record in caplog.records if record.name == "aiohttp.server"]


async def test_a_model_too_big_for_this_machine_is_named_with_what_to_set(
    tmp_path: Path, tiny_internvl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_source, "free_memory", lambda device: 1000)  # a tiny machine
    settings = _fresh_settings(
        tmp_path, backend="transformers", device="cpu", model=str(tiny_internvl)
    )

    async with dishbot_run(settings) as dishbot:
        status = await dishbot.until_status(lambda status: status["phase"] == "failed")
        ready_status, _ = await dishbot.get_json("readyz")

    assert status["message"].startswith(f"not enough memory to load {tiny_internvl}")
    assert "DISHBOT_ENGINE__MODEL" in status["message"]
    assert ready_status == 503


async def test_with_a_local_model_the_page_answers_once_ready(
    tmp_path: Path, tiny_internvl: Path
) -> None:
    settings = _fresh_settings(
        tmp_path, backend="transformers", device="cpu", model=str(tiny_internvl), max_new_tokens=8
    )

    async with dishbot_run(settings) as dishbot:
        status = await dishbot.until_status(lambda status: status["ready"])
        ready_status, _ = await dishbot.get_json("readyz")
        _, page = await dishbot.get("")
        reply = await dishbot.ask("what dish is this?", until=lambda update: update["buttons"])

    assert status["phase"] == "ready"
    assert ready_status == 200
    assert re.search(r'id="model-status"[^>]*\bhidden\b', page)
    assert reply
    assert "still getting ready" not in reply


async def test_the_openai_backend_serves_the_servers_own_model_when_none_is_named(
    tmp_path: Path,
) -> None:
    async with FakeOpenAIServer(models=["served-internvl", "another"]) as server:
        settings = _fresh_settings(tmp_path, backend="openai", openai={"base_url": server.url})
        async with dishbot_run(settings) as dishbot:
            await dishbot.until_status(lambda status: status["ready"])
        store = Store.open(settings.db_url, settings.data_dir)
        try:
            active = await store.active_model_version()
        finally:
            await store.close()

    assert active is not None
    assert active.path == "served-internvl"


async def test_an_openai_server_that_comes_up_later_is_served_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_startup, "RETRY_FIRST_S", 0.2)  # not minutes, in a test
    async with FakeOpenAIServer(models=["served-internvl"]) as server:
        await server.go_down()  # docker compose started dishbot before the model server
        with_password = server.url.replace("http://", "http://operator:s3cret@")
        settings = _fresh_settings(tmp_path, backend="openai", openai={"base_url": with_password})
        async with dishbot_run(settings) as dishbot:
            failed = await dishbot.until_status(lambda status: status["phase"] == "failed")
            _, page = await dishbot.get("")
            meanwhile = await dishbot.ask("what dish is this?", until=lambda update: True)
            await server.come_back()
            ready = await dishbot.until_status(lambda status: status["ready"])

    assert "DISHBOT_ENGINE__OPENAI__BASE_URL" in failed["message"]
    assert "trying again in" in failed["message"]
    assert "s3cret" not in failed["message"]  # the public page shows no credentials
    assert "s3cret" not in page
    assert "still getting ready" in meanwhile
    assert ready["message"] == "ready: answering with model version base"


async def test_with_the_console_port_taken_a_model_failure_ends_the_run_saying_why(
    tmp_path: Path, hub_offline: None
) -> None:
    # With a chat bot configured the console is optional: its port taken, it is left out.
    # Then a model that cannot be had leaves nothing to show the reason on: exit with it.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = load_settings(
            data_dir=tmp_path / "data",
            web={"port": taken.getsockname()[1]},
            telegram={"token": "123456:ABCDEF"},
        )
        with pytest.raises(ModelNotServed, match="DISHBOT_ENGINE__MODEL"):
            await asyncio.wait_for(App(settings).run(asyncio.Event()), GUARD_S)


async def test_a_trained_version_that_cannot_be_served_says_how_to_go_back_to_the_base(
    tmp_path: Path, store: Store, data_dir: Path
) -> None:
    # Trained with XTuner on a GPU host (OpenGVLab's format) and promoted; now this host
    # serves with the transformers backend, where the trained version wins over engine.model.
    gpu = load_settings(data_dir=data_dir, engine={"backend": "lmdeploy"})
    base = await ensure_base_version(store, gpu)
    trained = tmp_path / "runs" / "1" / "model"
    trained.mkdir(parents=True)
    (trained / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"]}))
    await store.add_model_version("run-1", str(trained), parent_id=base.id)
    await activate(store, "run-1")
    cpu = load_settings(data_dir=data_dir, engine={"backend": "transformers"})
    startup = ModelStartup(cpu, engine_to_start(cpu), log_failure=False)

    assert not await startup.run(store)

    message = startup.status.message
    assert message.startswith("the active model version run-1 is a trained one")
    assert "`dishbot models activate base`" in message


def test_a_status_message_quotes_no_secret_nor_a_urls_credentials() -> None:
    message = (
        "http://operator:pw@gpu:23333/v1?api-key=qk-1 answered 401; token 123456:ABCdef is wrong"
    )

    shown = scrubbed(message, ["123456:ABCdef", "pw"])

    assert shown == "http://***@gpu:23333/v1?*** answered 401; token *** is wrong"


def test_the_terminal_shows_a_bar_on_a_tty_and_a_line_per_tenth_in_a_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    def downloading(done: int) -> ModelStatus:
        progress = DownloadProgress(done, 2_100_000_000)
        return ModelStatus(
            Phase.DOWNLOADING, downloading_message("org/model", progress), done, 2_100_000_000
        )

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = TerminalStatus(tty, clock=iter(range(0, 1000, 1)).__next__)
    for done in (0, 882_000_000, 2_100_000_000):
        bar(downloading(done))
    bar(ModelStatus(Phase.LOADING, "loading the model org/model"))

    log_only = TerminalStatus(io.StringIO())
    for done in range(0, 2_100_000_001, 21_000_000):  # every 1 %
        log_only(downloading(done))

    assert "downloading the model org/model, 42% of 2.1 GB" in tty.getvalue()
    assert "\r[############" in tty.getvalue()
    assert tty.getvalue().endswith("\n")
    lines = [r.getMessage() for r in caplog.records if "downloading the model" in r.getMessage()]
    assert lines[0] == "downloading the model org/model, 0% of 2.1 GB"
    assert lines[-1] == "downloading the model org/model, 100% of 2.1 GB"
    assert len(lines) == 11  # one per tenth, not one per step
