"""Retraining's failure paths as an admin sees them in chat, and as the operator finds them.

As in tests/test_retraining_loop.py, everything is the production code: `App.run` wiring the
real python-telegram-bot against the Telegram emulator, the dialog, a SQLite store, the engine
with the transformers backend and a tiny random InternVL, and dishbot's own LoRA trainer in its
subprocess. Training fails, is cancelled, is asked for twice, is asked for by people who may
not, and is left behind by a bot killed with SIGKILL (`dishbot run` as a real process).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.app import App
from bot.settings import (
    Settings,
)
from bot.store import ReportTarget, RunStage, Store, TrainingRunRecord
from bot.store.models import TrainingRun, utcnow
from bot.training.trainers.process import group_alive
from bot.training.versions import ensure_base_version
from tests.telegram_emulator import TelegramEmulator
from tests.telegram_emulator import User as TelegramUser
from tests.test_retraining_loop import (
    ADMIN,
    CHEUNG_FUN,
    FAN,
    GUARD_S,
    LIN,
    RECIPE,
    Group,
    admin_texts,
    dishbot_running,
    loop_settings,
    stored_exchanges,
    until,
)

T = TypeVar("T")

ADMIN_ONLY = "That command is for admins."
# Training that lasts far longer than any test: one sample, one iteration an epoch.
ENDLESS = {**RECIPE, "epochs": 100_000}
# A learning rate no training survives: the loss is not finite by the second iteration, and
# the trainer stops with status 1 and says why as its log's last line.
DIVERGING = {**RECIPE, "learning_rate": 1e30}
STOPPED_WITHIN_S = 10.0  # SIGTERM, STOP_GRACE_S, and the reaping of what is left
PROCESS_GUARD_S = 90.0  # `dishbot run` imports torch and loads the model before it polls


@pytest.fixture
async def telegram() -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator() as emulator:
        yield emulator


async def with_store(settings: Settings, read: Callable[[Store], Awaitable[T]]) -> T:
    """``read`` through a connection of our own, as an operator's `dishbot runs` would."""
    store = Store.open(settings.db_url, settings.data_dir)
    try:
        return await read(store)
    finally:
        await store.close()


async def runs_of(settings: Settings) -> list[TrainingRunRecord]:
    return await with_store(settings, lambda store: store.training_runs())


async def active_version(settings: Settings) -> str:
    active = await with_store(settings, lambda store: store.active_model_version())
    assert active is not None
    return active.name


async def give_feedback(group: Group) -> dict[str, Any]:
    """Lin asks about a photo and the admin corrects the answer: one sample to train on."""
    answer = await group.ask(LIN, CHEUNG_FUN)
    await group.correct(ADMIN, answer, "肠粉")
    return answer


def send_command(telegram: TelegramEmulator, user: TelegramUser, text: str) -> int:
    """``user`` sends ``text`` in their private chat with the bot; the message's id."""
    sent = telegram.send_text(user, user.private_chat, text)
    return int(sent["message"]["message_id"])


def replies_to(telegram: TelegramEmulator, user: TelegramUser, message_id: int) -> list[str]:
    return [
        shown.get("text", "")
        for shown in telegram.messages_in(user.private_chat.id)
        if shown.get("reply_to_message", {}).get("message_id") == message_id
    ]


async def reply_to(telegram: TelegramEmulator, user: TelegramUser, message_id: int) -> str:
    """The bot's (first) reply to message ``message_id`` of ``user``."""
    await until(lambda: bool(replies_to(telegram, user, message_id)))
    return replies_to(telegram, user, message_id)[0]


def progress_message(telegram: TelegramEmulator, run_id: int = 1) -> str:
    """The admin's progress message of run ``run_id`` as it shows now ("" before it exists)."""
    title = f"Retraining run {run_id}:"
    shown = [text for text in admin_texts(telegram) if text.startswith(title)]
    assert len(shown) <= 1, f"one message per run, edited: {shown}"
    return shown[0] if shown else ""


async def training_under_way(telegram: TelegramEmulator, settings: Settings) -> int:
    """Wait until the admin's message shows the trainer's progress and the run's row names the
    trainer's process group; that group's id."""

    def training_shown() -> bool:
        text = progress_message(telegram)
        return text.startswith("Retraining run 1: training") and "%" in text

    await until(training_shown, PROCESS_GUARD_S)
    deadline = time.monotonic() + GUARD_S
    while time.monotonic() < deadline:
        [run] = await runs_of(settings)
        if run.trainer_pgid is not None:
            return run.trainer_pgid
        await asyncio.sleep(0.2)
    raise AssertionError("the run never recorded its trainer's process group")


