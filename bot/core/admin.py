"""The admin flows: commands only the users named in ``admins`` may run.

Who is an admin comes from the settings alone (``telegram:<id>`` / ``discord:<id>``); nothing
a user says or stores in the database can make them one.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path

from bot.core.events import Command
from bot.core.i18n import Language, say
from bot.core.port import ChatPort
from bot.core.reply import send_long
from bot.settings import Settings
from bot.store import Store
from bot.store.records import UserRecord
from bot.training import ExportError, ExportOptions, export_dataset
from engine.engine import Engine

log = logging.getLogger(__name__)

ADMIN_COMMANDS = frozenset({"stats", "export"})


class Admin:
    """Handles admin commands for the dialog (see `bot.core.dialog.AdminHandler`)."""

    def __init__(self, settings: Settings, store: Store, engine: Engine) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self._exporting = asyncio.Lock()

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
        return True

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
