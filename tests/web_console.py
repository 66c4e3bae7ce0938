"""A running web console for tests: the real adapter, dialog and engine, on a test server.

`web_console` starts it over a store; `Visitor` is a browser without a browser: it keeps
the signed cookie, reads the CSRF token from the page and follows the answer stream.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse, CookieJar, FormData
from aiohttp.test_utils import TestClient, TestServer

from bot.adapters.web import WebAdapter
from bot.core.admin import Admin
from bot.core.dialog import Dialog, DialogConfig
from bot.metrics import Metrics
from bot.settings import Settings
from bot.store import Store
from engine.engine import Engine, EngineConfig
from engine.types import ModelSpec
from tests.factories import jpeg_bytes
from tests.scripted_backend import ScriptedBackend

ANSWER_WAIT_S = 20.0  # a safety net for a broken test, not a timing claim


@dataclass
class Console:
    adapter: WebAdapter
    engine: Engine
    dialog: Dialog
    metrics: Metrics
    store: Store
    server: TestServer

    def visitor(self) -> Visitor:
        return Visitor(TestClient(self.server, cookie_jar=CookieJar(unsafe=True)))


@asynccontextmanager
async def web_console(
    store: Store,
    data_dir: Path,
    *,
    engine: Engine | None = None,
    start_engine: bool = True,
    dialog_config: DialogConfig | None = None,
    peers: tuple[object, ...] = (),
    settings: Settings | None = None,
    admin: Admin | None = None,
) -> AsyncIterator[Console]:
    """The web console over ``store``; the engine (scripted unless given) started if asked."""
    engine = engine or Engine(
        ScriptedBackend(capacity=2, step_s=0.01),
        ModelSpec("scripted", "scripted-model"),
        EngineConfig(max_pending_per_key=3),
    )
    metrics = Metrics()
    dialog = Dialog(
        store,
        engine,
        dialog_config or DialogConfig(edit_interval_s=0.05, questions_per_minute=60),
        observer=metrics,
    )
    settings = settings or Settings(data_dir=data_dir)
    adapter = WebAdapter(settings, dialog, metrics, peers=peers, admin=admin)
    server = TestServer(adapter.app)
    await server.start_server()
    if start_engine:
        await engine.start()
    try:
        yield Console(adapter, engine, dialog, metrics, store, server)
    finally:
        await adapter.stop()
        await server.close()
        if engine.serving:
            await engine.stop()


class Visitor:
    """One browser's session with the console."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client
        self.csrf: str | None = None
        self._events: ClientResponse | None = None

    async def __aenter__(self) -> Visitor:
        await self.client.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._events is not None:
            self._events.close()
        await self.client.close()

    async def open_page(self) -> str:
        """Load the chat page (getting a cookie and a CSRF token); returns its HTML."""
        response = await self.client.get("/")
        assert response.status == 200
        html = await response.text()
        data = re.search(r'id="page-data">(.*?)</script>', html, re.S)
        assert data is not None
        self.csrf = json.loads(data.group(1))["csrf"]
        return html

    def cookie(self) -> str | None:
        for cookie in self.client.session.cookie_jar:
            if cookie.key == "dishbot_visitor":
                return cookie.value
        return None

    async def ask(
        self,
        question: str = "",
        photo: bytes | None = None,
        *,
        reply_to: str | None = None,
        csrf: str | None = "page",
    ) -> ClientResponse:
        form = FormData(default_to_multipart=True)  # as a browser sends it
        if photo is not None:
            form.add_field("photo", photo, filename="dish.jpg", content_type="image/jpeg")
        form.add_field("question", question)
        if reply_to is not None:
            form.add_field("reply_to", reply_to)
        return await self.client.post("/ask", data=form, headers=self._token(csrf))

    async def press(self, message_id: str, data: str) -> ClientResponse:
        body = {"message_id": message_id, "data": data}
        return await self.client.post("/press", json=body, headers=self._token("page"))

    async def correct(self, exchange_id: int, text: str) -> ClientResponse:
        body = {"exchange_id": exchange_id, "text": text}
        return await self.client.post("/correct", json=body, headers=self._token("page"))

    def _token(self, csrf: str | None) -> dict[str, str]:
        token = self.csrf if csrf == "page" else csrf
        return {} if token is None else {"X-CSRF-Token": token}

    async def listen(self) -> None:
        """Open the answer stream (as the page does when it loads)."""
        self._events = await self.client.get("/events")
        assert self._events.status == 200

    async def next_update(self, kind: str = "message") -> dict[str, Any]:
        """The next update of ``kind`` on the stream."""
        assert self._events is not None, "listen() first"
        async with asyncio.timeout(ANSWER_WAIT_S):
            while True:
                line = await self._events.content.readline()
                assert line, "the stream ended"
                if not line.startswith(b"data: "):
                    continue
                update: dict[str, Any] = json.loads(line[len(b"data: ") :])
                if update["kind"] == kind:
                    return update

    async def answer(self) -> dict[str, Any]:
        """The next bot message that comes with buttons: a finished answer."""
        while True:
            update = await self.next_update()
            if update["author"] == "bot" and update["buttons"]:
                return update

    async def bot_says(self, *, besides: str | None = None) -> str:
        """The text of the next bot message (other than message ``besides``, being edited)."""
        while True:
            update = await self.next_update()
            if update["author"] == "bot" and update["id"] != besides:
                return str(update["text"])


def a_photo(color: tuple[int, int, int] = (200, 80, 40)) -> bytes:
    return jpeg_bytes(color, size=(320, 240))
