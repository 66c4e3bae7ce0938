"""The `xtuner` trainer: XTuner's InternVL LoRA recipe, run in XTuner's own Python environment.

XTuner needs CUDA, DeepSpeed and the model's remote code, so it runs as a subprocess of
``training.python`` (a separate environment, see the README), never imported here:

1. ``python -m xtuner.tools.train CONFIG --work-dir DIR --deepspeed PRESET`` with the export's
   ``xtuner_config.py``. Not the ``xtuner train`` wrapper: it runs whatever ``python`` is on
   PATH and exits 0 even when training failed. On one GPU the process gets the rank
   variables DeepSpeed would otherwise look for MPI to learn; on several, torch's launcher
   starts one process per GPU, as XTuner's own wrapper does (``--launcher pytorch``).
2. Progress is read from mmengine's ``DIR/<timestamp>/vis_data/scalars.json``.
3. Done means exit status 0 and ``DIR/last_checkpoint`` naming an ``iter_N.pth`` that exists.
4. Out of GPU memory (found in this attempt's log), it retries once in a fresh work dir with
   half the batch and twice the accumulation: the same effective batch, so the same recipe.
   The config's values are overridden with ``--cfg-options`` on the built dicts
   (``train_dataloader.batch_size``, ``optim_wrapper.accumulative_counts``): mmengine runs
   the config file once, so overriding its top-level ``batch_size`` would change nothing.
5. ``python -m xtuner.configs.internvl.v1_5.convert_to_official CONFIG ITER_N.pth OUT``
   merges the LoRA into a full model. With transformers 4.48 it leaves out the model's
   remote code, so every ``*.py`` of the base model is copied in (and
   ``generation_config.json`` when missing), and the result is checked to be loadable.

The model is served as XTuner trained it: XTuner's fixed system prompt and its InternLM2
layout (``template="xtuner-internlm2"``).
"""

from __future__ import annotations

import ast
import logging
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from bot.training.export.xtuner_config import CONFIG_NAME
from bot.training.trainers.base import (
    Progress,
    ProgressCallback,
    ProgressReporter,
    TrainedModel,
    TrainingFailed,
    TrainingJob,
)
from bot.training.trainers.model_dir import loading_problem
from bot.training.trainers.process import log_tail, run_logged
from engine.prompts import XTUNER_INTERNLM2_SYSTEM_PROMPT

log = logging.getLogger(__name__)

TRAIN_MODULE = "xtuner.tools.train"
CONVERT_MODULE = "xtuner.configs.internvl.v1_5.convert_to_official"
LAUNCHER_MODULE = "torch.distributed.run"

# What PyTorch (torch.OutOfMemoryError, formerly a RuntimeError) says when a CUDA allocation
# fails; the traceback of any rank lands in the log.
OUT_OF_MEMORY = re.compile(r"CUDA out of memory|OutOfMemoryError")
LAST_CHECKPOINT = "last_checkpoint"
CHECKPOINT_NAME = re.compile(r"iter_(\d+)\.pth")

GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One run of XTuner's training: where, and with which batch."""

    work_dir: Path
    batch_size: int
    accumulative_counts: int
    total_iterations: int


class XTunerTrainer:
    """Trains with XTuner in ``training.python``'s environment (see the module docstring)."""

    name = "xtuner"

    async def train(self, job: TrainingJob, progress: ProgressCallback) -> TrainedModel:
        """Train, retrying once with half the batch when out of GPU memory, then convert.

        Raises `TrainingFailed` with the log's tail when no servable model comes of it.
        """
        config = _checked_config(job)
        first = _Attempt(
            job.work_dir.absolute() / "attempt-1",
            job.training.batch_size,
            job.training.accumulative_counts,
            job.total_iterations,
        )
        notes: list[str] = []
        try:
            checkpoint = await _train_once(job, config, first, progress)
        except _OutOfGpuMemory:
            retry = _halved(job, first)
            notes.append(
                f"out of GPU memory with batch {first.batch_size}: retried with batch "
                f"{retry.batch_size} and accumulation {retry.accumulative_counts}"
            )
            log.warning("XTuner ran out of GPU memory; %s", notes[-1])
            try:
                checkpoint = await _train_once(job, config, retry, progress)
            except _OutOfGpuMemory:
                raise TrainingFailed(
                    f"XTuner ran out of GPU memory again with batch {retry.batch_size}; "
                    "lower training.max_length or train on a larger GPU",
                    log_tail(job.log_path),
                ) from None
        await _convert(job, config, checkpoint, progress)
        return TrainedModel(
            path=job.output_dir,
            system_prompt=XTUNER_INTERNLM2_SYSTEM_PROMPT,
            template="xtuner-internlm2",
            notes=tuple(notes),
        )


