"""The ``dishbot`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TextIO, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.adapters.console import chat
from bot.app import App
from bot.engine_setup import build_engine
from bot.errors import DishbotError, NotFound
from bot.logs import REDACTED, configure_logging
from bot.settings import Settings, load_settings, redact_url
from bot.store import (
    ModelVersionRecord,
    RunInProgress,
    RunStage,
    Store,
    TrainingRunRecord,
)
from bot.store.database import database_errors, missing_sqlite_file, open_engine
from bot.store.models import utcnow
from bot.store.schema import current_revision, ensure_schema, head_revision, upgrade
from bot.training import ExportError, ExportOptions, ExportSummary, export_dataset, parse_moment
from bot.training.evaluation import SET_NAMES, candidate_means
from bot.training.export.progress import TerminalProgress
from bot.training.report import (
    SET_LABELS,
    duration,
    progress_line,
    render_run,
    run_title,
    stage_name,
    stage_progress,
)
from bot.training.runs import RunSupervisor
from bot.training.trainers import trainer_for
from bot.training.trainers.process import log_tail
from bot.training.versions import activate, ensure_base_version, model_spec, rollback

Handler = Callable[[Settings, argparse.Namespace], int]
T = TypeVar("T")
# 128 + SIGPIPE: what a shell reports for cat or seq when the reader stops early (`| head`).
EXIT_READER_GONE = 141
# How `dishbot retrain` ended, for scripts (its --help lists them).
EXIT_RUN_FAILED = 1  # failed or cancelled
EXIT_RUN_REJECTED = 2  # the evaluation gate kept the active model
EXIT_RUN_BUSY = 3  # another run holds the one training slot
RUN_EXIT_STATUS = {
    RunStage.DONE: 0,
    RunStage.REJECTED: EXIT_RUN_REJECTED,
    RunStage.FAILED: EXIT_RUN_FAILED,
    RunStage.CANCELLED: EXIT_RUN_FAILED,
}
RETRAIN_EPILOG = f"""\
exit status:
  0  done: the new model was promoted (or the dry run finished)
  {EXIT_RUN_FAILED}  the run failed or was cancelled (the error and the trainer's log tail
     are on stderr), or it could not start
  {EXIT_RUN_REJECTED}  the evaluation gate rejected the new model: the active model is unchanged
  {EXIT_RUN_BUSY}  another run is going (its progress is on stderr): nothing was started
"""
RUNS_LISTED = 20


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every `dishbot` subcommand."""
    parser = argparse.ArgumentParser(
        prog="dishbot",
        description="A food-photo chatbot for Telegram and Discord, answered by a local "
        "InternVL model. Settings come from DISHBOT_* environment variables and dishbot.toml "
        "(or the file named by DISHBOT_CONFIG).",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback when something fails"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="start the configured chat bots")
    run.set_defaults(handler=cmd_run)

    chat = commands.add_parser(
        "chat",
        help="ask the configured model about a photo from the terminal",
        description="Stream the model's answer about IMAGE; when stdin is a terminal, "
        "keep taking follow-up questions about the same photo until end of input (Ctrl-D).",
    )
    chat.add_argument("image", type=Path, help="a JPEG, PNG, WebP or HEIC photo")
    chat.add_argument("question", nargs="?", help='default: "What dish is this?"')
    chat.set_defaults(handler=cmd_chat)

    commands.add_parser(
        "doctor",
        help="check what `dishbot run` needs; one line per check, with the fix",
        description="Check Python and packages, the settings, torch and the GPU, the backend, "
        "the model, the database, the chat platforms' tokens, retraining, disk space and the "
        "web console's port. Each line is ok, warn or FAIL; exit status 1 when a FAIL means "
        "`dishbot run` would not start or not answer.",
    )

    config = commands.add_parser("config", help="print the effective settings, secrets hidden")
    config.set_defaults(handler=cmd_config)

    db = commands.add_parser("db", help="database schema: upgrade, current")
    db_commands = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    db_upgrade = db_commands.add_parser(
        "upgrade", help="create the database or migrate it to the newest schema"
    )
    db_upgrade.set_defaults(handler=cmd_db_upgrade)
    db_current = db_commands.add_parser("current", help="show the database's schema revision")
    db_current.set_defaults(handler=cmd_db_current)

    export = commands.add_parser(
        "export",
        help="export users' feedback as XTuner fine-tuning data",
        description="Write the answers users approved or corrected as XTuner/InternVL "
        "fine-tuning data into DIR: images, train.jsonl, val.jsonl, xtuner_config.py, "
        "internvl_meta.json, a dataset card (README.md) and manifest.json. DIR must be new, "
        "empty, or an earlier export, which is replaced.",
    )
    export.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write")
    export.add_argument(
        "--since",
        metavar="WHEN",
        help="only conversations started at or after WHEN (YYYY-MM-DD or ISO time; UTC)",
    )
    export.add_argument(
        "--until",
        metavar="WHEN",
        help="only conversations started before WHEN; a bare date includes that day",
    )
    export.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="share of photos held out for validation, chosen by photo hash (default 0.1)",
    )
    export.add_argument(
        "--min-votes",
        type=int,
        default=1,
        metavar="N",
        help="how many more 👍 than 👎 an answer needs (default 1)",
    )
    export.add_argument(
        "--include-unrated",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="let an unrated turn stand as context before a later approved turn of the same "
        "conversation (default: no)",
    )
    export.set_defaults(handler=cmd_export)
    _add_training_commands(commands)
    return parser


