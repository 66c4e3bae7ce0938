"""What every trainer offers a run, and the one progress format they all report in.

A trainer fine-tunes the model being served on a run's export and writes a full model
directory the engine can load. It runs the training in a subprocess (its own process group,
so cancelling reaches every process it started) and reports progress as the subprocess logs
it. Progress is read from a JSON-lines file with one object per logged iteration, in the shape
XTuner's `vis_data/scalars.json` has (``iter``, ``loss``, ``lr``, ``time``, ``memory``):
XTuner writes it itself, and dishbot's own trainer writes the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from bot.errors import DishbotError
from bot.settings import TrainingSettings

Stage = Literal["training", "converting"]

# How a fine-tuned model's prompt is laid out, recorded with its version:
# "chatml": the tokenizer's own chat template (HF-native models, dishbot's trainer);
# "xtuner-internlm2": XTuner's InternLM2 ChatML, no newline between one turn's <|im_end|>
# and the next <|im_start|>, served by the lmdeploy backend exactly so.
Template = Literal["chatml", "xtuner-internlm2"]


@dataclass(frozen=True, slots=True)
class TrainingJob:
    """One training, as a run hands it to a trainer."""

    export_dir: Path  # train.jsonl, val.jsonl, images/, xtuner_config.py, as the export wrote
    work_dir: Path  # the trainer's own: checkpoints, progress, anything else it needs
    output_dir: Path  # where the full, servable model directory goes (created by the trainer)
    log_path: Path  # the subprocesses' output, appended; its tail is shown when they fail
    base_model: str  # path of the model fine-tuned: the active version's
    system_prompt: str  # the prompt the fine-tuned model will be served with
    total_iterations: int  # epochs × iterations per epoch, as the export computed them
    max_tiles: int  # photos are tiled as the engine serves them
    training: TrainingSettings
    # Called with each subprocess's process-group id as soon as it runs, so a supervisor can
    # record it and stop the group after a restart (`process.run_logged`'s ``on_start``).
    on_process: Callable[[int], None] | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a training is: ``iteration`` of ``total`` (0 until the first is logged)."""

    stage: Stage
    iteration: int
    total: int
    loss: float | None = None
    eta_s: float | None = None  # seconds per iteration so far × iterations left

    @property
    def fraction(self) -> float:
        """How much of the stage is done, 0..1."""
        return min(1.0, self.iteration / self.total) if self.total > 0 else 0.0


@dataclass(frozen=True, slots=True)
class TrainedModel:
    """What a trainer made: a model directory, and how it must be served."""

    path: Path
    system_prompt: str
    template: Template
    notes: tuple[str, ...] = ()  # worth keeping in the run's record ("retried with batch 1")


class TrainingFailed(DishbotError):
    """The trainer could not produce a model; ``log_tail`` is the end of its log."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


ProgressCallback = Callable[[Progress], None]


class ProgressReporter:
    """Polls a trainer's progress file (wherever ``locate`` finds it, None: not yet) and
    tells ``callback`` when the progress changed."""

    def __init__(
        self, locate: Callable[[], Path | None], total: int, callback: ProgressCallback
    ) -> None:
        self._locate = locate
        self._total = total
        self._callback = callback
        self._last: Progress | None = None

    def poll(self) -> None:
        """Read the file once; call back if anything moved."""
        path = self._locate()
        if path is None:
            return
        current = read_progress(path, "training", self._total)
        if current != self._last:
            self._last = current
            self._callback(current)


class Trainer(Protocol):
    """Fine-tunes a model on an export (see the module docstring)."""

    @property
    def name(self) -> str:
        """ "xtuner" or "transformers", as recorded with the version it makes."""
        ...

    async def train(self, job: TrainingJob, progress: ProgressCallback) -> TrainedModel:
        """Train, convert, and return the model; `TrainingFailed` when it cannot.

        Cancelling the task ends every process the trainer started within seconds.
        """
        ...


def read_progress(path: Path, stage: Stage, total: int) -> Progress:
    """The latest `Progress` in a scalars-style JSON-lines file (missing: iteration 0).

    A line still being written (no newline yet, or not JSON) is skipped.
    """
    latest: dict[str, object] | None = None
    times: list[float] = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Progress(stage, 0, total)
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("iter"), int):
            latest = entry
            seconds = entry.get("time")
            if isinstance(seconds, int | float):
                times.append(float(seconds))
    if latest is None:
        return Progress(stage, 0, total)
    iteration = int(latest["iter"])  # type: ignore[call-overload]
    loss = latest.get("loss")
    per_iteration = sum(times) / len(times) if times else None
    eta = per_iteration * max(0, total - iteration) if per_iteration is not None else None
    return Progress(
        stage,
        iteration,
        total,
        loss=float(loss) if isinstance(loss, int | float) else None,
        eta_s=eta,
    )
