"""For operators: ``/healthz`` (the process is up), ``/readyz`` (it can answer) and ``/metrics``.

``/readyz`` is 200 only when the model is loaded and its circuit is not open, the database
answers, and every chat adapter is connected; otherwise 503 with a JSON body naming what is
not ready, e.g. ``{"ready": false, "problems": {"model": "downloading the model
OpenGVLab/InternVL3-1B-hf, 42% of 2.1 GB"}}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from aiohttp import web

from bot.metrics import CONTENT_TYPE, Metrics
from bot.model_startup import ModelStatus
from bot.store import Store
from engine.engine import Engine

DATABASE_TIMEOUT_S = 2.0  # a database slower than this to answer is as good as down


class OpsRoutes:
    """Health, readiness and metrics of one app."""

    def __init__(
        self,
        engine: Engine,
        store: Store,
        metrics: Metrics,
        model_status: Callable[[], ModelStatus],
        peers: Sequence[object] = (),
    ) -> None:
        """``peers`` are the other chat adapters; one may say whether it is `connected`.
        ``model_status`` says how far the model is on its way to answering."""
        self.engine = engine
        self.model_status = model_status
        self.store = store
        self.metrics = metrics
        self.peers = peers

    def register(self, app: web.Application) -> None:
        """Add the operations routes to ``app``."""
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)

    async def healthz(self, request: web.Request) -> web.Response:
        """200 while the process serves HTTP at all."""
        return web.json_response({"ok": True})

    async def readyz(self, request: web.Request) -> web.Response:
        """200 when questions can be answered now; 503 and the problems otherwise."""
        problems = self._model_problems() | await self._database_problems()
        problems |= self._adapter_problems()
        if problems:
            return web.json_response({"ready": False, "problems": problems}, status=503)
        return web.json_response({"ready": True})

    async def metrics_page(self, request: web.Request) -> web.Response:
        """The metrics in Prometheus's text format."""
        body = await self.metrics.scrape()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    def _model_problems(self) -> dict[str, str]:
        status = self.model_status()
        if not status.ready:
            return {"model": status.message}
        circuit = self.engine.stats().circuit
        if circuit == "open":
            return {"model": "unavailable: the backend keeps failing (circuit open)"}
        return {}

    async def _database_problems(self) -> dict[str, str]:
        try:
            await asyncio.wait_for(self.store.active_model_version(), DATABASE_TIMEOUT_S)
        except TimeoutError:
            return {"database": f"no answer within {DATABASE_TIMEOUT_S:g} s"}
        except Exception as exc:
            return {"database": f"unreachable: {type(exc).__name__}"}
        return {}

    def _adapter_problems(self) -> dict[str, str]:
        problems = {}
        for adapter in self.peers:
            if getattr(adapter, "connected", True) is False:
                problems[_adapter_name(adapter)] = "not connected"
        return problems


def _adapter_name(adapter: object) -> str:
    port = getattr(adapter, "port", None)
    return str(getattr(port, "platform", type(adapter).__name__))
