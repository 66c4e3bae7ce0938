"""Wiring: settings -> store -> (engine, chat adapters), started and stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Protocol

from bot.core.admin import Admin
from bot.core.dialog import Dialog, DialogConfig
from bot.core.port import ChatPort
from bot.core.recovery import Recovery, Replayer
from bot.engine_setup import engine_to_start
from bot.errors import DishbotError
from bot.metrics import Metrics
from bot.model_startup import ModelStartup, TerminalStatus
from bot.settings import Settings
from bot.store import Store
from bot.store.database import async_url, database_errors, is_sqlite
from bot.store.schema import ensure_schema
from bot.training.runs import RunSupervisor
from bot.training.trainers import trainer_for
from bot.training.versions import VersionFollower

log = logging.getLogger(__name__)

# How often a serving process looks for a run whose supervisor is gone (on another host, or
# a `dishbot retrain` that was killed), and for questions whose process is gone, besides at
# start.
RECOVER_INTERVAL_S = 30.0
TOKEN_VARIABLES = {"telegram": "DISHBOT_TELEGRAM__TOKEN", "discord": "DISHBOT_DISCORD__TOKEN"}


class Adapter(Protocol):
    """A chat platform's bot, started and stopped by the app."""

    @property
    def port(self) -> ChatPort: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class NoChatPlatform(DishbotError):
    """`dishbot run` has nothing to run: no chat platform can be started."""


class ModelNotServed(DishbotError):
    """The model cannot be served, and no web console is on to show why (the message says)."""