async def gone_within(group: int, seconds: float) -> float:
    """How long process group ``group`` took to end; fails when it outlives ``seconds``."""
    began = time.monotonic()
    while group_alive(group):
        if time.monotonic() - began > seconds:
            raise AssertionError(f"the trainer's process group {group} is still running")
        await asyncio.sleep(0.1)
    return time.monotonic() - began


def kill_group(group: int | None) -> None:
    if group is not None and group_alive(group):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


async def test_a_trainer_that_fails_is_reported_with_its_log_and_the_active_model_stays(
    tiny_internvl: Path, tmp_path: Path, telegram: TelegramEmulator
) -> None:
    settings = loop_settings(tiny_internvl, tmp_path, telegram, DIVERGING)
    group = Group(telegram)

    async with dishbot_running(settings, telegram):
        await give_feedback(group)
        send_command(telegram, ADMIN, "/retrain")
        await until(lambda: progress_message(telegram).startswith("Retraining run 1: failed"), 120)
        report = progress_message(telegram)
        after = await group.ask(LIN, CHEUNG_FUN)

    # The admin reads why, in the trainer's own words: its exit and its log's last lines.
    assert "dishbot's trainer exited with status 1" in report, report
    assert report.splitlines()[-1].endswith("the loss became nan at iteration 1"), report
    assert "Iter(train)" in report, "the log tail shows where the training got to"
    [run] = await runs_of(settings)
    assert run.stage is RunStage.FAILED
    assert run.error is not None
    assert run.error in report
    assert await active_version(settings) == "base"
    names = await with_store(settings, lambda store: store.model_versions())
    assert [version.name for version in names] == ["base"], "no candidate was registered"
    assert after["text"], "users are still answered"
    assert (await stored_exchanges(settings, CHEUNG_FUN))[-1].model_version == "base"


async def test_retrain_cancel_stops_the_trainers_whole_process_group_within_seconds(
    tiny_internvl: Path, tmp_path: Path, telegram: TelegramEmulator
) -> None:
    settings = loop_settings(tiny_internvl, tmp_path, telegram, ENDLESS)
    group = Group(telegram)
    trainer: int | None = None
    try:
        async with dishbot_running(settings, telegram):
            await give_feedback(group)
            send_command(telegram, ADMIN, "/retrain")
            trainer = await training_under_way(telegram, settings)
            assert group_alive(trainer)

            send_command(telegram, ADMIN, "/retrain cancel")
            await until(lambda: any(t == "Cancelling run 1 …" for t in admin_texts(telegram)))
            took = await gone_within(trainer, STOPPED_WITHIN_S)
            await until(
                lambda: progress_message(telegram).startswith("Retraining run 1: cancelled")
            )
            report = progress_message(telegram)
            after = await group.ask(LIN, CHEUNG_FUN)
    finally:
        kill_group(trainer)

    assert took < STOPPED_WITHIN_S
    assert "cancelled by an admin" in report, report
    [run] = await runs_of(settings)
    assert run.stage is RunStage.CANCELLED
    assert await active_version(settings) == "base"
    assert after["text"]
    assert (await stored_exchanges(settings, CHEUNG_FUN))[-1].model_version == "base"


async def test_a_second_retrain_while_one_trains_is_refused_with_the_running_ones_progress(
    tiny_internvl: Path, tmp_path: Path, telegram: TelegramEmulator
) -> None:
    settings = loop_settings(tiny_internvl, tmp_path, telegram, ENDLESS)
    group = Group(telegram)
    trainer: int | None = None
    try:
        async with dishbot_running(settings, telegram):
            await give_feedback(group)
            send_command(telegram, ADMIN, "/retrain")
            trainer = await training_under_way(telegram, settings)

            refused = await reply_to(telegram, ADMIN, send_command(telegram, ADMIN, "/retrain"))
            [running] = await runs_of(settings)
        # Stopping the bot ends the run and its trainer.
        await gone_within(trainer, STOPPED_WITHIN_S)
    finally:
        kill_group(trainer)

    lines = refused.splitlines()
    assert lines[0] == "A retraining run is already going; one at a time:", refused
    assert lines[2] == "Retraining run 1: training", refused
    assert lines[3].startswith("training "), refused
    assert "%" in lines[3], refused
    assert "loss" in lines[3], refused
    assert running.stage is RunStage.TRAINING, "the first run went on"
    [run] = await runs_of(settings)
    assert run.stage is RunStage.FAILED
    assert run.error == "the bot shut down during the run"


async def test_a_bot_stopped_during_a_run_tells_the_admin_the_run_ended(
    tiny_internvl: Path, tmp_path: Path, telegram: TelegramEmulator
) -> None:
    settings = loop_settings(tiny_internvl, tmp_path, telegram, ENDLESS)
    group = Group(telegram)

    async with dishbot_running(settings, telegram):
        await give_feedback(group)
        send_command(telegram, ADMIN, "/retrain")
        await until(lambda: progress_message(telegram) != "")

    [run] = await runs_of(settings)
    assert run.stage is RunStage.FAILED, "the operator finds the run ended"
    report = progress_message(telegram)
    assert report.startswith("Retraining run 1: failed"), report
    assert "the bot shut down during the run" in report