def _add_training_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`dishbot retrain`, `dishbot runs [show|cancel]` and `dishbot models [activate|rollback]`."""
    retrain = commands.add_parser(
        "retrain",
        help="fine-tune the active model on users' feedback; promote it if it is better",
        description="Export the feedback, fine-tune the active model on it with the trainer\n"
        "training.trainer names, evaluate the candidate against the active model (held out,\n"
        "taught, kept) and promote it when the gate says so. Progress goes to stderr, the\n"
        "evaluation table and the decision to stdout. Every bot on the same database\n"
        "(`dishbot run`) switches to a promoted model within training.follow_interval_s.",
        epilog=RETRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    retrain.add_argument(
        "--force", action="store_true", help="promote the new model whatever the evaluation says"
    )
    retrain.add_argument(
        "--dry-run",
        action="store_true",
        help="export and print the plan (samples, iterations, trainer) without training",
    )
    retrain.set_defaults(handler=cmd_retrain)

    runs = commands.add_parser(
        "runs",
        help="list retraining runs; show or cancel one",
        description=f"Without a command: the newest {RUNS_LISTED} retraining runs.",
    )
    runs.set_defaults(handler=cmd_runs)
    runs_commands = runs.add_subparsers(dest="runs_command", metavar="RUNS_COMMAND")
    show = runs_commands.add_parser(
        "show", help="one run: where it is or how it ended, its evaluation and its log's tail"
    )
    show.add_argument("run_id", type=int, metavar="ID")
    show.set_defaults(handler=cmd_runs_show)
    cancel = runs_commands.add_parser(
        "cancel",
        help="cancel a running run, whichever process supervises it; its trainer stops",
    )
    cancel.add_argument("run_id", type=int, metavar="ID")
    cancel.set_defaults(handler=cmd_runs_cancel)

    models = commands.add_parser(
        "models",
        help="list model versions with their scores; activate one or roll back",
        description="Without a command: every model version, the active one marked, with the "
        "mean scores its evaluation gave it as the candidate.",
    )
    models.set_defaults(handler=cmd_models)
    models_commands = models.add_subparsers(dest="models_command", metavar="MODELS_COMMAND")
    activate_version = models_commands.add_parser(
        "activate", help="make VERSION the one every bot on this database answers with"
    )
    activate_version.add_argument("version", metavar="VERSION")
    activate_version.set_defaults(handler=cmd_models_activate)
    back = models_commands.add_parser(
        "rollback", help="reactivate the version that was active before the current one"
    )
    back.set_defaults(handler=cmd_models_rollback)


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """`dishbot run`: start the bots and keep them running."""
    asyncio.run(App(settings).run())
    return 0


def cmd_chat(settings: Settings, args: argparse.Namespace) -> int:
    """`dishbot chat IMAGE [QUESTION]`: the console adapter."""
    asyncio.run(chat(settings, args.image, args.question))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """`dishbot doctor`: one line per check, with the fix; 1 when `dishbot run` would fail."""
    from bot.doctor import diagnose

    return diagnose()


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    """`dishbot config`: the effective settings as JSON, with secrets redacted."""
    print(json.dumps(settings.redacted(), indent=2, ensure_ascii=False))
    return 0


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    """`dishbot db upgrade`: create or migrate the database to head."""

    async def migrate(engine: AsyncEngine) -> tuple[str | None, str | None]:
        before = await current_revision(engine)
        await upgrade(engine)
        return before, await current_revision(engine)

    before, after = _on_database(settings, migrate)
    where = redact_url(settings.db_url)
    if before == after:
        print(f"{where}: schema already at revision {after} (head)")
    else:
        print(f"{where}: schema upgraded from {before or 'nothing'} to revision {after} (head)")
    return 0


def cmd_db_current(settings: Settings, args: argparse.Namespace) -> int:
    """`dishbot db current`: which schema revision the database is at."""
    missing = missing_sqlite_file(settings.db_url)
    if missing is not None:  # don't create an empty database just to look at it
        print(f"no database at {missing} yet; run `dishbot db upgrade`")
        return 0
    revision = _on_database(settings, current_revision)
    head = head_revision()
    where = redact_url(settings.db_url)
    if revision is None:
        print(f"{where}: no dishbot schema yet; run `dishbot db upgrade`")
    elif revision == head:
        print(f"{where}: schema at revision {revision} (head)")
    else:
        print(f"{where}: schema at revision {revision}, head is {head}; run `dishbot db upgrade`")
    return 0


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    """`dishbot export --out DIR`: write the feedback as fine-tuning data, with a progress bar."""
    options = ExportOptions(
        since=parse_moment(args.since) if args.since else None,
        until=parse_moment(args.until, end_of_day=True) if args.until else None,
        val_fraction=args.val_fraction,
        min_votes=args.min_votes,
        include_unrated=args.include_unrated,
    )
    missing = missing_sqlite_file(settings.db_url)
    if missing is not None:  # don't create an empty database just to export nothing
        raise ExportError(f"no database at {missing}; there is nothing to export")
    progress = TerminalProgress(sys.stderr)

    async def export() -> ExportSummary:
        store = Store.open(settings.db_url, settings.data_dir)
        try:
            async with database_errors(settings.db_url):
                await ensure_schema(store.engine, auto_upgrade=False)
            return await export_dataset(store, settings, args.out, options, progress)
        finally:
            await store.close()

    try:
        summary = asyncio.run(export())
    finally:
        progress.close()
    for line in summary.lines():
        print(line)
    return 0


class NoDatabase(DishbotError):
    """A command about the bot's runs or models was given before any database exists."""


