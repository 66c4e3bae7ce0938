"""The export's README.md: what is in the data, where it came from, how to train on it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from bot.settings import TrainingSettings
from bot.training.export.summary import ExportSummary
from bot.training.export.xtuner_config import CONFIG_NAME, iterations_per_run

TOP_DISHES_LISTED = 20
# XTuner's modules, run with the environment's own python: the `xtuner train` wrapper runs
# whatever `python` is first on PATH and exits 0 even when training failed.
TRAIN_MODULE = "xtuner.tools.train"
CONVERT_MODULE = "xtuner.configs.internvl.v1_5.convert_to_official"
# Where XTuner puts checkpoints when run in the export's directory (its own default name).
WORK_DIR = "work_dirs/" + CONFIG_NAME.removesuffix(".py")
# On one GPU DeepSpeed looks for MPI unless the process says which rank it is.
ONE_GPU_ENVIRONMENT = "RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500"


@dataclass(frozen=True, slots=True)
class CardContext:
    """What the card says besides the counts: the filters and where the data came from."""

    source_database: str
    system_prompt: str
    since: datetime | None
    until: datetime | None
    val_fraction: float
    min_votes: int
    include_unrated: bool


def train_command(deepspeed: str) -> str:
    """The command that trains on an export, run inside its directory."""
    return f"python -m {TRAIN_MODULE} {CONFIG_NAME} --work-dir {WORK_DIR} --deepspeed {deepspeed}"


def convert_command(train_samples: int, training: TrainingSettings) -> str:
    """The command that turns the last checkpoint into a model dishbot can serve."""
    last = iterations_per_run(train_samples, training)
    return f"python -m {CONVERT_MODULE} {CONFIG_NAME} {WORK_DIR}/iter_{last}.pth ./fine-tuned-model"


def render_dataset_card(
    summary: ExportSummary, training: TrainingSettings, context: CardContext
) -> str:
    """The text of the export's README.md."""
    sections = [
        _overview(summary, training, context),
        _counts(summary),
        _ratings(summary),
        _dishes(summary),
        _model_versions(summary),
        _selection(training, context),
        _how_to_train(summary, training, context),
    ]
    return "\n\n".join(sections) + "\n"


def _overview(summary: ExportSummary, training: TrainingSettings, context: CardContext) -> str:
    period = ""
    if summary.first_question_at and summary.last_question_at:
        period = (
            f" Conversations started between {_date(summary.first_question_at)} and "
            f"{_date(summary.last_question_at)}."
        )
    return (
        "# dishbot training data\n\n"
        f"Food-photo questions and the answers dishbot's users approved or corrected, "
        f"exported by `dishbot export` from {context.source_database} for fine-tuning "
        f"`{training.base_model}` with XTuner's InternVL2 LoRA recipe.{period}\n\n"
        f"- `train.jsonl`: {summary.train_samples:,} samples; `val.jsonl`: "
        f"{summary.val_samples:,} samples (split by photo: no photo is in both)\n"
        f"- `images/`: {summary.photos:,} photos, named by their sha256\n"
        f"- `{CONFIG_NAME}`: the XTuner config; `internvl_meta.json`: the same data for "
        "InternVL's own fine-tuning scripts\n"
        "- `manifest.json`: filters, source, counts and the sha256 of every file"
    )


def _counts(summary: ExportSummary) -> str:
    rows = [("exported", summary.exported_answers)]
    rows += [(f"held back: {r}", n) for r, n in _by_count(summary.held_back())]
    rows += [(f"excluded: {r}", n) for r, n in _by_count(summary.excluded())]
    text = "## Counts\n\n" + _table(("answers", "count"), rows)
    if summary.samples_left_out:
        text += "\n\nSamples not written:\n\n" + _table(
            ("reason", "samples"), _by_count(summary.samples_left_out)
        )
    ignored = summary.ignored_ratings + summary.ignored_corrections
    if ignored:
        text += (
            f"\n\nIgnored feedback from banned or distrusted users: "
            f"{summary.ignored_ratings:,} ratings, {summary.ignored_corrections:,} corrections."
        )
    if summary.missing_photos:
        text += (
            f"\n\nPhoto files missing or damaged: {summary.missing_photos:,} "
            f"({', '.join(summary.missing_photo_examples)}); their samples were left out."
        )
    return text


