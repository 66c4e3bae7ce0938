"""dishbot's own trainer: transformers + peft LoRA, for HF-native InternVL checkpoints.

It fine-tunes the model the transformers backend serves, on CPU or any torch device, in a
subprocess (`bot.training.trainers.lora_train`) run in its own process group. The run's
`TrainingJob` is handed over as ``JOB.json`` in the work directory (`LoraJob`); the
subprocess writes ``progress.jsonl`` there in XTuner's ``scalars.json`` shape, which is
read back every second while it runs, and saves the merged, full model to the job's output
directory, which is checked before it is handed back.

The subprocess may use ``training.threads`` CPU threads (torch's and the BLAS libraries'),
so the bot keeps answering while it trains.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from bot.training.trainers.base import (
    ProgressCallback,
    ProgressReporter,
    TrainedModel,
    TrainingFailed,
    TrainingJob,
)
from bot.training.trainers.model_dir import loading_problem
from bot.training.trainers.process import log_tail, run_logged

ENTRY_MODULE = "bot.training.trainers.lora_train"
JOB_FILE = "JOB.json"
PROGRESS_FILE = "progress.jsonl"
# Environment variables that size the thread pools of torch's CPU kernels and BLAS.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# A seed for everything random in a training (adapter initialisation, order, dropout), so
# the same export trains the same model.
TRAINING_SEED = 0


@dataclass(frozen=True, slots=True)
class LoraJob:
    """What the training subprocess is told, as ``JOB.json``: a `TrainingJob`, flattened."""

    export_dir: Path
    work_dir: Path
    output_dir: Path
    base_model: str
    system_prompt: str
    total_iterations: int
    max_tiles: int
    epochs: int
    learning_rate: float
    batch_size: int
    accumulative_counts: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    max_length: int
    threads: int
    seed: int = TRAINING_SEED

    @classmethod
    def of(cls, job: TrainingJob) -> LoraJob:
        """The subprocess's job for ``job``, with absolute paths (it runs elsewhere)."""
        training = job.training
        return cls(
            export_dir=job.export_dir.resolve(),
            work_dir=job.work_dir.resolve(),
            output_dir=job.output_dir.resolve(),
            base_model=_absolute_if_local(job.base_model),
            system_prompt=job.system_prompt,
            total_iterations=job.total_iterations,
            max_tiles=job.max_tiles,
            epochs=training.epochs,
            learning_rate=training.learning_rate,
            batch_size=training.batch_size,
            accumulative_counts=training.accumulative_counts,
            lora_r=training.lora_r,
            lora_alpha=training.lora_alpha,
            lora_dropout=training.lora_dropout,
            max_length=training.max_length,
            threads=training.threads,
        )

    def to_json(self) -> str:
        """The text of ``JOB.json``."""
        data = {
            key: str(value) if isinstance(value, Path) else value
            for key, value in asdict(self).items()
        }
        return json.dumps(data, ensure_ascii=False, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LoraJob:
        """Read ``JOB.json``; raise ValueError naming what is missing or wrong."""
        data: Any = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("the job file does not hold a JSON object")
        values: dict[str, Any] = {}
        for field in fields(cls):
            if field.name not in data:
                if field.default is not MISSING:
                    continue
                raise ValueError(f"the job file has no {field.name!r}")
            value = data[field.name]
            values[field.name] = Path(value) if field.name.endswith("_dir") else value
        return cls(**values)


class TransformersTrainer:
    """Trains with dishbot's own LoRA trainer in a subprocess of ``python``."""

    name = "transformers"

    def __init__(self, python: str = sys.executable) -> None:
        self._python = python

    async def train(self, job: TrainingJob, progress: ProgressCallback) -> TrainedModel:
        """Train ``job`` (see `Trainer.train`); `TrainingFailed` with the log's tail if it
        fails or leaves no model the engine could load."""
        job.work_dir.mkdir(parents=True, exist_ok=True)
        job_file = job.work_dir / JOB_FILE
        job_file.write_text(LoraJob.of(job).to_json(), encoding="utf-8")
        # A retried run's old progress would show as this one's until the first new line.
        (job.work_dir / PROGRESS_FILE).unlink(missing_ok=True)
        progress_file = job.work_dir / PROGRESS_FILE
        reporter = ProgressReporter(lambda: progress_file, job.total_iterations, progress)
        status = await run_logged(
            [self._python, "-m", ENTRY_MODULE, str(job_file)],
            log_path=job.log_path,
            env=training_environment(job.training.threads),
            cwd=job.work_dir,
            on_start=job.on_process,
            poll=reporter.poll,
        )
        if status != 0:
            raise TrainingFailed(
                f"dishbot's trainer {_exit_description(status)}", log_tail(job.log_path)
            )
        problem = loading_problem(job.output_dir, model_type="internvl")
        if problem is not None:
            raise TrainingFailed(
                f"the trained model in {job.output_dir} cannot be served: {problem}",
                log_tail(job.log_path),
            )
        return TrainedModel(path=job.output_dir, system_prompt=job.system_prompt, template="chatml")


def training_environment(threads: int) -> dict[str, str]:
    """This process's environment for the subprocess, its thread pools cut to ``threads``."""
    env = dict(os.environ)
    for name in THREAD_VARIABLES:
        env[name] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the log as they are written
    return env


def _absolute_if_local(model: str) -> str:
    """A local model directory's absolute path (the subprocess runs in the work directory);
    a hub id as it is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def _exit_description(status: int) -> str:
    if status < 0:
        return f"was killed by signal {-status}"
    return f"exited with status {status}"
