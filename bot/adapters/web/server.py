"""The web adapter: one aiohttp application serving the chat page and the operations routes.

Each face registers its own routes (`chat.ChatRoutes`, `ops.OpsRoutes`, and the admin
console's `admin.AdminRoutes`, templates under ``templates/admin/``). Static files come from
``static/`` only; every response carries headers that keep the page from loading anything
from elsewhere or being framed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from bot.adapters.web.admin import AdminRoutes
from bot.adapters.web.admin_auth import AdminSessions
from bot.adapters.web.chat import ChatRoutes
from bot.adapters.web.identity import Identities, load_secret
from bot.adapters.web.ops import OpsRoutes
from bot.adapters.web.port import Conversations, WebPort
from bot.adapters.web.tasks import TasksInHand
from bot.core.admin import Admin
from bot.core.dialog import Dialog
from bot.errors import DishbotError
from bot.metrics import Metrics
from bot.model_startup import ModelStartup, ModelStatus, current_status
from bot.settings import Settings

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
STOP_GRACE_S = 5.0  # answers in progress may finish for this long when the bot stops
# Dialog calls running at once (each holds what its visitor sent, a photo of up to 10 MB
# perhaps). Above `engine.max_pending`'s default, so the engine's own "busy" answer usually
# comes first; past it, requests are refused as busy before their form is read.
MAX_TASKS_IN_HAND = 512
# Nothing from other origins: no CDN, no inline script, no framing by another site.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
        "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


class WebConsoleUnavailable(DishbotError):
    """The web console cannot listen where it is configured to (the port is taken)."""


@web.middleware
async def _security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(SECURITY_HEADERS)
        raise
    if not response.prepared:  # a stream has sent its headers already (they include these)
        response.headers.update(SECURITY_HEADERS)
    return response


class WebAdapter:
    """The web console on ``web.listen``:``web.port``, as one of the app's adapters."""

    def __init__(
        self,
        settings: Settings,
        dialog: Dialog,
        metrics: Metrics,
        *,
        peers: Sequence[object] = (),
        admin: Admin | None = None,
        startup: ModelStartup | None = None,
    ) -> None:
        """``peers`` are the app's other chat adapters, whose connection `/readyz` reports;
        ``admin`` is the app's `Admin` (with its run supervisor), which the admin pages use
        (without one they get an `Admin` over the dialog's store and engine, without runs).

        ``startup``, when given, is how far the model is on its way to answering, which the
        chat page and `/readyz` show until it is ready.

        With peers, a console that cannot listen (a second `dishbot run` on the same host,
        say) is logged and left out, and the chat bots go on; alone, it is an error.
        """
        self.settings = settings.web
        self._optional = bool(peers)
        self.dialog = dialog
        self.port = WebPort(Conversations())
        self.url: str | None = None  # once started
        self._in_hand = TasksInHand(MAX_TASKS_IN_HAND)
        self._runner: web.AppRunner | None = None
        metrics.watch(dialog.engine, dialog.store)
        secret = load_secret(settings.data_dir)
        identities = Identities(secret)
        password = settings.web.admin_password
        self.admin_sessions = AdminSessions(
            secret,
            password.get_secret_value() if password is not None else None,
            on_new_token=self._log_login_link,
        )
        self.app = web.Application(middlewares=[_security_headers])
        aiohttp_jinja2.setup(
            self.app,
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,  # every value in a page is escaped, whatever a template says
        )

        def model_status() -> ModelStatus:
            return current_status(startup, dialog.engine)

        ChatRoutes(dialog, self.port, identities, self._in_hand, model_status).register(self.app)
        OpsRoutes(dialog.engine, dialog.store, metrics, model_status, peers).register(self.app)
        admin = admin or Admin(settings, dialog.store, dialog.engine)
        AdminRoutes(admin, self.admin_sessions).register(self.app)
        # aiohttp refuses paths that leave this directory, and follows no symlink out of it.
        self.app.router.add_static("/static", HERE / "static", follow_symlinks=False)
        self.app.on_shutdown.append(self._close_pages)

    async def _close_pages(self, app: web.Application) -> None:
        # Open answer streams would otherwise hold the server's shutdown until its timeout.
        self.port.conversations.close_pages()

    async def start(self) -> None:
        """Listen on the configured address, and say where."""
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        where = f"{self.settings.listen}:{self.settings.port}"
        try:
            await web.TCPSite(runner, self.settings.listen, self.settings.port).start()
        except OSError as exc:
            await runner.cleanup()
            problem = f"the web console cannot listen on {where}: {exc.strerror or exc}"
            advice = "set web.port to a free port, or web.enabled = false"
            if self._optional:
                log.warning("%s; serving the chat platforms without it (%s)", problem, advice)
                return
            raise WebConsoleUnavailable(f"{problem}; {advice}") from None
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}/"
        log.info("web console: %s", self.url)
        token = self.admin_sessions.login_token
        if token is not None:
            self._log_login_link(token)

    def _log_login_link(self, token: str) -> None:
        # As Jupyter does: whoever can read this log may administer. A link works once; the
        # next one is logged when it is made, so a used link never locks the admin out.
        base = self.url or "/"
        log.info("web admin, one-time login link: %sadmin/login?token=%s", base, token)

    async def stop(self) -> None:
        """Let answers in progress finish (for a while), then stop listening."""
        await self._in_hand.finish(STOP_GRACE_S)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