def _checked_config(job: TrainingJob) -> Path:
    """The export's XTuner config, checked to fine-tune the model the run asked for.

    ``convert_to_official`` builds the base model from the config alone, so training any
    other model than the one the config names would merge the LoRA into the wrong weights.
    """
    config = (job.export_dir / CONFIG_NAME).absolute()
    try:
        source = config.read_text(encoding="utf-8")
    except OSError as error:
        raise TrainingFailed(
            f"the export has no readable XTuner config {config}: {error}"
        ) from None
    base = _config_path_setting(source)
    if base != job.base_model:
        raise TrainingFailed(
            f"the export's XTuner config fine-tunes {base!r}, but the run asked for "
            f"{job.base_model!r}; export again with that base model"
        )
    return config


def _config_path_setting(source: str) -> str | None:
    """The config's top-level ``path = '...'`` (the base model), or None when not a string."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "path"
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            return node.value.value
    return None


def _halved(job: TrainingJob, attempt: _Attempt) -> _Attempt:
    """The retry after running out of memory: same effective batch, in half-size steps."""
    if attempt.batch_size < 2:
        raise TrainingFailed(
            "XTuner ran out of GPU memory with batch 1; lower training.max_length or train "
            "on a larger GPU",
            log_tail(job.log_path),
        )
    # One iteration is one batch, so twice the accumulation is twice the iterations.
    return _Attempt(
        job.work_dir.absolute() / "attempt-2",
        attempt.batch_size // 2,
        attempt.accumulative_counts * 2,
        attempt.total_iterations * 2,
    )


class _OutOfGpuMemory(Exception):
    """An attempt's log reports a CUDA out-of-memory error."""


async def _train_once(
    job: TrainingJob, config: Path, attempt: _Attempt, progress: ProgressCallback
) -> Path:
    """Run XTuner's training once and return the checkpoint it ended with.

    Raises `_OutOfGpuMemory` when it ran out of GPU memory, `TrainingFailed` otherwise.
    """
    if attempt.work_dir.exists():
        shutil.rmtree(attempt.work_dir)  # a fresh work dir: no stale checkpoint can count
    attempt.work_dir.mkdir(parents=True)
    log_start = _log_size(job.log_path)
    work_dir = attempt.work_dir
    reporter = ProgressReporter(
        lambda: newest_scalars(work_dir), attempt.total_iterations, progress
    )
    status = await run_logged(
        _train_command(job, config, attempt),
        log_path=job.log_path,
        env=_train_environment(job),
        cwd=attempt.work_dir,
        on_start=job.on_process,
        poll=reporter.poll,
    )
    # A training that ran to its end is done, whatever its log says (a dataloader worker's
    # caught OOM, say); only a failed one is retried for memory.
    if status != 0 and _ran_out_of_memory(job.log_path, log_start):
        raise _OutOfGpuMemory
    if status != 0:
        raise TrainingFailed(f"XTuner training exited with status {status}", log_tail(job.log_path))
    return _finished_checkpoint(job, attempt.work_dir)


