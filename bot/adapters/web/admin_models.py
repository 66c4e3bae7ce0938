"""/admin/models: the model versions with their evaluations side by side; activate, roll back.

Through the same version API as `dishbot models` and the chat command `/rollback`
(`bot.training.versions`); every serving process follows the active version.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bot.adapters.web.admin import FORM, page_language, photo_url, see_other
from bot.core.i18n import Language, say
from bot.errors import NotFound
from bot.store import ModelVersionRecord, NothingToRollBack
from bot.training.evaluation import SET_NAMES, Evaluation
from bot.training.report import SET_LABELS
from bot.training.versions import activate, rollback

if TYPE_CHECKING:
    from bot.adapters.web.admin import AdminRoutes

log = logging.getLogger(__name__)

SAMPLES_SHOWN = 50  # per version


class ModelPages:
    """The models page and its two actions."""

    def __init__(self, routes: AdminRoutes) -> None:
        self.routes = routes
        self.store = routes.store

    def register(self, app: web.Application) -> None:
        """Add the model routes to ``app``."""
        app.router.add_get("/admin/models", self.routes.page(self.page))
        app.router.add_post("/admin/models/activate", self.routes.action(self.activate))
        app.router.add_post("/admin/models/rollback", self.routes.action(self.rollback))

    async def page(self, request: web.Request) -> web.StreamResponse:
        """Every version, newest first, each with its evaluation."""
        language = page_language(request)
        versions = sorted(await self.store.model_versions(), key=lambda v: v.created_at)
        shown = [_version(version, language) for version in reversed(versions)]
        message = request.query.get("m")
        context = {
            "versions": shown,
            "message": say(message, language) if message in _MESSAGES else None,
        }
        return self.routes.render("admin/models.html", request, context)

    async def activate(self, request: web.Request) -> web.StreamResponse:
        """Make the named version the active one."""
        name = request[FORM].get("name", "")
        try:
            await activate(self.store, name)
        except NotFound:
            return see_other("/admin/models?m=admin_web_no_such_version")
        log.info("model version %s activated from the web console", name)
        return see_other("/admin/models")

    async def rollback(self, request: web.Request) -> web.StreamResponse:
        """Go back to the version active before this one, as `/rollback` does."""
        try:
            version = await rollback(self.store)
        except NothingToRollBack:
            return see_other("/admin/models?m=rollback_nothing")
        log.info("rolled back to %s from the web console", version.name)
        return see_other("/admin/models")


_MESSAGES = frozenset({"admin_web_no_such_version", "rollback_nothing"})


def _version(version: ModelVersionRecord, language: Language) -> dict[str, Any]:
    """A version as the page shows it: its scores per set and its samples."""
    shown: dict[str, Any] = {
        "name": version.name,
        "active": version.is_active,
        "trainer": version.trainer or "base",
        "created": version.created_at.strftime("%Y-%m-%d %H:%M"),
        "run_id": version.run_id,
        "sets": [],
        "samples": [],
    }
    stored = version.evaluation
    if not stored or not stored.get("samples"):
        return shown
    evaluation = Evaluation.from_json(stored)
    for name in SET_NAMES:
        shown["sets"].append(
            {
                "label": SET_LABELS[name][language],
                "count": evaluation.count(name),
                "active": _score(evaluation.mean(name, "active")),
                "candidate": _score(evaluation.mean(name, "candidate")),
            }
        )
    for sample in evaluation.samples[:SAMPLES_SHOWN]:
        shown["samples"].append(
            {
                "set": SET_LABELS[sample.set_name][language],
                "photo": photo_url(sample.image),
                "question": sample.question,
                "expected": sample.expected,
                "active": sample.active_answer,
                "candidate": sample.candidate_answer,
                "active_score": _score(sample.active_score),
                "candidate_score": _score(sample.candidate_score),
            }
        )
    return shown


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"
