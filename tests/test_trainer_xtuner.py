"""The `xtuner` trainer, run against the stand-in XTuner in tests/xtuner_standin.

XTuner needs CUDA; the stand-in takes the same command line and writes what XTuner and
mmengine write (log lines, scalars.json, iter_N.pth, last_checkpoint, a converted model
without its remote code), and records how it was started, so these tests check the exact
commands, environment and file handling a real run gets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bot.settings import TrainingSettings
from bot.training.export.xtuner_config import CONFIG_NAME, iterations_per_run, render_xtuner_config
from bot.training.trainers.base import Progress, TrainedModel, TrainingFailed, TrainingJob
from bot.training.trainers.process import group_alive
from bot.training.trainers.xtuner import XTunerTrainer
from engine.prompts import XTUNER_INTERNLM2_SYSTEM_PROMPT

STANDIN = Path(__file__).parent / "xtuner_standin"
TRAIN_SAMPLES = 12
# In groups of batch 2 x accumulation 2: 3 groups of 2 iterations, 10 epochs, on one GPU.
ITERATIONS = 60
REMOTE_CODE = (
    "configuration_intern_vit.py",
    "configuration_internvl_chat.py",
    "conversation.py",
    "modeling_intern_vit.py",
    "modeling_internvl_chat.py",
)


@pytest.fixture(autouse=True)
def standin_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(STANDIN))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _base_model(directory: Path) -> Path:
    """An InternVL2 checkpoint's files: remote code, config, tokenizer, weights."""
    directory.mkdir(parents=True)
    config = {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "llm_config": {"architectures": ["InternLM2ForCausalLM"]},
        "model_type": "internvl_chat",
    }
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    for name in REMOTE_CODE:
        (directory / name).write_text(f"# {name}\n", encoding="utf-8")
    (directory / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [92542, 92543]}), encoding="utf-8"
    )
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "InternLM2Tokenizer"}), encoding="utf-8"
    )
    (directory / "tokenizer.model").write_bytes(b"sentencepiece")
    (directory / "special_tokens_map.json").write_text("{}", encoding="utf-8")
    (directory / "model.safetensors").write_bytes(b"weights")
    return directory


