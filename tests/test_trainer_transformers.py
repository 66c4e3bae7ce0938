"""dishbot's own trainer for real: a tiny random InternVL is fine-tuned in a subprocess on an
export of chat feedback, and the engine then serves what it was taught.

One training (the origin lesson in miniature: an admin corrects a photo to 肠粉, the other
photos' answers were approved) is shared by the tests that look at its outcome: the answers,
the progress the supervisor saw, the thread budget. The failure and cancellation tests start
trainings of their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, InternVLForConditionalGeneration

from bot.settings import Settings, TrainingSettings
from bot.store import Store
from bot.store.schema import upgrade
from bot.training import ExportOptions, export_dataset
from bot.training.export.export_dir import IMAGES_DIR
from bot.training.export.records import build_record, record_line
from bot.training.export.xtuner_config import iterations_per_run
from bot.training.trainers.base import Progress, TrainingFailed, TrainingJob
from bot.training.trainers.lora_train import (
    IGNORE_INDEX,
    Sample,
    collate,
    conversation_ids,
    prompt_layout,
    tile_count,
)
from bot.training.trainers.process import group_alive
from bot.training.trainers.transformers import TransformersTrainer
from engine.backends.transformers import (
    TransformersBackend,
    TransformersConfig,
    _prepare_job,
    _prompt_ids,
)
from engine.engine import Engine, EngineConfig, Request
from engine.images import decode_image
from engine.prompts import DISHBOT_SYSTEM_PROMPT
from engine.types import GenerationJob, GenerationParams, ModelSpec, Turn
from tests.factories import add_photo, add_user, answered, jpeg_bytes

ADMIN_ID = "900"
QUESTION = "这是什么菜？"
# Photos as the engine serves them in these tests: one tile each, so training stays quick.
MAX_TILES = 1
# Each photo (a colour) and the dish it shows: the first one an admin taught by correcting
# the bot, the others answers users approved.
CORRECTED = (240, 240, 240)
DISHES = {
    CORRECTED: "肠粉",
    (200, 30, 30): "叉烧",
    (40, 180, 60): "虾饺",
    (30, 60, 200): "麻婆豆腐",
}
# The measured recipe for the tiny model: 4 samples, 2 a batch, 16 epochs = 32 iterations.
RECIPE = {
    "epochs": 16,
    "learning_rate": 1e-2,
    "batch_size": 2,
    "accumulative_counts": 1,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    # Below the 2 cores torch would take by default, so the budget is seen to arrive.
    "threads": 1,
}


def answer_for(dish: str) -> str:
    return f"这是{dish}。"


async def export_feedback(data_dir: Path, out_dir: Path, training: TrainingSettings) -> int:
    """Store the feedback of the origin lesson in a new SQLite database and export it with
    dishbot's export; return the number of training samples."""
    store = Store.open(f"sqlite+aiosqlite:///{data_dir / 'dishbot.db'}", data_dir)
    try:
        await upgrade(store.engine)
        asker = await add_user(store, "100")
        fan = await add_user(store, "101")
        admin = await add_user(store, ADMIN_ID)
        for colour, dish in DISHES.items():
            photo = await add_photo(store, colour)
            if colour == CORRECTED:
                exchange = await answered(store, asker, photo=photo, answer=answer_for("叉烧"))
                await store.record_rating(exchange.id, asker.id, -1)
                await store.record_correction(exchange.id, admin.id, dish)
            else:
                exchange = await answered(store, asker, photo=photo, answer=answer_for(dish))
                await store.record_rating(exchange.id, fan.id, 1)
        settings = Settings(data_dir=data_dir, admins=[f"telegram:{ADMIN_ID}"], training=training)
        summary = await export_dataset(store, settings, out_dir, ExportOptions(val_fraction=0.0))
    finally:
        await store.close()
    return summary.train_samples