async def promoted_run_one(settings: Settings) -> None:
    """As a promotion leaves the database: run-1 (the same weights) active, base before it."""
    store = await App(settings).open_store()
    try:
        base = await ensure_base_version(store, settings)
        summary = {
            "held_out": {"count": 0, "active": None, "candidate": None},
            "taught": {"count": 1, "active": 0.0, "candidate": 1.0},
            "kept": {"count": 1, "active": 1.0, "candidate": 0.5},
        }
        await store.add_model_version(
            "run-1",
            settings.engine.model,
            parent_id=base.id,
            trainer="transformers",
            evaluation={"summary": summary, "samples": []},
            metrics={name: figures["candidate"] for name, figures in summary.items()},
        )
        await store.activate_model_version("run-1", reason="promote")
    finally:
        await store.close()


async def test_non_admins_are_refused_every_retraining_command_and_nothing_changes(
    tiny_internvl: Path, tmp_path: Path, telegram: TelegramEmulator
) -> None:
    settings = loop_settings(tiny_internvl, tmp_path, telegram, ENDLESS)
    await promoted_run_one(settings)
    group = Group(telegram)

    async with dishbot_running(settings, telegram):
        await give_feedback(group)
        send_command(telegram, ADMIN, "/retrain")
        await until(lambda: progress_message(telegram) != "")
        commands = ["/retrain cancel", "/retrain", "/retrain force", "/models", "/rollback"]
        sent = {command: send_command(telegram, FAN, command) for command in commands}
        refusals = {command: await reply_to(telegram, FAN, sent[command]) for command in commands}
        [run] = await runs_of(settings)
        active = await active_version(settings)
        fan_sees = [shown.get("text", "") for shown in telegram.messages_in(FAN.id)]

    assert refusals == dict.fromkeys(commands, ADMIN_ONLY)
    assert fan_sees == [ADMIN_ONLY] * len(commands), "no progress, no versions leak out"
    assert run.id == 1, "no second run was started"
    assert not run.finished, "the admin's run was not cancelled"
    assert active == "run-1", "nothing was rolled back"


async def test_models_marks_the_active_version_and_a_rollback_moves_the_mark(
    tiny_internvl: Path, tmp_path: Path, telegram: TelegramEmulator
) -> None:
    settings = loop_settings(tiny_internvl, tmp_path, telegram, RECIPE)
    await promoted_run_one(settings)
    group = Group(telegram)

    async with dishbot_running(settings, telegram):
        before = await reply_to(telegram, ADMIN, send_command(telegram, ADMIN, "/models"))
        rolled = await reply_to(telegram, ADMIN, send_command(telegram, ADMIN, "/rollback"))
        after = await reply_to(telegram, ADMIN, send_command(telegram, ADMIN, "/models"))
        await asyncio.sleep(1.0)  # every process follows the active version (every 0.2 s)
        await group.ask(LIN, CHEUNG_FUN)

    # The first line's indent does not survive the message (split_text strips the text).
    assert [line.lstrip() for line in before.splitlines()] == [
        "▶ run-1  transformers  (taught 1.00, kept 0.50)",
        "base  base",
    ], before
    assert rolled == "Rolled back: base is answering again."
    assert [line.lstrip() for line in after.splitlines()] == [
        "run-1  transformers  (taught 1.00, kept 0.50)",
        "▶ base  base",
    ], after
    assert (await stored_exchanges(settings, CHEUNG_FUN))[-1].model_version == "base"
    assert await active_version(settings) == "base"


# -- a bot killed mid-training, and started again ---------------------------------------------


def dishbot_environment(
    telegram: TelegramEmulator, tiny_internvl: Path, data_dir: Path
) -> dict[str, str]:
    """`dishbot run`'s settings, as an operator sets them: DISHBOT_* variables."""
    training = {f"DISHBOT_TRAINING__{key.upper()}": str(value) for key, value in ENDLESS.items()}
    return {
        **os.environ,
        **training,
        "DISHBOT_DATA_DIR": str(data_dir),
        "DISHBOT_ADMINS": f"telegram:{ADMIN.id}",
        "DISHBOT_TELEGRAM__TOKEN": telegram.token,
        "DISHBOT_TELEGRAM__BASE_URL": telegram.base_url,
        "DISHBOT_TELEGRAM__BASE_FILE_URL": telegram.base_file_url,
        "DISHBOT_ENGINE__BACKEND": "transformers",
        "DISHBOT_ENGINE__MODEL": str(tiny_internvl),
        "DISHBOT_ENGINE__DEVICE": "cpu",
        "DISHBOT_ENGINE__MAX_TILES": "1",
        "DISHBOT_ENGINE__MAX_NEW_TOKENS": "8",
        "DISHBOT_LIMITS__QUESTIONS_PER_MINUTE": "60",
    }


