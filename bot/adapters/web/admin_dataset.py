"""/admin/dataset: what an export would contain right now, and the Export button.

The preview is a real export (`bot.training.export_dataset`, the one `/export` runs) into
``<training.work_dir>/preview``, replaced at each visit: its summary's counts by reason, the
most frequent dishes, and a sample of its records with their photos. The Export button
writes a new export under the exports directory, as `/export` does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bot.adapters.web.admin import page_language, photo_url, see_other
from bot.core.i18n import say
from bot.training import ExportError, ExportOptions, ExportSummary, export_dataset
from bot.training.export.writer import TRAIN_FILE, VAL_FILE

if TYPE_CHECKING:
    from bot.adapters.web.admin import AdminRoutes

log = logging.getLogger(__name__)

PREVIEW_DIR = "preview"  # under the training work directory
SAMPLE_RECORDS = 12
_EXPORT_NAME = re.compile(r"export-\d{8}-\d{6}")


class DatasetPages:
    """The dataset page and the Export button."""

    def __init__(self, routes: AdminRoutes) -> None:
        self.routes = routes
        self.admin = routes.admin
        self.store = routes.store
        self._exporting = asyncio.Lock()  # the preview directory is rewritten by one at a time

    def register(self, app: web.Application) -> None:
        """Add the dataset routes to ``app``."""
        app.router.add_get("/admin/dataset", self.routes.page(self.page))
        app.router.add_post("/admin/dataset/export", self.routes.action(self.export))

    async def page(self, request: web.Request) -> web.StreamResponse:
        """The preview of an export made now."""
        language = page_language(request)
        context: dict[str, Any] = {"exported": _exported(request.query.get("exported"))}
        preview = self.admin.settings.training_dir / PREVIEW_DIR
        async with self._exporting:
            try:
                summary = await export_dataset(
                    self.store, self.admin.settings, preview, ExportOptions()
                )
            except ExportError as exc:
                context["error"] = say("export_failed", language, reason=exc)
                return self.routes.render("admin/dataset.html", request, context)
            records = await asyncio.to_thread(_first_records, preview, SAMPLE_RECORDS)
        context |= _summary(summary)
        context["records"] = records
        return self.routes.render("admin/dataset.html", request, context)

    async def export(self, request: web.Request) -> web.StreamResponse:
        """Export now, as `/export` does, and show where."""
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        out_dir = self.admin.exports_dir() / f"export-{stamp}"
        async with self._exporting:
            try:
                await export_dataset(self.store, self.admin.settings, out_dir, ExportOptions())
            except ExportError as exc:
                log.warning("export from the web console failed: %s", exc)
                return see_other("/admin/dataset")
        log.info("export from the web console to %s", out_dir)
        return see_other(f"/admin/dataset?exported={out_dir.name}")


def _exported(name: str | None) -> str | None:
    """An export's name from the address, only when it is one (nothing else is shown)."""
    return name if name is not None and _EXPORT_NAME.fullmatch(name) else None


def _summary(summary: ExportSummary) -> dict[str, Any]:
    return {
        "samples": summary.samples,
        "train_samples": summary.train_samples,
        "val_samples": summary.val_samples,
        "photos": summary.photos,
        "reasons": sorted(summary.answers.items(), key=lambda item: -item[1]),
        "dishes": list(summary.top_dishes),
    }


def _first_records(export_dir: Path, count: int) -> list[dict[str, Any]]:
    """The first ``count`` records of an export: photo, and the conversation's turns."""
    shown: list[dict[str, Any]] = []
    for name in (TRAIN_FILE, VAL_FILE):
        path = export_dir / name
        if not path.exists():
            continue
        with path.open(encoding="utf-8") as lines:
            for line in itertools.islice(lines, count - len(shown)):
                record = json.loads(line)
                image = record.get("image")
                shown.append(
                    {
                        "photo": photo_url(image) if isinstance(image, str) else None,
                        "turns": [
                            (turn.get("from", ""), turn.get("value", ""))
                            for turn in record.get("conversations", [])
                        ],
                    }
                )
    return shown
