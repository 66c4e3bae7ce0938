"""The admin console's door: logging in and out, the guard every admin route goes through,
and the admin-only photos.

Every ``/admin`` page without a live admin session redirects to the login page; every admin
POST without one, or without the session's CSRF token (form field ``csrf`` or header
``X-CSRF-Token``), is refused with 403. The pages themselves live beside this module
(`admin_overview`, `admin_review`, `admin_dataset`, `admin_training`, `admin_models`), each
registering its routes through this guard.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp_jinja2
import yarl
from aiohttp import web

from bot.adapters.web.admin_auth import SESSION_COOKIE, AdminSessions
from bot.core.admin import Admin
from bot.core.i18n import MESSAGES, Language, language_of, say

log = logging.getLogger(__name__)

CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
LOGIN_PATH = "/admin/login"
MAX_FORM_BYTES = 16 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
ADMIN_WORDS = [key for key in MESSAGES if key.startswith("admin_web_")]

ADMIN_SESSION = web.RequestKey("admin_session", str)
FORM = web.RequestKey("form", dict[str, str])
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def page_language(request: web.Request) -> Language:
    """The admin's language, from the browser's first Accept-Language."""
    header = request.headers.get("Accept-Language") or ""
    return language_of(header.split(",")[0].split(";")[0].strip() or None)


class AdminRoutes:
    """Login, logout, the guard, and the pages of the admin console over one `Admin`."""

    def __init__(self, admin: Admin, sessions: AdminSessions) -> None:
        self.admin = admin
        self.store = admin.store
        self.sessions = sessions

    def register(self, app: web.Application) -> None:
        """Add the admin routes to ``app``."""
        # Here, not at the top: the pages import this module's guard and helpers.
        from bot.adapters.web.admin_dataset import DatasetPages
        from bot.adapters.web.admin_models import ModelPages
        from bot.adapters.web.admin_overview import OverviewPage
        from bot.adapters.web.admin_review import ReviewPages
        from bot.adapters.web.admin_training import TrainingPages

        app.router.add_get(LOGIN_PATH, self.login_page)
        app.router.add_post(LOGIN_PATH, self.login)
        app.router.add_post("/admin/logout", self.action(self.logout))
        app.router.add_get("/admin/photos/{sha256}", self.page(self.photo))
        OverviewPage(self).register(app)
        TrainingPages(self).register(app)
        ModelPages(self).register(app)
        ReviewPages(self).register(app)
        DatasetPages(self).register(app)

    # -- the guard --------------------------------------------------------------------------

    def session_of(self, request: web.Request) -> str | None:
        """The live admin session of a request's cookie, or None."""
        return self.sessions.session(request.cookies.get(SESSION_COOKIE))

    def page(self, handler: Handler) -> Handler:
        """``handler`` for admins only: anyone else is sent to the login page."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            session = self.session_of(request)
            if session is None:
                raise web.HTTPSeeOther(LOGIN_PATH)
            request[ADMIN_SESSION] = session
            return await handler(request)

        return guarded

    def action(self, handler: Handler) -> Handler:
        """``handler`` for a state-changing request of an admin with the session's CSRF
        token; 403 for anyone else."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            session = self.session_of(request)
            if session is None:
                raise web.HTTPForbidden(text=say("admin_web_login_needed", page_language(request)))
            form = await _form(request)
            token = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
            if not self.sessions.csrf_ok(session, token):
                log.warning("admin POST %s without a valid CSRF token refused", request.path)
                raise web.HTTPForbidden(text=say("web_session_expired", page_language(request)))
            request[ADMIN_SESSION] = session
            request[FORM] = form
            return await handler(request)

        return guarded

    def render(
        self, template: str, request: web.Request, context: Mapping[str, Any]
    ) -> web.Response:
        """An admin page, with the words, the CSRF token and the navigation."""
        language = page_language(request)
        session = request.get(ADMIN_SESSION)
        full = {
            "lang": language,
            "words": {key: MESSAGES[key][language] for key in ADMIN_WORDS},  # unformatted
            "csrf_token": self.sessions.csrf_token(session) if session else "",
            "path": request.path,
            **context,
        }
        response = aiohttp_jinja2.render_template(template, request, full)
        response.headers["Cache-Control"] = "no-store"  # pages carry the CSRF token
        return response

    # -- logging in and out -----------------------------------------------------------------

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        """The password form; or, with the one-time link's ``?token=``, a form that logs in
        with it when the admin presses "Log in" (opening the link alone, as a link preview or
        a prefetch does, uses nothing up)."""
        return self._login_form(request, token=request.query.get("token"))

    async def login(self, request: web.Request) -> web.StreamResponse:
        """The password form, or the login link's form, was sent (from this site: a form on
        another is refused)."""
        if not _same_origin(request):
            raise web.HTTPForbidden(text=say("web_session_expired", page_language(request)))
        form = await _form(request)
        token = form.get("token")
        if token is not None:
            return await self._log_in(request, lambda: self.sessions.log_in_with_token(token))
        password = form.get("password", "")
        return await self._log_in(request, lambda: self.sessions.log_in_with_password(password))

    async def _log_in(
        self, request: web.Request, attempt: Callable[[], str | None]
    ) -> web.StreamResponse:
        language = page_language(request)
        if not self.sessions.may_try(request.remote or "unknown"):
            log.warning("admin login attempts from %s refused: too many", request.remote)
            raise web.HTTPTooManyRequests(text=say("admin_web_login_too_many", language))
        cookie = attempt()
        if cookie is None:
            log.warning("failed admin login from %s", request.remote)
            return self._login_form(request, error=say("admin_web_login_failed", language))
        log.info("admin logged in from %s", request.remote)
        # Always to the overview: a login never sends anyone to an address given with it.
        response = see_other("/admin")
        response.set_cookie(
            SESSION_COOKIE,
            cookie,
            max_age=int(self.sessions.ttl_s),
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            path="/admin",
        )
        return response

    def _login_form(
        self, request: web.Request, error: str | None = None, token: str | None = None
    ) -> web.Response:
        context = {"error": error, "uses_password": self.sessions.uses_password, "token": token}
        response = self.render("admin/login.html", request, context)
        if error is not None:
            response.set_status(401)
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """End the session and go back to the login page."""
        self.sessions.log_out(request[ADMIN_SESSION])
        response = see_other(LOGIN_PATH)
        response.del_cookie(SESSION_COOKIE, path="/admin")
        return response

    # -- pages ------------------------------------------------------------------------------

    async def photo(self, request: web.Request) -> web.StreamResponse:
        """A stored photo by its sha256 (admins only: photos are the users')."""
        sha256 = request.match_info["sha256"]
        if not _SHA256.fullmatch(sha256):
            raise web.HTTPNotFound()
        photo = await self.store.get_photo(sha256)
        if photo is None:
            raise web.HTTPNotFound()
        path = self.store.photo_file(photo)
        if not path.is_file():
            raise web.HTTPNotFound()
        content_type = f"image/{photo.format.lower()}"
        headers = {"Content-Type": content_type, "Cache-Control": "private, max-age=3600"}
        return web.FileResponse(path, headers=headers)


def _same_origin(request: web.Request) -> bool:
    """Whether a request's Origin, when the browser sends one, is this server's host (its
    scheme aside: behind a TLS proxy the page is https and the request here http)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    here = yarl.URL(f"http://{request.host}").host_port_subcomponent
    return yarl.URL(origin).host_port_subcomponent == here


def see_other(location: str) -> web.Response:
    """A redirect that can still carry cookies (an HTTPSeeOther must be raised as is)."""
    return web.Response(status=303, headers={"Location": location})


async def _form(request: web.Request) -> dict[str, str]:
    """A small urlencoded or multipart form's text fields (none for other bodies)."""
    if request.content_type not in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return {}
    if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_FORM_BYTES, request.content_length)
    data = await request.post()
    return {key: value for key, value in data.items() if isinstance(value, str)}


def photo_url(image: str) -> str | None:
    """The admin URL of an exported image named ``<sha256>.<ext>``, or None."""
    stem = image.rsplit("/", 1)[-1].split(".", 1)[0]
    return f"/admin/photos/{stem}" if _SHA256.fullmatch(stem) else None