class App:
    """One running dishbot: its store, its engine, the dialog and the chat adapters."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._serving = asyncio.Event()  # set once start-up is over and the bots serve
        self.metrics = Metrics()
        self.startup: ModelStartup | None = None  # once `run` has begun

    async def open_store(self) -> Store:
        """Open the store with its schema at head.

        SQLite, the embedded default, is upgraded in place. A PostgreSQL database may be
        shared by several processes, so it is upgraded only by an operator's explicit
        `dishbot db upgrade`; until then dishbot refuses to start.
        """
        url = self.settings.db_url
        store = Store.open(url, self.settings.data_dir)
        try:
            async with database_errors(url):
                revision = await ensure_schema(store.engine, auto_upgrade=is_sqlite(async_url(url)))
        except BaseException:
            await store.close()
            raise
        log.info("database schema at revision %s", revision)
        return store

    def configured_platforms(self) -> list[str]:
        """The chat platforms that have a token, and "web" unless the web console is off."""
        tokens = {"telegram": self.settings.telegram.token, "discord": self.settings.discord.token}
        platforms = [name for name, token in tokens.items() if token is not None]
        return [*platforms, "web"] if self.settings.web.enabled else platforms

    def dialog_config(self) -> DialogConfig:
        """The dialog's limits from the settings."""
        return DialogConfig(questions_per_minute=self.settings.limits.questions_per_minute)

    def build_adapters(
        self, dialog: Dialog, admin: Admin | None = None, startup: ModelStartup | None = None
    ) -> list[Adapter]:
        """An adapter for each configured chat platform (not yet started); the web console's
        admin pages use ``admin`` (and its run supervisor), and its chat page and /readyz
        show how far ``startup`` has brought the model."""
        adapters: list[Adapter] = []
        if self.settings.telegram.token is not None:
            from bot.adapters.telegram import TelegramAdapter

            adapters.append(TelegramAdapter(self.settings.telegram, dialog))
        if self.settings.discord.token is not None:
            from bot.adapters.discord import DiscordAdapter

            adapters.append(DiscordAdapter(self.settings.discord, dialog))
        if self.settings.web.enabled:
            from bot.adapters.web import WebAdapter

            peers = tuple(adapters)
            adapters.append(
                WebAdapter(
                    self.settings, dialog, self.metrics, peers=peers, admin=admin, startup=startup
                )
            )
        return adapters

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve every configured platform until ``stop`` is set (or SIGINT / SIGTERM).

        A stop during start-up (opening the store, loading the model, connecting the chat
        platforms) ends start-up at once rather than after the model has loaded.
        """
        platforms = self.configured_platforms()
        if not platforms:
            raise NoChatPlatform(
                "no chat platform is configured: set "
                + " or ".join(TOKEN_VARIABLES.values())
                + " (or `token` under [telegram] / [discord] in dishbot.toml),"
                + " or turn the web console back on (web.enabled)"
            )
        stop = stop or _stop_on_signals()
        self._serving = asyncio.Event()
        main = asyncio.create_task(self._start_and_serve(stop), name="dishbot")
        stopped = asyncio.create_task(stop.wait(), name="stop-signal")
        try:
            await asyncio.wait({main, stopped}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            main.cancel()  # whoever runs the app was cancelled: so is the app, in order
            await asyncio.gather(main, return_exceptions=True)
            raise
        finally:
            stopped.cancel()
        if main.done() or self._serving.is_set():
            await main  # serving: `_serve` winds down in order by itself
            return
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await main
        log.info("dishbot stopped during start-up")

    async def _start_and_serve(self, stop: asyncio.Event) -> None:
        store = await self.open_store()
        try:
            # The web console serves at once; the model is fetched and loaded behind it, and
            # until it answers, the page, /readyz and the log say how far it is (or what to
            # set when it cannot be had).
            engine = engine_to_start(self.settings)
            startup = ModelStartup(self.settings, engine, listeners=(TerminalStatus(),))
            self.startup = startup
            interval = self.settings.training.follow_interval_s
            follower = VersionFollower(store, engine, interval)
            admin = Admin(self.settings, store, engine)
            runs = RunSupervisor(
                store,
                self.settings,
                engine,
                trainer_for,
                notify=admin.report_run,
                follower=follower,
                model_ready=lambda: None if engine.serving else startup.status.message,
            )
            admin.runs = runs
            dialog = Dialog(store, engine, self.dialog_config(), admin=admin, observer=self.metrics)
            adapters = self.build_adapters(dialog, admin, startup)
            recovery = Recovery(
                store,
                dialog,
                {adapter.port.platform: adapter.port for adapter in adapters},
                request_timeout_s=self.settings.engine.request_timeout_s,
                replayers=_replayers(adapters),
            )
            try:
                await self._serve(adapters, stop, admin, runs, recovery, follower, startup)
            finally:
                if engine.serving:
                    await engine.stop()
        finally:
            await store.close()

    async def _serve(
        self,
        adapters: list[Adapter],
        stop: asyncio.Event,
        admin: Admin,
        runs: RunSupervisor,
        recovery: Recovery,
        follower: VersionFollower,
        startup: ModelStartup,
    ) -> None:
        started: list[Adapter] = []
        consoles = [adapter for adapter in adapters if adapter.port.platform == "web"]
        bots = [adapter for adapter in adapters if adapter.port.platform != "web"]
        try:
            for adapter in consoles:
                await self._start(adapter, started, admin)
            ready = await startup.run(recovery.store)
            # A console that could not listen (its port taken, beside chat bots) shows nothing.
            showing = [adapter for adapter in consoles if getattr(adapter, "url", None)]
            if not ready and not showing:
                # Nowhere to show what is wrong but the log: say it there, and stop.
                raise ModelNotServed(startup.status.message)
            if ready:
                await follower.start()
                for adapter in bots:
                    await self._start(adapter, started, admin)
                # A run the previous process left behind is ended, and its admin told.
                await runs.recover()
                # Questions a previous process accepted and never answered are answered now.
                await _recover_questions(recovery)
            watching = (
                asyncio.create_task(_recover_forever(runs, recovery), name="recover")
                if ready
                else None
            )
            self._serving.set()  # from here a stop is a shutdown in order, no longer a cancellation
            if ready:
                log.info("dishbot is running; stop it with Ctrl-C")
            else:
                log.error(
                    "dishbot keeps serving the web console to show what is wrong; fix it and "
                    "restart (Ctrl-C stops it)"
                )
            try:
                await stop.wait()
            finally:
                if watching is not None:
                    watching.cancel()
        finally:
            await follower.stop()
            # A run this process supervises ends with it, and its admin is told while the
            # chat adapters can still say so.
            await runs.close()
            # Answers under way stop with the bot and stay pending: the next start gives them.
            await recovery.close()
            for adapter in reversed(started):
                try:
                    await adapter.stop()
                except Exception:
                    log.exception("stopping %s failed", type(adapter).__name__)
            await recovery.dialog.close()

    @staticmethod
    async def _start(adapter: Adapter, started: list[Adapter], admin: Admin) -> None:
        await adapter.start()
        started.append(adapter)
        admin.attach(adapter.port)


def _replayers(adapters: list[Adapter]) -> dict[str, Replayer]:
    """The adapters that keep an inbox (the web chat answers within its request)."""
    return {adapter.port.platform: adapter for adapter in adapters if isinstance(adapter, Replayer)}


async def _recover_forever(runs: RunSupervisor, recovery: Recovery) -> None:
    """Every `RECOVER_INTERVAL_S`, end a run whose supervising process is gone and answer
    the questions of serving processes that are gone."""
    while True:
        await asyncio.sleep(RECOVER_INTERVAL_S)
        try:
            await runs.recover()
        except Exception:
            log.exception("could not check for a training run left behind; will try again")
        await _recover_questions(recovery)


async def _recover_questions(recovery: Recovery) -> None:
    try:
        resumed = await recovery.sweep()
    except Exception:
        log.exception("could not check for questions left unanswered; will try again")
        return
    if resumed:
        log.warning("answering %d questions left unanswered by a previous process", len(resumed))


def _stop_on_signals() -> asyncio.Event:
    """An event set on SIGINT or SIGTERM, for a clean shutdown."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    return stop