def _job(tmp_path: Path, **settings: Any) -> TrainingJob:
    base = _base_model(tmp_path / "InternVL2-2B")
    training = TrainingSettings(python=sys.executable, base_model=str(base), **settings)
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    lines = (json.dumps({"id": n, "image": f"{n}.jpg"}) for n in range(TRAIN_SAMPLES))
    (export_dir / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (export_dir / CONFIG_NAME).write_text(
        render_xtuner_config(export_dir, training, TRAIN_SAMPLES), encoding="utf-8"
    )
    run_dir = tmp_path / "runs" / "1"
    return TrainingJob(
        export_dir=export_dir,
        work_dir=run_dir / "xtuner",
        output_dir=run_dir / "model",
        log_path=run_dir / "trainer.log",
        base_model=str(base),
        system_prompt=XTUNER_INTERNLM2_SYSTEM_PROMPT,
        total_iterations=iterations_per_run(TRAIN_SAMPLES, training),
        max_tiles=6,
        training=training,
    )


async def _train(job: TrainingJob) -> tuple[TrainedModel, list[Progress]]:
    seen: list[Progress] = []
    model = await XTunerTrainer().train(job, seen.append)
    return model, seen


def _recorded(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_training_runs_xtuners_train_module_on_one_gpu_with_the_rank_environment(
    tmp_path: Path,
) -> None:
    job = _job(tmp_path)

    await _train(job)

    work_dir = (job.work_dir / "attempt-1").absolute()
    call = _recorded(work_dir / "standin-train-rank0.json")
    assert call["executable"] == sys.executable
    assert call["argv"] == [
        str((job.export_dir / CONFIG_NAME).absolute()),
        "--work-dir",
        str(work_dir),
        "--deepspeed",
        "deepspeed_zero2",
    ]
    env = call["env"]
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("0", "1", "0")
    assert env["MASTER_ADDR"] == "127.0.0.1"
    assert _port_is_free(int(env["MASTER_PORT"]))
    # Its own process group, so that cancelling reaches every process it starts.
    assert call["pgid"] == call["pid"]


async def test_a_finished_training_is_converted_into_a_model_that_loads(tmp_path: Path) -> None:
    job = _job(tmp_path)

    model, _ = await _train(job)

    assert model == TrainedModel(
        path=job.output_dir,
        system_prompt=XTUNER_INTERNLM2_SYSTEM_PROMPT,
        template="xtuner-internlm2",
    )
    work_dir = (job.work_dir / "attempt-1").absolute()
    last = work_dir / f"iter_{job.total_iterations}.pth"
    assert (work_dir / "last_checkpoint").read_text() == str(last)
    convert = _recorded(work_dir / "standin-convert.json")
    assert convert["executable"] == sys.executable
    assert convert["argv"] == [
        str((job.export_dir / CONFIG_NAME).absolute()),
        str(last),
        str(job.output_dir.absolute()),
    ]
    # The converter leaves out the remote code and generation config; the trainer adds them.
    for name in (*REMOTE_CODE, "generation_config.json"):
        assert (job.output_dir / name).read_bytes() == (Path(job.base_model) / name).read_bytes()
    for name in ("config.json", "tokenizer_config.json", "tokenizer.model", "model.safetensors"):
        assert (job.output_dir / name).is_file()


async def test_a_generation_config_the_converter_wrote_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XTUNER_STANDIN_CONVERT_GENERATION_CONFIG", '{"converted": true}')
    job = _job(tmp_path)

    await _train(job)

    assert (job.output_dir / "generation_config.json").read_text() == '{"converted": true}'


async def test_progress_comes_from_scalars_json_while_it_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XTUNER_STANDIN_ITER_S", "0.04")  # 60 iterations in about 2.4 s
    job = _job(tmp_path)

    _, seen = await _train(job)

    training = [p for p in seen if p.stage == "training"]
    iterations = [p.iteration for p in training]
    assert iterations == sorted(iterations)
    assert len(set(iterations)) >= 2, iterations  # seen while it ran, not only at the end
    assert all(p.total == job.total_iterations == ITERATIONS for p in training)
    last = training[-1]
    assert last.iteration == ITERATIONS
    assert last.loss == pytest.approx(2.0 / (1 + ITERATIONS / 10))
    assert last.eta_s == 0
    assert any(p.eta_s is not None and p.eta_s > 0 for p in training[:-1])
    # Then the conversion, after the training.
    assert [p.stage for p in seen[len(training) :]] == ["converting", "converting"]
    assert seen[-1].fraction == 1.0


async def test_a_training_that_exits_non_zero_fails_with_the_log_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XTUNER_STANDIN_FAIL", "crash")
    job = _job(tmp_path)

    with pytest.raises(TrainingFailed, match="exited with status 1") as failed:
        await _train(job)

    assert "RuntimeError: stand-in crash: the data loader failed" in failed.value.log_tail
    assert not (job.work_dir / "attempt-1" / "standin-convert.json").exists()
    assert not job.output_dir.exists()


async def test_exit_zero_without_a_last_checkpoint_is_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XTUNER_STANDIN_FAIL", "no_checkpoint")
    job = _job(tmp_path)

    with pytest.raises(TrainingFailed, match="without saving a checkpoint") as failed:
        await _train(job)

    assert f"Iter(train) [{ITERATIONS}/{ITERATIONS}]" in failed.value.log_tail
    assert not job.output_dir.exists()


async def test_out_of_gpu_memory_retries_once_with_half_the_batch_and_twice_the_accumulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XTUNER_STANDIN_FAIL", "oom")  # out of memory while the batch is above 1
    job = _job(tmp_path)

    model, seen = await _train(job)

    assert model.notes == (
        "out of GPU memory with batch 2: retried with batch 1 and accumulation 4",
    )
    retry_dir = (job.work_dir / "attempt-2").absolute()
    retry = _recorded(retry_dir / "standin-train-rank0.json")
    assert retry["argv"] == [
        str((job.export_dir / CONFIG_NAME).absolute()),
        "--work-dir",
        str(retry_dir),
        "--deepspeed",
        "deepspeed_zero2",
        "--cfg-options",
        "train_dataloader.batch_size=1",
        "optim_wrapper.accumulative_counts=4",
        "batch_size=1",
        "accumulative_counts=4",
    ]
    assert "torch.OutOfMemoryError: CUDA out of memory" in job.log_path.read_text()
    # Batches of 1: twice the iterations, and the retry's checkpoint is the one converted.
    converted = _recorded(retry_dir / "standin-convert.json")
    assert converted["argv"][1] == str(retry_dir / f"iter_{2 * ITERATIONS}.pth")
    assert [p.total for p in seen if p.stage == "training"][-1] == 2 * ITERATIONS
    assert model.path == job.output_dir


async def test_a_training_that_finishes_despite_an_oom_in_its_log_is_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XTUNER_STANDIN_FAIL", "oom_caught")
    job = _job(tmp_path)

    model, _ = await _train(job)

    assert model.notes == ()
    assert sorted(p.name for p in job.work_dir.iterdir()) == ["attempt-1"]


async def test_out_of_gpu_memory_twice_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XTUNER_STANDIN_FAIL", "oom_always")
    job = _job(tmp_path)

    with pytest.raises(TrainingFailed, match="out of GPU memory again with batch 1") as failed:
        await _train(job)

    assert "CUDA out of memory" in failed.value.log_tail
    assert sorted(p.name for p in job.work_dir.iterdir()) == ["attempt-1", "attempt-2"]


async def test_out_of_gpu_memory_with_batch_1_is_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XTUNER_STANDIN_FAIL", "oom_always")
    job = _job(tmp_path, batch_size=1)

    with pytest.raises(TrainingFailed, match="out of GPU memory with batch 1"):
        await _train(job)

    assert [p.name for p in job.work_dir.iterdir()] == ["attempt-1"]


async def test_several_gpus_train_through_torchs_launcher(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.run")
    job = _job(tmp_path, gpus=2)

    await _train(job)

    work_dir = (job.work_dir / "attempt-1").absolute()
    ranks = [_recorded(work_dir / f"standin-train-rank{rank}.json") for rank in (0, 1)]
    config = str((job.export_dir / CONFIG_NAME).absolute())
    for rank, call in enumerate(ranks):
        assert call["argv"] == [
            config,
            "--work-dir",
            str(work_dir),
            "--deepspeed",
            "deepspeed_zero2",
            "--launcher",
            "pytorch",
        ]
        assert (call["env"]["RANK"], call["env"]["LOCAL_RANK"]) == (str(rank), str(rank))
        assert call["env"]["WORLD_SIZE"] == "2"
        assert call["env"]["MASTER_ADDR"] == "127.0.0.1"
    assert ranks[0]["env"]["MASTER_PORT"] == ranks[1]["env"]["MASTER_PORT"]
    # One node, two processes: each GPU takes half the samples.
    per_gpu = iterations_per_run(TRAIN_SAMPLES, job.training, gpus=2)
    assert (work_dir / "last_checkpoint").read_text() == str(work_dir / f"iter_{per_gpu}.pth")
    assert job.output_dir.is_dir()


async def test_cancelling_ends_the_whole_process_group_within_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XTUNER_STANDIN_FAIL", "hang")  # keeps training, with a worker child
    job = _job(tmp_path)
    record = job.work_dir / "attempt-1" / "standin-train-rank0.json"
    task = asyncio.create_task(_train(job))
    deadline = time.monotonic() + 20
    while not record.exists() or "Iter(train)" not in job.log_path.read_text():
        assert time.monotonic() < deadline, "the stand-in never started"
        await asyncio.sleep(0.05)
    group = _recorded(record)["pgid"]
    assert group_alive(group)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    deadline = time.monotonic() + 5
    while group_alive(group):
        assert time.monotonic() < deadline, "the trainer's process group outlived the cancel"
        await asyncio.sleep(0.05)


async def test_a_converted_model_without_weights_fails_the_load_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XTUNER_STANDIN_CONVERT_FAIL", "no_weights")
    job = _job(tmp_path)

    with pytest.raises(TrainingFailed, match=r"would not load: no weights"):
        await _train(job)


async def test_a_conversion_that_exits_non_zero_fails_with_the_log_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XTUNER_STANDIN_CONVERT_FAIL", "crash")
    job = _job(tmp_path)

    with pytest.raises(TrainingFailed, match="conversion exited with status 1") as failed:
        await _train(job)

    assert "stand-in conversion crash" in failed.value.log_tail


async def test_an_export_configured_for_another_base_model_is_refused_before_training(
    tmp_path: Path,
) -> None:
    job = _job(tmp_path)
    other = dataclasses.replace(job, base_model="/models/another")

    with pytest.raises(
        TrainingFailed, match=r"fine-tunes .* but the run asked for '/models/another'"
    ):
        await _train(other)

    assert not job.work_dir.exists()
