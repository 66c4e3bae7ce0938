"""/admin/training: start a run, watch it live, cancel it; past runs.

A run belongs to the server (`bot.training.runs.RunSupervisor`, the one `/retrain` uses), not
to the page: the page only watches it, over Server-Sent Events from
``/admin/training/events`` that read the run's row (its stage and progress) and its log, so a
reload or another browser shows the same run. The loss values seen so far are kept here per
run, so a page opened mid-run draws the whole curve.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bot.adapters.web import admin_charts
from bot.adapters.web.admin import FORM, page_language, see_other
from bot.core.i18n import Language, say
from bot.errors import DishbotError
from bot.store import RunInProgress, TrainingRunRecord
from bot.training.report import duration, stage_name, stage_progress
from bot.training.runs import ModelNotServing
from bot.training.trainers.process import log_tail

if TYPE_CHECKING:
    from bot.adapters.web.admin import AdminRoutes

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0  # how often the stream reads the run's row
LOG_TAIL_LINES = 20
PAST_RUNS = 20
MAX_LOSS_POINTS = 2000  # per run, in memory


class TrainingPages:
    """The training page, its stream and its two actions."""

    def __init__(self, routes: AdminRoutes) -> None:
        self.routes = routes
        self.admin = routes.admin
        self.store = routes.store
        self._losses: dict[int, dict[int, float]] = {}  # run id -> iteration -> loss
        self._closing = asyncio.Event()

    def register(self, app: web.Application) -> None:
        """Add the training routes to ``app``."""
        routes = self.routes
        app.router.add_get("/admin/training", routes.page(self.page))
        app.router.add_get("/admin/training/events", routes.page(self.events))
        app.router.add_post("/admin/training/start", routes.action(self.start))
        app.router.add_post("/admin/training/cancel", routes.action(self.cancel))
        app.on_shutdown.append(self._close_streams)

    async def _close_streams(self, app: web.Application) -> None:
        # Open streams would otherwise hold the server's shutdown until its timeout.
        self._closing.set()

    async def page(self, request: web.Request) -> web.StreamResponse:
        """The run under way (if any), the start and cancel buttons, and past runs."""
        language = page_language(request)
        runs = await self.store.training_runs(limit=PAST_RUNS)
        context = {
            "runs": [self._row(run, language) for run in runs],
            "available": self.admin.runs is not None,
            "message": _message(request.query.get("m"), language),
        }
        return self.routes.render("admin/training.html", request, context)

    async def start(self, request: web.Request) -> web.StreamResponse:
        """Start a run, as `/retrain` (or `/retrain force`) does."""
        if self.admin.runs is None:
            return _back("retrain_unavailable")
        force = request[FORM].get("force") == "1"
        try:
            run_id = await self.admin.runs.start(None, None, force=force)
        except RunInProgress:
            return _back("admin_web_run_busy")
        except ModelNotServing as exc:
            log.warning("a training run could not start: %s", exc)
            return _back("admin_web_run_model_not_ready")
        except DishbotError as exc:
            log.warning("a training run could not start: %s", exc)
            return _back("admin_web_run_not_started")
        log.info("training run %d started from the web console", run_id)
        return see_other("/admin/training")

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        """Cancel the run under way, as `/retrain cancel` does."""
        running = await self.store.running_training_run()
        if running is None or self.admin.runs is None:
            return _back("retrain_nothing_running")
        await self.admin.runs.cancel(running.id)
        log.info("training run %d cancelled from the web console", running.id)
        return see_other("/admin/training")

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The newest run as it changes, one JSON event each time it does."""
        language = page_language(request)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        last: str | None = None
        # Until the server stops, or the session ends (logged out, expired) under the page.
        while not self._closing.is_set() and self.routes.session_of(request) is not None:
            runs = await self.store.training_runs(limit=1)
            state = self._live(runs[0], language) if runs else {"id": None}
            text = json.dumps(state)
            if text != last:
                await response.write(b"data: " + text.encode() + b"\n\n")
                last = text
            else:
                await response.write(b": keepalive\n\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), WATCH_INTERVAL_S)
        return response

    # -- what a run shows -------------------------------------------------------------------

    def _row(self, run: TrainingRunRecord, language: Language) -> dict[str, Any]:
        ended = run.finished_at or run.updated_at
        return {
            "id": run.id,
            "stage": stage_name(run.stage.value, language),
            "finished": run.finished,
            "trainer": run.trainer or "",
            "started": run.created_at.strftime("%Y-%m-%d %H:%M"),
            "took": duration((ended - run.created_at).total_seconds()),
            "decision": run.decision or "",
            "error": (run.error or "").splitlines()[0] if run.error else "",
        }

    def _live(self, run: TrainingRunRecord, language: Language) -> dict[str, Any]:
        """Everything the page shows of a run now (JSON for the stream)."""
        progress = None if run.finished else stage_progress(run)
        state: dict[str, Any] = {
            "id": run.id,
            "stage": stage_name(run.stage.value, language),
            "finished": run.finished,
            "fraction": None,
            "loss": None,
            "eta": None,
            "log": log_tail(Path(run.log_path), LOG_TAIL_LINES) if run.log_path else "",
            "decision": run.decision or "",
            "error": run.error or "",
            "notes": run.notes,
            "chart": None,
        }
        if progress is not None:
            stage, fraction, loss, eta_s = progress
            state["stage"] = stage_name(stage, language)
            state["fraction"] = fraction
            state["loss"] = loss
            state["eta"] = duration(eta_s) if eta_s is not None else None
            if loss is not None and stage == "training":
                self._remember_loss(run.id, int(run.progress.get("iteration") or 0), loss)
        points = sorted(self._losses.get(run.id, {}).items())
        if points:
            title = say("admin_web_loss", language)
            state["chart"] = admin_charts.loss_curve(points, title)
        return state

    def _remember_loss(self, run_id: int, iteration: int, loss: float) -> None:
        losses = self._losses.setdefault(run_id, {})
        if len(losses) < MAX_LOSS_POINTS:
            losses[iteration] = loss


# Why nothing happened, named in the address after an action (only these: no page of another
# site can put words of its own on this one).
_MESSAGES = frozenset(
    {
        "retrain_unavailable",
        "admin_web_run_busy",
        "admin_web_run_not_started",
        "admin_web_run_model_not_ready",
        "retrain_nothing_running",
    }
)


def _back(key: str) -> web.Response:
    """Back to the training page, saying why nothing happened."""
    return see_other(f"/admin/training?m={key}")


def _message(key: str | None, language: Language) -> str | None:
    if key not in _MESSAGES:
        return None
    return say(key, language).split("\n")[0]