def _train_command(job: TrainingJob, config: Path, attempt: _Attempt) -> list[str]:
    training = job.training
    arguments = [
        str(config),
        "--work-dir",
        str(attempt.work_dir),
        "--deepspeed",
        training.deepspeed,
    ]
    if (attempt.batch_size, attempt.accumulative_counts) != (
        training.batch_size,
        training.accumulative_counts,
    ):
        arguments += [
            "--cfg-options",
            f"train_dataloader.batch_size={attempt.batch_size}",
            f"optim_wrapper.accumulative_counts={attempt.accumulative_counts}",
            # The top-level names too, so the config mmengine saves reads consistently.
            f"batch_size={attempt.batch_size}",
            f"accumulative_counts={attempt.accumulative_counts}",
        ]
    if training.gpus == 1:
        return [training.python, "-m", TRAIN_MODULE, *arguments]
    # As `xtuner train` does with NPROC_PER_NODE > 1, with the module run in place of the file.
    return [
        training.python,
        "-m",
        LAUNCHER_MODULE,
        "--nnodes=1",
        "--node_rank=0",
        f"--nproc_per_node={training.gpus}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        TRAIN_MODULE,
        *arguments,
        "--launcher",
        "pytorch",
    ]


def _train_environment(job: TrainingJob) -> dict[str, str]:
    env = dict(os.environ)
    # The launcher sets these per process when there are several GPUs; stale ones would clash.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if job.training.gpus == 1:
        env.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now, for the training's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def newest_scalars(work_dir: Path) -> Path | None:
    """mmengine's scalars file of the newest run in ``work_dir`` (its folder is a timestamp)."""
    found = sorted(work_dir.glob("*/vis_data/scalars.json"), key=lambda path: path.parts[-3])
    return found[-1] if found else None


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _ran_out_of_memory(log_path: Path, start: int) -> bool:
    """Whether the log, from byte ``start`` on (this attempt's part), reports a CUDA OOM."""
    try:
        with log_path.open("rb") as handle:
            handle.seek(start)
            text = handle.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return False
    return OUT_OF_MEMORY.search(text) is not None


def _finished_checkpoint(job: TrainingJob, work_dir: Path) -> Path:
    """The checkpoint ``last_checkpoint`` names, checked to be an ``iter_N.pth`` that exists."""
    marker = work_dir / LAST_CHECKPOINT
    try:
        named = marker.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise TrainingFailed(
            f"XTuner exited without saving a checkpoint (no {marker})", log_tail(job.log_path)
        ) from None
    checkpoint = Path(named)
    if not checkpoint.is_absolute():
        checkpoint = work_dir / checkpoint
    # A DeepSpeed checkpoint saved with its optimizer state is a directory of that name.
    if CHECKPOINT_NAME.fullmatch(checkpoint.name) is None or not checkpoint.exists():
        raise TrainingFailed(
            f"XTuner's {marker} names {named!r}, not a saved iter_N.pth checkpoint",
            log_tail(job.log_path),
        )
    return checkpoint


async def _convert(
    job: TrainingJob, config: Path, checkpoint: Path, progress: ProgressCallback
) -> None:
    """Merge the LoRA into a full model at ``job.output_dir`` that loads on its own."""
    output = job.output_dir.absolute()
    if output.exists():
        shutil.rmtree(output)
    progress(Progress("converting", 0, 1))
    command = [job.training.python, "-m", CONVERT_MODULE, str(config), str(checkpoint), str(output)]
    status = await run_logged(
        command, log_path=job.log_path, cwd=checkpoint.parent, on_start=job.on_process
    )
    if status != 0:
        raise TrainingFailed(
            f"XTuner's conversion exited with status {status}", log_tail(job.log_path)
        )
    base = _local_model_dir(job.base_model)
    _copy_remote_code(base, output)
    problem = loading_problem(output)
    if problem is not None:
        raise TrainingFailed(
            f"the converted model in {output} would not load: {problem}", log_tail(job.log_path)
        )
    progress(Progress("converting", 1, 1))


def _local_model_dir(model: str) -> Path:
    """The base model's directory: a path as it is, a hub id from the local hub cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception as error:  # not installed, not cached, not an id
        raise TrainingFailed(
            f"cannot find the base model {model!r} on this machine to copy its code from: {error}"
        ) from None


def _copy_remote_code(base: Path, output: Path) -> None:
    """The base model's ``*.py`` (remote code), and its generation config when none came."""
    for source in sorted(base.glob("*.py")):
        shutil.copy2(source, output / source.name)
    generation = base / GENERATION_CONFIG_FILE
    if generation.is_file() and not (output / GENERATION_CONFIG_FILE).exists():
        shutil.copy2(generation, output / GENERATION_CONFIG_FILE)