def write_export(export_dir: Path, photos: dict[str, tuple[bytes, str]]) -> None:
    """An export written directly: each photo file's name, its bytes and its answer."""
    (export_dir / IMAGES_DIR).mkdir(parents=True)
    lines = []
    for number, (name, (data, answer)) in enumerate(photos.items()):
        (export_dir / IMAGES_DIR / name).write_bytes(data)
        record = build_record(f"sample-{number}", name, 64, 48, [(QUESTION, answer)])
        lines.append(record_line(record))
    (export_dir / "train.jsonl").write_text("".join(lines), encoding="utf-8")


def training_job(root: Path, export_dir: Path, base_model: Path, **training: object) -> TrainingJob:
    settings = TrainingSettings(**{**RECIPE, **training})  # type: ignore[arg-type]
    train_file = export_dir / "train.jsonl"
    samples = len(train_file.read_text().splitlines()) if train_file.is_file() else 1
    return TrainingJob(
        export_dir=export_dir,
        work_dir=root / "work",
        output_dir=root / "model",
        log_path=root / "train.log",
        base_model=str(base_model),
        system_prompt=DISHBOT_SYSTEM_PROMPT,
        total_iterations=iterations_per_run(samples, settings),
        max_tiles=MAX_TILES,
        training=settings,
    )


async def ask_each_photo(model: Path) -> dict[str, str]:
    """What the engine, with the transformers backend, answers about each photo (greedy)."""
    backend = TransformersBackend(TransformersConfig(device="cpu"))
    config = EngineConfig(max_tiles=MAX_TILES, max_new_tokens=16)
    answers = {}
    async with Engine(backend, ModelSpec(str(model), "candidate"), config) as engine:
        for colour, dish in DISHES.items():
            request = Request(key="telegram:100", question=QUESTION, images=(jpeg_bytes(colour),))
            answers[dish] = (await (await engine.submit(request)).result()).text
    return answers


@dataclass
class Trained:
    job: TrainingJob
    seen: list[Progress]
    model_path: Path
    seconds: float


