"""/admin/review: corrections waiting for an admin's verdict, and who wrote them.

Each answer with new corrections is shown with its photo, question and answer and every
user's correction side by side: Accept one (or fix its text and accept it), or Reject them
all; trust or ban a correction's author. The verdict goes through the Store
(`accept_correction`, `reject_corrections`, `set_user_trust`, `set_user_banned`), and the
export's selection honours it over its automatic rules.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bot.adapters.web.admin import FORM, see_other
from bot.errors import NotFound
from bot.store import ReviewItem

if TYPE_CHECKING:
    from bot.adapters.web.admin import AdminRoutes

log = logging.getLogger(__name__)

REVIEW_PAGE_SIZE = 30
TRUSTED = 1  # the trust a "trust" press gives: corrections accepted without agreement
MAX_CORRECTION_CHARS = 1000


class ReviewPages:
    """The review page and its actions."""

    def __init__(self, routes: AdminRoutes) -> None:
        self.routes = routes
        self.store = routes.store

    def register(self, app: web.Application) -> None:
        """Add the review routes to ``app``."""
        action = self.routes.action
        app.router.add_get("/admin/review", self.routes.page(self.page))
        app.router.add_post("/admin/review/accept", action(self.accept))
        app.router.add_post("/admin/review/reject", action(self.reject))
        app.router.add_post("/admin/review/trust", action(self.trust))
        app.router.add_post("/admin/review/ban", action(self.ban))

    async def page(self, request: web.Request) -> web.StreamResponse:
        """Every answer whose corrections wait for review, the newest first."""
        items = await self.store.corrections_to_review(limit=REVIEW_PAGE_SIZE)
        context = {"items": [_item(item) for item in items]}
        return self.routes.render("admin/review.html", request, context)

    async def accept(self, request: web.Request) -> web.StreamResponse:
        """Accept a correction; with ``text``, as the admin fixed it."""
        form = request[FORM]
        correction_id = _number(form.get("correction"))
        text = form.get("text")
        if text is not None and not text.strip():
            text = None  # "Accept" sends the field empty: the text as the user wrote it
        if text is not None and len(text) > MAX_CORRECTION_CHARS:
            raise web.HTTPBadRequest()
        try:
            accepted = await self.store.accept_correction(correction_id, text)
        except NotFound:
            raise web.HTTPNotFound() from None
        log.info("correction %d accepted in review (answer %d)", accepted.id, accepted.exchange_id)
        return see_other("/admin/review")

    async def reject(self, request: web.Request) -> web.StreamResponse:
        """Reject every correction of an answer."""
        exchange_id = _number(request[FORM].get("exchange"))
        count = await self.store.reject_corrections(exchange_id)
        log.info("%d corrections of answer %d rejected in review", count, exchange_id)
        return see_other("/admin/review")

    async def trust(self, request: web.Request) -> web.StreamResponse:
        """Trust a user (``trust=1``) or make them ordinary again (``trust=0``)."""
        form = request[FORM]
        user_id, trusted = _number(form.get("user")), form.get("trust") == "1"
        await self._change_user(self.store.set_user_trust(user_id, TRUSTED if trusted else 0))
        log.info("user %d %s in review", user_id, "trusted" if trusted else "no longer trusted")
        return see_other("/admin/review")

    async def ban(self, request: web.Request) -> web.StreamResponse:
        """Ban a user (``banned=1``) or lift the ban (``banned=0``)."""
        form = request[FORM]
        user_id, banned = _number(form.get("user")), form.get("banned") == "1"
        await self._change_user(self.store.set_user_banned(user_id, banned))
        log.info("user %d %s in review", user_id, "banned" if banned else "unbanned")
        return see_other("/admin/review")

    @staticmethod
    async def _change_user(change: Any) -> None:
        try:
            await change
        except NotFound:
            raise web.HTTPNotFound() from None


def _number(value: str | None) -> int:
    """A form's id field; 400 for anything that is not one."""
    if value is None or not value.isdigit() or len(value) > 18:
        raise web.HTTPBadRequest()
    return int(value)


def _item(item: ReviewItem) -> dict[str, Any]:
    """An answer under review as the page shows it."""
    exchange = item.exchange
    return {
        "exchange_id": exchange.id,
        "photo": f"/admin/photos/{item.photo_sha256}" if item.photo_sha256 else None,
        "question": exchange.question,
        "answer": exchange.answer or "",
        "model": exchange.model_version or "",
        "corrections": [
            {
                "id": correction.id,
                "text": correction.text,
                "status": correction.status.value,
                "user_id": correction.author.id,
                "author": f"{correction.author.platform}: "
                f"{correction.author.display_name or correction.author.platform_user_id}",
                "trusted": correction.author.trust > 0,
                "banned": correction.author.banned,
            }
            for correction in item.corrections
        ],
    }
