"""Exporting users' feedback as XTuner fine-tuning data: `export_dataset`.

The export reads the database through one consistent snapshot, streamed in photo order,
and writes into a hidden directory beside ``out_dir`` that replaces it only when complete.
The work on the files runs in a worker thread, a chunk of exchanges at a time, so the bot's
event loop stays responsive while an admin's ``/export`` runs. Re-running over the same data
writes byte-identical files: nothing depends on the clock, and every order is fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bot.settings import Settings, redact_url
from bot.store import Store
from bot.store.feedback import ExchangeFeedback, FeedbackSnapshot, feedback_snapshot
from bot.training.export.dataset_card import CardContext, render_dataset_card, train_command
from bot.training.export.errors import ExportError
from bot.training.export.export_dir import (
    EXPORT_FORMAT,
    IMAGES_DIR,
    ExportDirectory,
    ImagePlacement,
    check_output_dir,
)
from bot.training.export.options import ExportOptions, parse_moment
from bot.training.export.selection import SelectionRules
from bot.training.export.summary import ExportSummary
from bot.training.export.writer import TRAIN_FILE, VAL_FILE, DatasetWriter, WriterTally
from bot.training.export.xtuner_config import CONFIG_NAME, render_xtuner_config
from engine.prompts import XTUNER_INTERNLM2_SYSTEM_PROMPT

__all__ = [
    "ExportError",
    "ExportOptions",
    "ExportSummary",
    "export_dataset",
    "parse_moment",
]

Progress = Callable[[int, int], None]
T = TypeVar("T")

EXCHANGES_PER_CHUNK = 2000
META_NAME = "internvl_meta.json"
CARD_NAME = "README.md"
DATASET_NAME = "dishbot_train"
TOP_DISHES_KEPT = 20


async def export_dataset(
    store: Store,
    settings: Settings,
    out_dir: Path,
    options: ExportOptions,
    progress: Progress | None = None,
) -> ExportSummary:
    """Export the feedback in ``store`` as XTuner training data into ``out_dir``.

    ``out_dir`` must be new, empty, or a previous export (which is replaced); anything else
    raises `ExportError`. ``progress(done, total)`` is called as exchanges are read.
    Returns what was exported and what was left out, and why.
    """
    out_dir = await asyncio.to_thread(_checked_output_dir, out_dir)
    training = settings.training
    rules = SelectionRules(
        min_votes=options.min_votes,
        agreeing_corrections=training.agreeing_corrections,
        is_admin=settings.is_admin,
    )
    async with feedback_snapshot(store.engine) as snapshot:
        total = await snapshot.count_exchanges()
        directory = await _in_thread(ExportDirectory, out_dir)
        with directory:
            writer = DatasetWriter(
                directory,
                store.photos.data_dir,
                rules,
                options,
                max_length=training.max_length,
                max_samples_per_user=training.max_samples_per_user,
            )
            with contextlib.closing(writer):
                await _feed(snapshot, writer, total, progress)
                tally = await _in_thread(writer.finish)
            summary = _summary(out_dir, tally, training.deepspeed)
            await _in_thread(_write_companions, directory, summary, settings, options)
            await _in_thread(directory.commit)
    if progress:
        progress(total, total)
    return summary


def _checked_output_dir(out_dir: Path) -> Path:
    """``out_dir`` made absolute, refused early if the export must not write there."""
    out_dir = out_dir.absolute()
    check_output_dir(out_dir)
    return out_dir


async def _feed(
    snapshot: FeedbackSnapshot, writer: DatasetWriter, total: int, progress: Progress | None
) -> None:
    """Hand the snapshot's exchanges to ``writer`` a chunk at a time, in a worker thread."""
    if progress:
        progress(0, total)
    done = 0
    chunk: list[ExchangeFeedback] = []
    async for exchange in snapshot.exchanges():
        chunk.append(exchange)
        if len(chunk) >= EXCHANGES_PER_CHUNK:
            await _in_thread(writer.consume, chunk)
            done += len(chunk)
            chunk = []
            if progress:
                progress(min(done, total), total)
    await _in_thread(writer.consume, chunk)


