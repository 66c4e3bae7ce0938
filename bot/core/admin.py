"""The admin flows: commands only the users named in ``admins`` may run.

Who is an admin comes from the settings alone (``telegram:<id>`` / ``discord:<id>``); nothing
a user says or stores in the database can make them one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.core.events import Command, Place
from bot.core.i18n import Language, language_of, say
from bot.core.port import ChatPort
from bot.core.reply import send_long
from bot.errors import DishbotError
from bot.settings import Settings
from bot.store import NothingToRollBack, ReportTarget, RunInProgress, Store, TrainingRunRecord
from bot.store.records import UserRecord
from bot.training import ExportError, ExportOptions, export_dataset
from bot.training.evaluation import candidate_means
from bot.training.report import render_run
from bot.training.runs import RunSupervisor
from bot.training.versions import rollback
from engine.engine import Engine

log = logging.getLogger(__name__)

ADMIN_COMMANDS = frozenset({"stats", "export", "retrain", "models", "rollback"})
# How often a run's progress message is edited: well within every platform's limits.
REPORT_EDIT_INTERVAL_S = 3.0


@dataclass
class _Report:
    """A run's progress message, as the chat that asked for it shows it."""

    port: ChatPort
    where: Place
    message_id: str
    language: Language
    edited_at: float = 0.0


