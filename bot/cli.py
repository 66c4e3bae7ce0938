"""The ``dishbot`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.adapters.console import chat
from bot.app import App
from bot.errors import DishbotError
from bot.logs import REDACTED, configure_logging
from bot.settings import Settings, load_settings, redact_url
from bot.store import Store
from bot.store.database import database_errors, missing_sqlite_file, open_engine
from bot.store.schema import current_revision, ensure_schema, head_revision, upgrade
from bot.training import ExportError, ExportOptions, ExportSummary, export_dataset, parse_moment
from bot.training.export.progress import TerminalProgress

Handler = Callable[[Settings, argparse.Namespace], int]
T = TypeVar("T")
# 128 + SIGPIPE: what a shell reports for cat or seq when the reader stops early (`| head`).
EXIT_READER_GONE = 141


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
    return parser


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """`dishbot run`: start the bots and keep them running."""
    asyncio.run(App(settings).run())
    return 0


def cmd_chat(settings: Settings, args: argparse.Namespace) -> int:
    """`dishbot chat IMAGE [QUESTION]`: the console adapter."""
    asyncio.run(chat(settings, args.image, args.question))
    return 0


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