class RunNotRunning(DishbotError):
    """A run was to be cancelled that has already ended."""


class RunProgress:
    """A run's stage and progress on ``stream`` (stderr), as `RunSupervisor`'s ``notify``.

    On a terminal one line is redrawn in place: the stage, a bar with the percent, the loss
    and the time left. Elsewhere (a log file, CI) a plain line per stage and per tenth of it.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.is_tty = stream.isatty()
        self._shown: tuple[str, int] | None = None
        self._drawn = False

    async def show(self, run: TrainingRunRecord) -> None:
        """Show where ``run`` is; an ended run is left to the caller, which prints it whole."""
        if run.finished:
            return
        text, stage, fraction = _progress_text(run)
        if self.is_tty:
            self.stream.write(f"\r\x1b[K{text}")  # \x1b[K: clear what a longer line left
            self.stream.flush()
            self._drawn = True
            return
        step = (stage, int(fraction * 10))
        if step != self._shown:
            self._shown = step
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line, so that what follows starts on a fresh one."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _progress_text(run: TrainingRunRecord) -> tuple[str, str, float]:
    """``run``'s one progress line, the stage it is about and how far that stage is (0..1)."""
    progress = stage_progress(run)
    if progress is None:
        return f"run {run.id}: {stage_name(run.stage.value)}", run.stage.value, 0.0
    stage, fraction, loss, eta_s = progress
    line = progress_line(fraction=fraction, loss=loss, eta_s=eta_s)
    return f"run {run.id}: {stage_name(stage)} {line}", stage, fraction