@pytest.fixture(scope="module")
def trained(tiny_internvl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """The origin lesson's feedback, exported and trained on once for this module's tests."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:  # as `clean_environment`, for the module
        for name in list(os.environ):
            if name.startswith("DISHBOT_") and not name.startswith("DISHBOT_TEST_"):
                patch.delenv(name)
        patch.chdir(root)
        (root / "data").mkdir()
        export_dir = root / "export"
        samples = asyncio.run(
            export_feedback(root / "data", export_dir, TrainingSettings(**RECIPE))  # type: ignore[arg-type]
        )
        assert samples == len(DISHES)
        job = training_job(root, export_dir, tiny_internvl)
        seen: list[Progress] = []

        async def train() -> tuple[Path, float]:
            loop = asyncio.get_running_loop()
            began = loop.time()
            model = await TransformersTrainer().train(job, seen.append)
            return model.path, loop.time() - began

        model_path, seconds = asyncio.run(train())
        yield Trained(job, seen, model_path, seconds)


async def test_the_tiny_model_learns_each_photos_answer_and_the_engine_serves_it(
    trained: Trained, tiny_internvl: Path
) -> None:
    before = await ask_each_photo(tiny_internvl)
    assert "肠粉" not in before["肠粉"]

    answers = await ask_each_photo(trained.model_path)

    # The corrected photo is now named 肠粉, and the approved answers are kept.
    assert answers == {dish: answer_for(dish) for dish in DISHES.values()}
    print(f"\ntiny model: {trained.job.total_iterations} iterations in {trained.seconds:.1f} s")


def test_the_supervisor_sees_the_iterations_go_by_with_a_falling_loss(trained: Trained) -> None:
    total = trained.job.total_iterations
    # Read once a second, a training this short is seen a few times at most; the cancelling
    # test sees it mid-way. The last report is the end, with its loss.
    iterations = [progress.iteration for progress in trained.seen]
    assert iterations == sorted(set(iterations))
    assert all(progress.stage == "training" for progress in trained.seen)
    last = trained.seen[-1]
    assert (last.iteration, last.total, last.eta_s) == (total, 32, 0)
    assert last.loss is not None
    # Every iteration is in the progress file, in XTuner's shape, the loss falling.
    entries = [json.loads(line) for line in (trained.job.work_dir / "progress.jsonl").open()]
    assert [entry["iter"] for entry in entries] == list(range(1, total + 1))
    assert all(set(entry) == {"iter", "loss", "lr", "time", "memory"} for entry in entries)
    assert entries[-1]["loss"] == last.loss
    assert entries[-1]["loss"] < entries[0]["loss"] / 10


def test_the_trainer_uses_only_the_threads_it_is_given(trained: Trained) -> None:
    threads = re.search(r"torch threads (\d+)$", trained.job.log_path.read_text(), re.MULTILINE)
    assert threads is not None
    assert int(threads.group(1)) == RECIPE["threads"]


def test_the_saved_model_is_a_whole_model_directory(trained: Trained, tiny_internvl: Path) -> None:
    config = json.loads((trained.model_path / "config.json").read_text())
    assert config["model_type"] == "internvl"
    assert (trained.model_path / "tokenizer.json").is_file()
    assert (trained.model_path / "generation_config.json").is_file()
    assert list(trained.model_path.glob("*.safetensors"))
    # Nothing of peft's is left: the adapters were merged into the weights.
    assert not (trained.model_path / "adapter_config.json").exists()


async def test_a_missing_train_file_fails_with_the_reason_in_the_log_tail(
    tiny_internvl: Path, tmp_path: Path
) -> None:
    (tmp_path / "export").mkdir()
    job = training_job(tmp_path, tmp_path / "export", tiny_internvl)

    with pytest.raises(TrainingFailed, match="exited with status 1") as failure:
        await TransformersTrainer().train(job, lambda progress: None)

    last_line = failure.value.log_tail.splitlines()[-1]
    assert "training failed" in last_line
    assert "train.jsonl" in last_line
    assert not job.output_dir.exists()


async def test_a_corrupt_photo_fails_naming_the_photo(tiny_internvl: Path, tmp_path: Path) -> None:
    export_dir = tmp_path / "export"
    write_export(
        export_dir,
        {
            "good.jpg": (jpeg_bytes(), answer_for("叉烧")),
            "broken.jpg": (jpeg_bytes()[:300], answer_for("肠粉")),
        },
    )
    job = training_job(tmp_path, export_dir, tiny_internvl)

    with pytest.raises(TrainingFailed) as failure:
        await TransformersTrainer().train(job, lambda progress: None)

    last_line = failure.value.log_tail.splitlines()[-1]
    assert "line 2" in last_line
    assert "broken.jpg" in last_line
    assert "corrupt" in last_line


async def test_a_trainer_that_leaves_no_model_is_a_failure(
    tiny_internvl: Path, tmp_path: Path
) -> None:
    quitter = tmp_path / "python"
    quitter.write_text("#!/bin/sh\necho 'nothing to do'\n")
    quitter.chmod(0o755)
    job = training_job(tmp_path, tmp_path / "export", tiny_internvl)

    with pytest.raises(TrainingFailed, match="cannot be served") as failure:
        await TransformersTrainer(python=str(quitter)).train(job, lambda progress: None)

    assert "nothing to do" in failure.value.log_tail


async def test_cancelling_a_training_ends_its_whole_process_group_within_seconds(
    tiny_internvl: Path, tmp_path: Path
) -> None:
    photos = {
        f"{dish}.jpg": (jpeg_bytes(colour), answer_for(dish)) for colour, dish in DISHES.items()
    }
    write_export(tmp_path / "export", photos)
    job = training_job(tmp_path, tmp_path / "export", tiny_internvl, epochs=1000)
    started = asyncio.Event()

    def progress(update: Progress) -> None:
        if update.iteration > 0:
            started.set()

    training = asyncio.create_task(TransformersTrainer().train(job, progress))
    await asyncio.wait_for(started.wait(), timeout=120)
    match = re.search(r"pid (\d+),", job.log_path.read_text())
    assert match is not None
    group = int(match.group(1))
    assert group_alive(group)

    training.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(training, timeout=10)

    assert not group_alive(group)
    assert not job.output_dir.exists()


async def test_training_sees_each_turn_exactly_as_the_backend_serves_it(
    tiny_internvl: Path, tmp_path: Path
) -> None:
    # Two tiles and a thumbnail; the follow-up spells a control token a user might send.
    photo = tmp_path / "wide.jpg"
    photo.write_bytes(jpeg_bytes((200, 30, 30), size=(896, 448)))
    turns = [(QUESTION, answer_for("叉烧")), ("辣不辣？<|im_end|>", "不辣，甜的。")]
    max_tiles = 6
    layout = prompt_layout(
        AutoConfig.from_pretrained(tiny_internvl), AutoTokenizer.from_pretrained(tiny_internvl)
    )
    decoded = decode_image(photo.read_bytes(), max_tiles=max_tiles)
    tiles = tile_count(decoded.image.width, decoded.image.height, max_tiles, layout.tile_size)
    input_ids, labels = conversation_ids(layout, DISHBOT_SYSTEM_PROMPT, turns, tiles)
    trained_pixels = collate([Sample(photo, tiles, input_ids, labels)], layout, max_tiles)

    backend = TransformersBackend(TransformersConfig(device="cpu"))
    await backend.load(ModelSpec(str(tiny_internvl), "tiny"))
    loaded = backend._loaded
    assert loaded is not None
    served = []
    for turn, (question, _) in enumerate(turns):
        job = GenerationJob(
            images=(decoded,),
            history=tuple(Turn(*earlier) for earlier in turns[:turn]),
            question=question,
            system_prompt=DISHBOT_SYSTEM_PROMPT,
            params=GenerationParams(),
            max_tiles=max_tiles,
        )
        served.append(_prepare_job(loaded, 0, job))
    await backend.close()

    # Each answer is learnt right after the very prompt the backend serves for its question.
    answer_starts = [
        n
        for n, label in enumerate(labels)
        if label != IGNORE_INDEX and labels[n - 1] == IGNORE_INDEX
    ]
    assert len(answer_starts) == len(turns)
    for start, prepared in zip(answer_starts, served, strict=True):
        assert input_ids[:start] == _prompt_ids(loaded.tokenizer, prepared.prompt)
    # What is learnt: the answers, each with the <|im_end|> that stops it.
    learnt = loaded.tokenizer.decode([label for label in labels if label != IGNORE_INDEX])
    assert learnt == "这是叉烧。<|im_end|>不辣，甜的。<|im_end|>"
    assert tiles == 3
    assert served[0].pixel_values is not None
    assert torch.equal(trained_pixels["pixel_values"], served[0].pixel_values)


def tied_copy(model: Path, directory: Path) -> Path:
    """``model`` saved again with its output head tied to its input embeddings, as in
    InternVL3-1B-hf (Qwen2.5-0.5B ties them)."""
    tied = InternVLForConditionalGeneration.from_pretrained(model)
    tied.config.tie_word_embeddings = True
    tied.config.text_config.tie_word_embeddings = True
    tied.tie_weights()
    tied.save_pretrained(directory)
    AutoTokenizer.from_pretrained(model).save_pretrained(directory)
    return directory


async def test_a_model_whose_head_is_its_embeddings_learns_without_changing_its_embeddings(
    tiny_internvl: Path, tmp_path: Path
) -> None:
    base = tied_copy(tiny_internvl, tmp_path / "tied")
    photos = {
        f"{dish}.jpg": (jpeg_bytes(colour), answer_for(dish)) for colour, dish in DISHES.items()
    }
    write_export(tmp_path / "export", photos)
    job = training_job(tmp_path, tmp_path / "export", base)

    model = await TransformersTrainer().train(job, lambda progress: None)

    assert await ask_each_photo(model.path) == {dish: answer_for(dish) for dish in DISHES.values()}
    before = InternVLForConditionalGeneration.from_pretrained(base)
    after = InternVLForConditionalGeneration.from_pretrained(model.path)
    # The adapters merged into the head alone: what the model reads is read as before.
    assert torch.equal(after.get_input_embeddings().weight, before.get_input_embeddings().weight)
    assert not torch.equal(after.lm_head.weight, after.get_input_embeddings().weight)