class BotProcesses:
    """`dishbot run` processes started by a test, their logs kept, all stopped at the end."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.started: list[asyncio.subprocess.Process] = []

    async def start(self, telegram: TelegramEmulator) -> asyncio.subprocess.Process:
        polls = len(telegram.calls("getUpdates"))
        with (self.logs / f"dishbot-{len(self.started) + 1}.log").open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).with_name("dishbot")),
                "run",
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.started.append(process)
        await until(lambda: len(telegram.calls("getUpdates")) > polls, PROCESS_GUARD_S)
        return process

    async def stop_all(self) -> None:
        for process in self.started:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), GUARD_S)
                except TimeoutError:
                    process.kill()
                    await process.wait()

    def log(self, number: int) -> str:
        return (self.logs / f"dishbot-{number}.log").read_text(errors="replace")


async def test_a_bot_killed_mid_training_ends_the_run_on_restart_and_tells_the_admin(
    tiny_internvl: Path, tmp_path: Path, telegram: TelegramEmulator
) -> None:
    data_dir = tmp_path / "run-data"
    settings = Settings(data_dir=data_dir)  # to read the database as the operator would
    bots = BotProcesses(dishbot_environment(telegram, tiny_internvl, data_dir), tmp_path)
    group = Group(telegram)
    trainers: list[int] = []
    try:
        first = await bots.start(telegram)
        await give_feedback(group)
        send_command(telegram, ADMIN, "/retrain")
        orphan = await training_under_way(telegram, settings)
        trainers.append(orphan)

        first.kill()
        await first.wait()
        # The trainer leads its own session: the SIGKILL left it running, ownerless.
        assert group_alive(orphan), "the trainer outlived the bot"
        [left] = await runs_of(settings)
        assert left.stage is RunStage.TRAINING

        await bots.start(telegram)
        restarted = time.monotonic()  # polling: the adapters are up, recovery comes next
        told = "the bot restarted during the run (it was training)"
        await until(lambda: any(told in text for text in admin_texts(telegram)), GUARD_S)
        telling = time.monotonic() - restarted
        await gone_within(orphan, STOPPED_WITHIN_S)
        [ended] = await runs_of(settings)
        [message] = [text for text in admin_texts(telegram) if told in text]

        again = send_command(telegram, ADMIN, "/retrain")
        accepted = await reply_to(telegram, ADMIN, again)
        runs = await runs_of(settings)
        trainers.extend(run.trainer_pgid for run in runs if run.trainer_pgid is not None)
    finally:
        await bots.stop_all()
        for trainer in trainers:
            kill_group(trainer)

    assert telling < STOPPED_WITHIN_S, bots.log(2)
    assert ended.stage is RunStage.FAILED
    assert ended.error == told
    assert message.startswith("Retraining run 1: failed"), message
    assert accepted.startswith("Retraining run 2:"), accepted
    assert [run.id for run in runs] == [2, 1]


async def test_a_run_whose_supervisor_on_another_host_went_quiet_is_ended_while_the_bot_serves(
    tiny_internvl: Path, tmp_path: Path, telegram: TelegramEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bot.app.RECOVER_INTERVAL_S", 0.2)
    settings = loop_settings(tiny_internvl, tmp_path, telegram, RECIPE)
    telegram.add_chat(ADMIN.private_chat)  # the admin has talked to the bot before

    async with dishbot_running(settings, telegram):
        # A `dishbot retrain` on a training host started run 1, then that host went away.
        async def orphan(store: Store) -> TrainingRunRecord:
            admin = await store.upsert_user("telegram", str(ADMIN.id))
            run = await store.create_training_run(
                requested_by=admin.id,
                report_to=ReportTarget("telegram", str(ADMIN.id)),
                host="gpu-host-that-is-gone",
                pid=4242,
            )
            await store.update_training_run(run.id, stage=RunStage.TRAINING)
            async with AsyncSession(store.engine) as session, session.begin():
                stale = utcnow() - timedelta(minutes=5)
                await session.execute(
                    update(TrainingRun).where(TrainingRun.id == run.id).values(updated_at=stale)
                )
            return run

        run = await with_store(settings, orphan)
        await until(
            lambda: any(
                t.startswith(f"Retraining run {run.id}: failed") for t in admin_texts(telegram)
            ),
            GUARD_S,
        )

    ended = await with_store(settings, lambda store: store.get_training_run(run.id))
    assert ended is not None
    assert ended.stage is RunStage.FAILED