def cmd_retrain(settings: Settings, args: argparse.Namespace) -> int:
    """`dishbot retrain [--force] [--dry-run]`: one run, watched to its end (see its epilog)."""
    progress = RunProgress(sys.stderr)

    async def retrain(store: Store) -> tuple[TrainingRunRecord, str | None]:
        return await _retrain(store, settings, progress, force=args.force, dry_run=args.dry_run)

    try:
        run, version = _on_store(settings, retrain)
    except RunInProgress as busy:
        progress.close()
        print(f"dishbot: {busy}; nothing was started\n\n{render_run(busy.run)}", file=sys.stderr)
        return EXIT_RUN_BUSY
    finally:
        progress.close()
    status = RUN_EXIT_STATUS[run.stage]
    if status == EXIT_RUN_FAILED:
        print(_run_report(run) + _log_tail_unless_shown(run), file=sys.stderr)
        return status
    print(_run_report(run, version))
    if version is not None:
        print(_switch_words(settings))
    return status


async def _retrain(
    store: Store, settings: Settings, progress: RunProgress, *, force: bool, dry_run: bool
) -> tuple[TrainingRunRecord, str | None]:
    """Start a run, supervise it here until it ends; the run and the version now answering."""
    trainer = trainer_for(settings)  # a setting no trainer fits fails before a model loads
    active = await ensure_base_version(store, settings)
    # The active model answers the evaluation beside the candidate, so this process serves it
    # too; a bot on the same database learns of a promotion from the active row.
    engine = build_engine(settings, model_spec(active))
    runs = RunSupervisor(store, settings, engine, lambda _: trainer, notify=progress.show)
    async with contextlib.AsyncExitStack() as stack:
        if not dry_run:  # a dry run never asks the model anything
            await _refuse_if_busy(store, runs)
            await stack.enter_async_context(engine)
        run_id = await runs.start(None, None, force=force, dry_run=dry_run)
        try:
            run = await runs.wait(run_id)
        except asyncio.CancelledError:  # Ctrl-C: the run ends cancelled, its trainer with it
            ended = await runs.cancel(run_id)
            progress.close()
            print(_run_report(ended), file=sys.stderr)
            raise
        finally:
            await runs.close()
    if run.stage is not RunStage.DONE or run.model_version_id is None:
        return run, None
    now_active = await store.active_model_version()
    return run, now_active.name if now_active is not None else None


async def _refuse_if_busy(store: Store, runs: RunSupervisor) -> None:
    """Raise `RunInProgress` before loading a model only to be refused (`start` decides for
    good); a run whose supervisor is gone is ended first, as `start` would."""
    await runs.recover()
    running = await store.running_training_run()
    if running is not None:
        raise RunInProgress(running)


def _run_report(run: TrainingRunRecord, version: str | None = None) -> str:
    """`render_run`'s report, except that a dry run does not claim a new model answers."""
    report = render_run(run, version=version)
    if not (run.dry_run and run.stage is RunStage.DONE):
        return report
    _title, _, rest = report.partition("\n")
    return f"{run_title(run.id)}: dry run done, nothing was trained\n{rest}"


def _log_tail_unless_shown(run: TrainingRunRecord) -> str:
    """The trainer's log tail, when the run's error does not carry it already."""
    tail = log_tail(Path(run.log_path)) if run.log_path else ""
    if not tail or tail in (run.error or ""):
        return ""
    return f"\n\nthe end of {run.log_path}:\n{tail}"


def _switch_words(settings: Settings) -> str:
    interval = settings.training.follow_interval_s
    return f"every running bot switches to it within {interval:g} s (training.follow_interval_s)"


