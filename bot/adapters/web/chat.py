"""The chat page: a visitor asks about a photo, follows up, rates and corrects, as in a chat.

Every request becomes a `bot.core.events` event handed to `Dialog.handle`, with the visitor
as a person of platform "web": the same limits, refusals and stored feedback as Telegram
and Discord. Answers reach the page over Server-Sent Events (`/events`).

Routes: ``GET /`` (the page), ``GET /events`` (the stream), ``GET /model-status`` (how far
the model is on its way to answering, shown on the page until it is), ``POST /ask``, ``POST /press``
and ``POST /correct``. Every POST needs the visitor's cookie and CSRF token, and is refused
before its body is read when the visitor posts faster than `posts_per_minute` allows (429)
or when the console has its hands full (503).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp_jinja2
from aiohttp import web

from bot.adapters.web.identity import Identities
from bot.adapters.web.port import Update, WebPort
from bot.adapters.web.tasks import TasksInHand
from bot.adapters.web.uploads import BadForm, UploadTooLarge, read_ask_form
from bot.core.dialog import Dialog, DialogConfig, RateLimiter
from bot.core.events import (
    ButtonPress,
    Command,
    CorrectionSubmitted,
    Event,
    Person,
    PhotoFile,
    PhotoQuestion,
    Place,
    TextMessage,
)
from bot.core.i18n import MESSAGES, Language, language_of, say
from bot.model_startup import ModelStatus

log = logging.getLogger(__name__)

COOKIE = "dishbot_visitor"
CSRF_HEADER = "X-CSRF-Token"
COOKIE_MAX_AGE_S = 365 * 24 * 3600
KEEPALIVE_S = 15.0  # a comment on an idle stream, so proxies keep it open
MAX_JSON_BYTES = 16 * 1024
# New identities one address may be given a minute. Identities cost nothing, so without this
# a visitor could take a new one per question and escape the per-user limits. (Behind a
# proxy every visitor comes from its address: the limit is then shared by all new visitors.)
NEW_VISITORS_PER_MINUTE = 20
PAGE_WORDS = [key for key in MESSAGES if key.startswith("web_")]


def posts_per_minute(config: DialogConfig) -> int:
    """POSTs one visitor may make a minute: room for every question (twice: a refused one
    is retried) and every rating or correction the dialog allows, and no more, so a flood
    is refused before its body is read, kept or handed to the dialog."""
    return 2 * config.questions_per_minute + config.feedback_per_minute


@dataclass(frozen=True, slots=True)
class Visitor:
    """A web visitor, as the dialog sees them."""

    id: str
    language: str | None  # the browser's first Accept-Language

    @property
    def person(self) -> Person:
        return Person(platform="web", user_id=self.id, language=self.language)

    @property
    def place(self) -> Place:
        return Place(chat_id=self.id, private=True)


class ChatRoutes:
    """The chat page's handlers, over one dialog and one `WebPort`."""

    def __init__(
        self,
        dialog: Dialog,
        port: WebPort,
        identities: Identities,
        tasks: TasksInHand,
        model_status: Callable[[], ModelStatus],
    ) -> None:
        self.dialog = dialog
        self.model_status = model_status
        self.port = port
        self.identities = identities
        self._tasks = tasks  # the dialog calls running in the background
        self._new_visitors = RateLimiter(NEW_VISITORS_PER_MINUTE)
        self._posts = RateLimiter(posts_per_minute(dialog.config))

    def register(self, app: web.Application) -> None:
        """Add the chat routes to ``app``."""
        app.router.add_get("/", self.page, name="chat")
        app.router.add_get("/events", self.events)
        app.router.add_get("/model-status", self.model_status_page)
        app.router.add_post("/ask", self.ask)
        app.router.add_post("/press", self.press)
        app.router.add_post("/correct", self.correct)

    # -- who is asking ----------------------------------------------------------------------

    def _visitor(self, request: web.Request) -> Visitor | None:
        visitor_id = self.identities.visitor(request.cookies.get(COOKIE))
        if visitor_id is None:
            return None
        return Visitor(visitor_id, _first_language(request.headers.get("Accept-Language")))

    def _checked(self, request: web.Request) -> Visitor:
        """The visitor of a state-changing request: signed cookie and matching CSRF token,
        not posting too fast, and room to handle what they send (checked before it is read)."""
        visitor = self._visitor(request)
        language = language_of(_first_language(request.headers.get("Accept-Language")))
        if visitor is None or not self.identities.csrf_ok(
            visitor.id, request.headers.get(CSRF_HEADER)
        ):
            raise _refusal(web.HTTPForbidden, say("web_session_expired", language))
        if not self._posts.allow(visitor.id):
            raise _refusal(web.HTTPTooManyRequests, say("slow_down", language))
        self._check_room(language)
        return visitor

    def _check_room(self, language: Language) -> None:
        if self._tasks.full:
            log.warning("web request refused: %d dialog calls in hand", len(self._tasks))
            raise _refusal(web.HTTPServiceUnavailable, say("busy", language))

    def _hand_over(self, event: Event, language: Language) -> None:
        """Let the dialog handle ``event`` in the background (503 when there is no room)."""
        self._check_room(language)  # again: while the body was read, others may have started
        self._tasks.start(self.dialog.handle(event, self.port))

    # -- the page and its stream ------------------------------------------------------------

    async def page(self, request: web.Request) -> web.StreamResponse:
        """The chat page; a visitor without a valid cookie gets a new identity."""
        visitor = self._visitor(request)
        language = language_of(_first_language(request.headers.get("Accept-Language")))
        if visitor is None and not self._new_visitors.allow(request.remote or "unknown"):
            raise web.HTTPTooManyRequests(text=say("slow_down", language))
        visitor_id = visitor.id if visitor else self.identities.new_visitor()
        context = {
            "lang": language,
            "words": {key: say(key, language) for key in PAGE_WORDS},
            "csrf_token": self.identities.csrf_token(visitor_id),
            "max_photo_bytes": self.dialog.config.max_photo_bytes,
            "model_status": self.model_status(),
            "photo_too_large": say(
                "photo_too_large",
                language,
                megabytes=f"{self.dialog.config.max_photo_bytes / 2**20:g}",
            ),
        }
        response = aiohttp_jinja2.render_template("chat.html", request, context)
        if visitor is None:
            response.set_cookie(
                COOKIE,
                self.identities.cookie(visitor_id),
                max_age=COOKIE_MAX_AGE_S,
                httponly=True,
                # Lax: a link from elsewhere still opens the visitor's own chat; every POST
                # needs the CSRF token besides, which no other site can read.
                samesite="Lax",
                secure=request.secure,
                path="/",
            )
        response.headers["Cache-Control"] = "no-store"  # the page carries the CSRF token
        return response

    async def model_status_page(self, request: web.Request) -> web.Response:
        """How far the model is on its way to answering, for the page to show while it waits."""
        response = web.json_response(self.model_status().as_json())
        response.headers["Cache-Control"] = "no-store"
        return response

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The visitor's conversation so far, then each change, as Server-Sent Events."""
        visitor = self._visitor(request)
        if visitor is None:
            raise web.HTTPForbidden()
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # nginx: pass each event on at once
            }
        )
        await response.prepare(request)
        with self.port.conversations.page(visitor.id) as (so_far, updates):
            try:
                await self._stream(response, so_far, updates)
            except ConnectionResetError:
                log.debug("a page closed its answer stream")  # the visitor left: nothing wrong
        return response

    @staticmethod
    async def _stream(
        response: web.StreamResponse, so_far: list[Update], updates: asyncio.Queue[Update]
    ) -> None:
        for message in so_far:
            await _send_event(response, message)
        while True:
            try:
                update = await asyncio.wait_for(updates.get(), KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            await _send_event(response, update)
            if update["kind"] == "reconnect":
                return

    # -- what a visitor does ----------------------------------------------------------------

    async def ask(self, request: web.Request) -> web.Response:
        """A photo with a question, or a follow-up (or a /command) without one."""
        visitor = self._checked(request)
        language = language_of(visitor.language)
        limit = self.dialog.config.max_photo_bytes
        try:
            form = await read_ask_form(request, limit)
        except UploadTooLarge:
            words = say("photo_too_large", language, megabytes=f"{limit / 2**20:g}")
            return web.json_response({"error": words}, status=413)
        except BadForm:
            raise _refusal(web.HTTPBadRequest, say("web_bad_form", language)) from None
        shown = form.question or (say("web_photo_sent", language) if form.photo else "")
        if not shown:
            raise _refusal(web.HTTPBadRequest, say("no_photo_hint", language))
        self._check_room(language)  # before the question is shown: a refused one is not
        message_id = self.port.say_as_visitor(visitor.id, shown, photo=form.photo is not None)
        event: Event
        if form.photo is not None:
            photo = form.photo
            event = PhotoQuestion(
                who=visitor.person,
                where=visitor.place,
                message_id=message_id,
                photo=PhotoFile(
                    fetch=_already_here(photo),
                    size=len(photo),
                    filename=form.filename,
                    content_type=form.content_type,
                ),
                question=form.question or None,
                addressed=True,
                reply_to=form.reply_to,
            )
        elif form.question.startswith("/"):
            name, _, argument = form.question[1:].partition(" ")
            event = Command(
                visitor.person, visitor.place, name.lower(), argument.strip(), message_id
            )
        else:
            event = TextMessage(
                who=visitor.person,
                where=visitor.place,
                message_id=message_id,
                text=form.question,
                addressed=True,
                reply_to=form.reply_to,
            )
        self._hand_over(event, language)
        return web.json_response({"message_id": message_id}, status=202)

    async def press(self, request: web.Request) -> web.Response:
        """A press on one of the bot's buttons (👍 / 👎 / ✏️ ...)."""
        visitor = self._checked(request)
        body = await _json_body(request, visitor)
        message_id, data = body.get("message_id"), body.get("data")
        if not isinstance(message_id, str) or not isinstance(data, str):
            raise _refusal(web.HTTPBadRequest, say("web_bad_form", language_of(visitor.language)))
        press = ButtonPress(visitor.person, visitor.place, message_id, data)
        self._hand_over(press, language_of(visitor.language))
        return web.json_response({}, status=202)

    async def correct(self, request: web.Request) -> web.Response:
        """What the dish really is, typed into the form under an answer."""
        visitor = self._checked(request)
        body = await _json_body(request, visitor)
        exchange_id, text = body.get("exchange_id"), body.get("text")
        if type(exchange_id) is not int or not isinstance(text, str):
            raise _refusal(web.HTTPBadRequest, say("web_bad_form", language_of(visitor.language)))
        event = CorrectionSubmitted(visitor.person, visitor.place, exchange_id, text)
        self._hand_over(event, language_of(visitor.language))
        return web.json_response({}, status=202)


def _already_here(data: bytes) -> Callable[[], Awaitable[bytes]]:
    async def fetch() -> bytes:
        return data

    return fetch


def _first_language(header: str | None) -> str | None:
    """The first language of an Accept-Language header ("zh-CN,zh;q=0.9" -> "zh-CN")."""
    if not header:
        return None
    first = header.split(",")[0].split(";")[0].strip()
    return first[:35] or None


def _refusal(kind: type[web.HTTPError], words: str) -> web.HTTPError:
    """An HTTP error whose JSON body says, in the visitor's words, what went wrong."""
    return kind(text=json.dumps({"error": words}), content_type="application/json")


async def _json_body(request: web.Request, visitor: Visitor) -> dict[str, object]:
    bad = say("web_bad_form", language_of(visitor.language))
    if request.content_length is None or request.content_length > MAX_JSON_BYTES:
        raise _refusal(web.HTTPBadRequest, bad)
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise _refusal(web.HTTPBadRequest, bad) from None
    if not isinstance(body, dict):
        raise _refusal(web.HTTPBadRequest, bad)
    return body


async def _send_event(response: web.StreamResponse, update: dict[str, object]) -> None:
    # JSON on one line: no newline of the text can end the event early.
    await response.write(b"data: " + json.dumps(update).encode() + b"\n\n")