class Admin:
    """Handles admin commands for the dialog (see `bot.core.dialog.AdminHandler`)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        engine: Engine,
        runs: RunSupervisor | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.runs = runs  # retraining; without it /retrain says it is not available
        self._exporting = asyncio.Lock()
        self._reports: dict[int, _Report] = {}
        self._ports: dict[str, ChatPort] = {}

    def attach(self, port: ChatPort) -> None:
        """Let runs report through ``port`` to chats of its platform, e.g. after a restart."""
        self._ports[port.platform] = port

    async def __call__(
        self, command: Command, port: ChatPort, user: UserRecord, language: Language
    ) -> bool:
        """Run ``command`` if it is an admin command; False when it is not one."""
        if command.name not in ADMIN_COMMANDS:
            return False
        if not self.settings.is_admin(command.who.platform, command.who.user_id):
            log.warning(
                "%s:%s tried admin command /%s",
                command.who.platform,
                command.who.user_id,
                command.name,
            )
            await port.send(command.where, say("admin_only", language), reply_to=command.message_id)
            return True
        if not command.where.private and not port.answers_admin_commands_privately:
            # The group would read the queue, the export's path on the server, its summary.
            words = say("admin_in_private", language)
            await port.send(command.where, words, reply_to=command.message_id)
            return True
        if command.name == "stats":
            await port.send(command.where, self._stats(), reply_to=command.message_id)
        elif command.name == "export":
            await self._export(command, port, language)
        elif command.name == "retrain":
            await self._retrain(command, port, user, language)
        elif command.name == "models":
            await send_long(port, command.where, await self._models(), reply_to=command.message_id)
        elif command.name == "rollback":
            await self._rollback(command, port, language)
        return True

    # -- retraining -----------------------------------------------------------------------

    async def _retrain(
        self, command: Command, port: ChatPort, user: UserRecord, language: Language
    ) -> None:
        """/retrain [force], or /retrain cancel."""
        argument = command.argument.strip().lower()
        where, reply_to = command.where, command.message_id
        if self.runs is None:
            await port.send(where, say("retrain_unavailable", language), reply_to=reply_to)
            return
        if argument == "cancel":
            running = await self.store.running_training_run()
            if running is None:
                await port.send(where, say("retrain_nothing_running", language), reply_to=reply_to)
                return
            await port.send(where, say("retrain_cancelling", language, id=running.id))
            await self.runs.cancel(running.id)
            return
        if argument not in ("", "force"):
            await port.send(where, say("retrain_usage", language), reply_to=reply_to)
            return
        target = ReportTarget(command.who.platform, where.chat_id)
        try:
            run_id = await self.runs.start(user.id, target, force=argument == "force")
        except RunInProgress as busy:
            words = say("retrain_busy", language) + "\n\n" + render_run(busy.run, language)
            await port.send(where, words, reply_to=reply_to)
            return
        except DishbotError as exc:
            await port.send(where, say("retrain_failed_to_start", language, reason=exc))
            return
        log.info("training run %d started by %s:%s", run_id, user.platform, command.who.user_id)
        run = await self.store.get_training_run(run_id)
        text = render_run(run, language) if run is not None else f"run {run_id}"
        message_id = await port.send(where, text, reply_to=reply_to)
        self._reports[run_id] = _Report(port, where, message_id, language, time.monotonic())
        await self.store.set_run_report_message(run_id, message_id)

    async def report_run(self, run: TrainingRunRecord) -> None:
        """Show ``run`` as it is now in its progress message (`RunSupervisor`'s ``notify``):
        edited every few seconds while it runs, always at the end; a run reported after a
        restart (its message is gone from memory) gets a new message in its chat."""
        report = self._reports.get(run.id)
        if report is None:
            await self._report_elsewhere(run)
            return
        now = time.monotonic()
        if not run.finished and now - report.edited_at < REPORT_EDIT_INTERVAL_S:
            return
        report.edited_at = now
        text = await self._run_text(run, report.language)
        if run.finished:
            self._reports.pop(run.id, None)
        try:
            await report.port.edit(report.where, report.message_id, text)
        except Exception:
            if not run.finished:
                log.warning("could not edit the progress of run %d", run.id, exc_info=True)
                return
            # The end of a run must arrive: as a new message when the old can't be edited.
            await send_long(report.port, report.where, text, reply_to=None)

    async def _report_elsewhere(self, run: TrainingRunRecord) -> None:
        target = run.report_to
        port = self._ports.get(target.platform) if target is not None else None
        if target is None or port is None or not run.finished:
            return
        if port.answers_admin_commands_privately:
            # Private there only through the interaction that asked, gone after a restart:
            # a report in the channel would show everyone the error and the server's paths.
            log.warning(
                "training run %d ended %s; its admin is not told in the %s channel "
                "(`dishbot runs show %d` has it)",
                run.id,
                run.stage.value,
                target.platform,
                run.id,
            )
            return
        language: Language = "en"
        if run.requested_by is not None:
            asker = await self.store.get_user(run.requested_by)
            language = language_of(asker.language if asker is not None else None)
        where = Place(target.chat_id, private=False)
        await send_long(port, where, await self._run_text(run, language), reply_to=None)

    async def _run_text(self, run: TrainingRunRecord, language: Language) -> str:
        version = None
        if run.model_version_id is not None and run.stage.value == "done":
            active = await self.store.active_model_version()
            version = active.name if active is not None else None
        return render_run(run, language, version)

    async def _models(self) -> str:
        """The versions, newest first: which is active, and what their evaluation said."""
        versions = await self.store.model_versions()
        if not versions:
            return "no model versions yet"
        lines = []
        for version in sorted(versions, key=lambda v: v.created_at, reverse=True):
            mark = "▶" if version.is_active else " "
            scores = _scores(version.evaluation)
            lines.append(f"{mark} {version.name}  {version.trainer or 'base'}{scores}")
        return "\n".join(lines)

    async def _rollback(self, command: Command, port: ChatPort, language: Language) -> None:
        try:
            version = await rollback(self.store)
        except NothingToRollBack:
            words = say("rollback_nothing", language)
        else:
            words = say("rollback_done", language, name=version.name)
        await port.send(command.where, words, reply_to=command.message_id)

    def exports_dir(self) -> Path:
        """Where `/export` writes: one new directory per export, under the training work dir."""
        return self.settings.training_dir / "exports"

    async def _export(self, command: Command, port: ChatPort, language: Language) -> None:
        """Export the feedback as XTuner training data, with the default filters."""
        if self._exporting.locked():
            await port.send(
                command.where, say("export_running", language), reply_to=command.message_id
            )
            return
        async with self._exporting:
            stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
            out_dir = self.exports_dir() / f"export-{stamp}"
            started = say("export_started", language, path=out_dir)
            await port.send(command.where, started, reply_to=command.message_id)
            try:
                summary = await export_dataset(self.store, self.settings, out_dir, ExportOptions())
            except ExportError as exc:
                failed = say("export_failed", language, reason=exc)
                await port.send(command.where, failed, reply_to=command.message_id)
                return
            log.info("export by %s:%s to %s", command.who.platform, command.who.user_id, out_dir)
            text = "\n".join(summary.lines())
            await send_long(port, command.where, text, reply_to=command.message_id)

    def _stats(self) -> str:
        stats = self.engine.stats()

        def seconds(value: float | None) -> str:
            return "–" if value is None else f"{value:.1f} s"

        return "\n".join(
            [
                f"model: {stats.model}",
                f"waiting: {stats.waiting}, answering: {stats.in_flight}"
                f" (capacity {stats.capacity})",
                f"answered: {stats.completed}, failed: {stats.failed}, "
                f"timed out: {stats.timed_out}, cancelled: {stats.cancelled}",
                f"wait p50/p95: {seconds(stats.wait_p50_s)} / {seconds(stats.wait_p95_s)}",
                f"answer p50/p95: {seconds(stats.service_p50_s)} / {seconds(stats.service_p95_s)}",
            ]
        )


def _scores(evaluation: dict[str, Any] | None) -> str:
    """A version's evaluation in one line: the candidate's mean per set."""
    parts = [
        f"{name.replace('_', ' ')} {mean:.2f}"
        for name, mean in candidate_means(evaluation).items()
        if mean is not None
    ]
    return f"  ({', '.join(parts)})" if parts else ""