def cmd_runs(settings: Settings, args: argparse.Namespace) -> int:
    """`dishbot runs`: the newest runs, one line each."""
    runs = _on_store(settings, lambda store: store.training_runs(limit=RUNS_LISTED))
    if not runs:
        print("no retraining runs yet; start one with `dishbot retrain`")
        return 0
    rows = [("RUN", "STAGE", "TRAINER", "STARTED (UTC)", "TOOK", "")]
    rows += [
        (
            str(run.id),
            run.stage.value,
            run.trainer or "–",
            _moment(run.started_at or run.created_at),
            _took(run),
            _outcome(run),
        )
        for run in runs
    ]
    _print_table(rows)
    return 0


def _took(run: TrainingRunRecord) -> str:
    """How long a run took, or has been going."""
    started = run.started_at or run.created_at
    return duration(((run.finished_at or utcnow()) - started).total_seconds())


def _outcome(run: TrainingRunRecord) -> str:
    """What a run's line in `dishbot runs` ends with: its progress, decision or error."""
    if not run.finished:
        text, _stage, _fraction = _progress_text(run)
        return text.partition(": ")[2]
    return (run.error or run.decision or "").strip().partition("\n")[0]


def cmd_runs_show(settings: Settings, args: argparse.Namespace) -> int:
    """`dishbot runs show ID`: the run as the admin who started it saw it, and its log's tail."""

    async def show(store: Store) -> tuple[TrainingRunRecord, ModelVersionRecord | None]:
        run = await _training_run(store, args.run_id)
        versions = await store.model_versions()
        return run, next((v for v in versions if v.id == run.model_version_id), None)

    run, version = _on_store(settings, show)
    kind = "".join([", forced" if run.force else "", ", dry run" if run.dry_run else ""])
    details = [
        f"trainer: {run.trainer or '–'}{kind}",
        f"started: {_moment(run.started_at or run.created_at)} UTC"
        + (f", ended {_moment(run.finished_at)} UTC" if run.finished_at else ""),
    ]
    if version is not None:
        details.append(
            f"model version: {version.name}" + (" (active)" if version.is_active else "")
        )
    if run.run_dir:
        details.append(f"files: {run.run_dir}")
    print(_run_report(run) + "\n\n" + "\n".join(details))
    tail = log_tail(Path(run.log_path)) if run.log_path else ""
    if tail:
        print(f"\nthe end of {run.log_path}:\n{tail}")
    return 0


def cmd_runs_cancel(settings: Settings, args: argparse.Namespace) -> int:
    """`dishbot runs cancel ID`: end a running run, wherever it is supervised."""

    async def cancel(store: Store) -> tuple[TrainingRunRecord, TrainingRunRecord]:
        before = await _training_run(store, args.run_id)
        if before.finished:
            raise RunNotRunning(
                f"training run {before.id} has already ended ({before.stage}); nothing to cancel"
            )
        # Cancelling only needs the store: the supervisor never starts this engine.
        runs = RunSupervisor(store, settings, build_engine(settings), trainer_for)
        return before, await runs.cancel(before.id)

    before, ended = _on_store(settings, cancel)
    if ended.stage is not RunStage.CANCELLED:  # it ended on its own in the meantime
        raise RunNotRunning(
            f"training run {ended.id} ended {ended.stage} before it could be cancelled"
        )
    print(f"training run {ended.id} cancelled (it was {stage_name(before.stage.value)})")
    return 0


def cmd_models(settings: Settings, args: argparse.Namespace) -> int:
    """`dishbot models`: every version, the active one marked, with its scores."""
    versions = _on_store(settings, lambda store: store.model_versions())
    if not versions:
        print(
            "no model versions yet: `dishbot run` or `dishbot retrain` registers engine.model "
            'as "base"'
        )
        return 0
    labels = tuple(SET_LABELS[name]["en"].upper() for name in SET_NAMES)
    rows = [("", "VERSION", *labels, "TRAINER", "RUN", "CREATED (UTC)", "PATH")]
    for version in versions:
        rows.append(
            (
                "*" if version.is_active else "",
                version.name,
                *_candidate_scores(version),
                version.trainer or "–",
                str(version.run_id) if version.run_id is not None else "–",
                _moment(version.created_at),
                version.path,
            )
        )
    _print_table(rows)
    print("\n* answering now; scores: the version's mean as the candidate in its evaluation (0..1)")
    return 0