def _ratings(summary: ExportSummary) -> str:
    rows = list(summary.rating_distribution.items())
    return (
        "## Ratings of the answers considered\n\n"
        f"{summary.votes_up:,} 👍 and {summary.votes_down:,} 👎 in all.\n\n"
        + _table(("answers", "count"), rows)
    )


def _dishes(summary: ExportSummary) -> str:
    if not summary.top_dishes:
        return "## Most frequent dishes\n\nNone yet."
    return "## Most frequent dishes\n\n" + _table(
        ("dish", "samples"), summary.top_dishes[:TOP_DISHES_LISTED]
    )


def _model_versions(summary: ExportSummary) -> str:
    if not summary.model_versions:
        return "## Answers came from\n\nNo answers were exported."
    return "## Answers came from\n\n" + _table(
        ("model version", "answers exported"), sorted(summary.model_versions.items())
    )


def _selection(training: TrainingSettings, context: CardContext) -> str:
    since = _date(context.since) if context.since else "the beginning"
    until = _date(context.until) if context.until else "now"
    unrated = (
        "may stand as context before a later turn that qualifies"
        if context.include_unrated
        else "are left out"
    )
    return (
        "## How samples were chosen\n\n"
        f"- Conversations started from {since} until {until} (UTC, end excluded).\n"
        f"- An answer qualifies with at least {context.min_votes} more 👍 than 👎 (its own "
        "words are the target), or with an accepted correction (the correction is the "
        "target). A correction is accepted from an admin, from a trusted user, or when "
        f"{training.agreeing_corrections} users gave the same one.\n"
        f"- Unrated answers {unrated}. Banned users' questions and feedback are ignored.\n"
        f"- One user's questions and corrections yield at most "
        f"{training.max_samples_per_user} samples; the same photo and question, once.\n"
        f"- Samples estimated longer than {training.max_length} tokens (image included) "
        "are left out, since the loader would cut them.\n"
        f"- {context.val_fraction:.0%} of the photos, chosen by their sha256, go to "
        "validation.\n"
        f"- Training runs under XTuner's system prompt: `{context.system_prompt}`"
    )


def _how_to_train(summary: ExportSummary, training: TrainingSettings, context: CardContext) -> str:
    return (
        "## Train and convert\n\n"
        "In this directory, with the python of XTuner's environment (dishbot's README, "
        '"The XTuner environment"), on one GPU:\n\n'
        "```sh\n"
        f"export {ONE_GPU_ENVIRONMENT}\n"
        f"{train_command(training.deepspeed)}\n"
        f"{convert_command(summary.train_samples, training)}\n"
        "```\n\n"
        f"Training succeeded when it exited with status 0 and `{WORK_DIR}/last_checkpoint` "
        "names the last checkpoint. Its number above is for one GPU; on more, start the "
        f"training with `python -m torch.distributed.run --nproc_per_node N -m {TRAIN_MODULE} "
        "... --launcher pytorch` and convert the checkpoint `last_checkpoint` names. "
        "The conversion leaves out the model's own code under transformers 4.48: copy every "
        f"`*.py` of `{training.base_model}`, and its `generation_config.json`, into "
        "`./fine-tuned-model`. Serve the converted model with the system prompt above and "
        "XTuner's prompt layout, as dishbot does for XTuner-trained versions."
    )


def _table(header: tuple[str, str], rows: Iterable[tuple[str, int]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---:|"]
    for label, count in rows:
        lines.append(f"| {_cell(str(label))} | {count:,} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _by_count(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _date(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")