async def _in_thread(function: Callable[..., T], *args: Any) -> T:
    """Run ``function`` in a worker thread; if cancelled, let it finish before going on.

    Otherwise the cleanup of a cancelled export could race the thread still writing.
    """
    task = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def _summary(out_dir: Path, tally: WriterTally, deepspeed: str) -> ExportSummary:
    return ExportSummary(
        out_dir=out_dir,
        train_samples=tally.train_samples,
        val_samples=tally.val_samples,
        answers=dict(tally.answers),
        samples_left_out=dict(tally.samples_left_out),
        photos_linked=tally.placements[ImagePlacement.LINKED],
        photos_copied=tally.placements[ImagePlacement.COPIED],
        missing_photos=tally.missing_photos,
        missing_photo_examples=tuple(tally.missing_photo_examples),
        votes_up=tally.votes_up,
        votes_down=tally.votes_down,
        rating_distribution=dict(tally.rating_distribution),
        ignored_ratings=tally.ignored_ratings,
        ignored_corrections=tally.ignored_corrections,
        top_dishes=tally.dishes.most_common(TOP_DISHES_KEPT),
        model_versions=dict(tally.model_versions),
        first_question_at=tally.first_question_at,
        last_question_at=tally.last_question_at,
        train_command=f"cd {out_dir} && {train_command(deepspeed)}",
    )


def _write_companions(
    directory: ExportDirectory, summary: ExportSummary, settings: Settings, options: ExportOptions
) -> None:
    """The files beside the records: XTuner config, InternVL meta, dataset card, manifest."""
    training = settings.training
    out_dir = directory.out_dir
    directory.write_text(
        CONFIG_NAME, render_xtuner_config(out_dir, training, summary.train_samples)
    )
    directory.write_text(META_NAME, _json_text(_internvl_meta(out_dir, summary.train_samples)))
    context = CardContext(
        source_database=redact_url(settings.db_url),
        system_prompt=XTUNER_INTERNLM2_SYSTEM_PROMPT,
        since=options.since,
        until=options.until,
        val_fraction=options.val_fraction,
        min_votes=options.min_votes,
        include_unrated=options.include_unrated,
    )
    directory.write_text(CARD_NAME, render_dataset_card(summary, training, context))
    directory.write_manifest(_manifest_header(summary, settings, options))


def _internvl_meta(out_dir: Path, train_samples: int) -> dict[str, Any]:
    """The meta file InternVL's own fine-tuning shell scripts take instead of a config."""
    return {
        DATASET_NAME: {
            "root": f"{out_dir / IMAGES_DIR}/",
            "annotation": str(out_dir / TRAIN_FILE),
            "data_augment": False,
            "repeat_time": 1,
            "length": train_samples,
        }
    }


def _manifest_header(
    summary: ExportSummary, settings: Settings, options: ExportOptions
) -> dict[str, Any]:
    training = settings.training
    return {
        "format": EXPORT_FORMAT,
        "source_database": redact_url(settings.db_url),
        "base_model": training.base_model,
        # What the data trains under: the retrained model must be served with this prompt.
        "system_prompt": XTUNER_INTERNLM2_SYSTEM_PROMPT,
        "filters": {
            "since": options.since.isoformat() if options.since else None,
            "until": options.until.isoformat() if options.until else None,
            "val_fraction": options.val_fraction,
            "min_votes": options.min_votes,
            "include_unrated": options.include_unrated,
            "agreeing_corrections": training.agreeing_corrections,
            "max_samples_per_user": training.max_samples_per_user,
            "max_length": training.max_length,
        },
        "counts": summary.counts(),
        "record_files": {"train": TRAIN_FILE, "val": VAL_FILE, "images": f"{IMAGES_DIR}/"},
    }


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