def _candidate_scores(version: ModelVersionRecord) -> list[str]:
    """The mean score per set (held out, taught, kept) its evaluation gave it; – for none."""
    means = candidate_means(version.evaluation)
    return ["–" if means[name] is None else f"{means[name]:.2f}" for name in SET_NAMES]


def cmd_models_activate(settings: Settings, args: argparse.Namespace) -> int:
    """`dishbot models activate VERSION`: every bot on this database switches to VERSION."""

    async def switch(store: Store) -> ModelVersionRecord:
        try:
            return await activate(store, args.version)
        except NotFound:
            known = ", ".join(v.name for v in await store.model_versions()) or "none yet"
            raise NotFound(
                f"there is no model version {args.version!r} (versions: {known})"
            ) from None

    version = _on_store(settings, switch)
    print(f"{version.name} is the active model version: {_switch_words(settings)}")
    return 0


def cmd_models_rollback(settings: Settings, args: argparse.Namespace) -> int:
    """`dishbot models rollback`: the version active before the current one answers again."""
    version = _on_store(settings, rollback)
    print(
        f"rolled back: {version.name} is the active model version again; {_switch_words(settings)}"
    )
    return 0


async def _training_run(store: Store, run_id: int) -> TrainingRunRecord:
    run = await store.get_training_run(run_id)
    if run is None:
        raise NotFound(f"there is no training run {run_id} (`dishbot runs` lists them)")
    return run


def _moment(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M")


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    """Rows as left-aligned columns two spaces apart; the first row is the heading."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _on_store(settings: Settings, action: Callable[[Store], Awaitable[T]]) -> T:
    """Run ``action`` on the bot's store (which must exist, at the newest schema), then close it."""

    async def go() -> T:
        missing = missing_sqlite_file(settings.db_url)
        if missing is not None:  # don't create an empty database to look into
            raise NoDatabase(
                f"no database at {missing} yet: nothing has been asked or trained "
                "(`dishbot run` creates it)"
            )
        store = Store.open(settings.db_url, settings.data_dir)
        try:
            async with database_errors(settings.db_url):
                await ensure_schema(store.engine, auto_upgrade=False)
            return await action(store)
        finally:
            await store.close()

    return asyncio.run(go())


def _on_database(settings: Settings, action: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run ``action`` on an engine for the configured database, then close it."""

    async def go() -> T:
        engine = open_engine(settings.db_url)
        try:
            async with database_errors(settings.db_url):
                return await action(engine)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `dishbot` command; returns the process exit status."""
    args = build_parser().parse_args(argv)
    secrets: list[str] = []
    try:
        if args.command == "doctor":  # unreadable settings are one of its lines
            return cmd_doctor(args)
        settings = load_settings()
        secrets = settings.secret_values()
        configure_logging(settings.log_level, secrets)
        handler: Handler = args.handler
        status = handler(settings, args)
        sys.stdout.flush()  # a reader that has gone is found here, not in Python's exit
        return status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except DishbotError as exc:
        _print_error(str(exc), secrets, show_traceback=args.debug)
        return 1
    except Exception as exc:
        message = f"unexpected error: {type(exc).__name__}: {exc}"
        if not args.debug:
            message += " (run `dishbot --debug ...` for the traceback)"
        _print_error(message, secrets, show_traceback=args.debug)
        return 1


def _reader_gone() -> int:
    """End quietly once whoever read stdout has closed it, as `dishbot config | head -3` does."""
    # What is left in stdout's buffer would fail again when Python flushes it at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_READER_GONE


def _print_error(message: str, secrets: Sequence[str], *, show_traceback: bool) -> None:
    """One line on stderr (after the traceback, if asked for), with secrets scrubbed."""
    text = (
        (traceback.format_exc() if show_traceback else "") + "dishbot: " + " ".join(message.split())
    )
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    print(text, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
