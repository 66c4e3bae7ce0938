"""/admin: how the bot is doing, as charts, and the queue right now.

Questions per day (answered, failed), the answer latency's p50 and p95 per day, and the 👍
rate per model version, from the Store (`question_days`, `ratings_by_model_version`); the
queue from `Engine.stats()`. Charts are drawn by pygal (`admin_charts`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bot.adapters.web import admin_charts
from bot.adapters.web.admin import page_language
from bot.core.i18n import Language, say
from bot.store import DayStats, VersionRatings

if TYPE_CHECKING:
    from bot.adapters.web.admin import AdminRoutes

OVERVIEW_DAYS = 14


class OverviewPage:
    """The overview page."""

    def __init__(self, routes: AdminRoutes) -> None:
        self.routes = routes
        self.store = routes.store
        self.engine = routes.admin.engine

    def register(self, app: web.Application) -> None:
        """Add the overview route to ``app``."""
        app.router.add_get("/admin", self.routes.page(self.page))

    async def page(self, request: web.Request) -> web.StreamResponse:
        """The charts and the queue."""
        language = page_language(request)
        since = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        days = await self.store.question_days(since - timedelta(days=OVERVIEW_DAYS - 1))
        ratings = await self.store.ratings_by_model_version()
        context = {
            "stats": self.engine.stats(),
            "charts": [
                _questions_chart(days, language),
                _latency_chart(days, language),
                _ratings_chart(ratings, language),
            ],
        }
        return self.routes.render("admin/overview.html", request, context)


def _questions_chart(days: list[DayStats], language: Language) -> dict[str, Any]:
    title = say("admin_web_chart_questions", language)
    series = {
        say("admin_web_answered", language): [day.answered for day in days],
        say("admin_web_failed", language): [day.failed for day in days],
    }
    labels = [day.day.isoformat() for day in days]
    return {"title": title, "image": admin_charts.bars(title, labels, series)}


def _latency_chart(days: list[DayStats], language: Language) -> dict[str, Any]:
    title = say("admin_web_chart_latency", language)
    series = {
        "p50": [_seconds(day.latency_p50_ms) for day in days],
        "p95": [_seconds(day.latency_p95_ms) for day in days],
    }
    labels = [day.day.isoformat() for day in days]
    return {"title": title, "image": admin_charts.lines(title, labels, series)}


def _ratings_chart(ratings: list[VersionRatings], language: Language) -> dict[str, Any]:
    title = say("admin_web_chart_ratings", language)
    rates = [None if r.up_rate is None else round(r.up_rate * 100, 1) for r in ratings]
    series = {"👍 %": rates}
    labels = [r.model_version for r in ratings]
    return {"title": title, "image": admin_charts.bars(title, labels, series)}


def _seconds(milliseconds: int | None) -> float | None:
    return None if milliseconds is None else milliseconds / 1000
