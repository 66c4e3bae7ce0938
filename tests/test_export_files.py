"""The files `dishbot export` writes: split, images, config, meta, card, manifest, re-runs."""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from bot.errors import DishbotError
from bot.settings import Settings, TrainingSettings, load_settings
from bot.store import Store, UserRecord
from bot.training import ExportError, ExportOptions, export_dataset
from bot.training.export.writer import DatasetWriter, is_validation_photo
from engine.prompts import XTUNER_INTERNLM2_SYSTEM_PROMPT
from tests.factories import add_photo, add_user, answered
from tests.test_export_selection import export, photos, read_records, settings_for

EXPORT_FILES = {
    "README.md",
    "internvl_meta.json",
    "manifest.json",
    "train.jsonl",
    "val.jsonl",
    "xtuner_config.py",
}


async def _liked_answers(store: Store, count: int, questions_per_photo: int = 1) -> UserRecord:
    """``count`` photos, each asked about ``questions_per_photo`` times, every answer liked."""
    asker = await add_user(store, "1")
    for photo in await photos(store, count):
        for n in range(questions_per_photo):
            exchange = await answered(
                store, asker, photo=photo, question=f"question {n}", answer=f"answer {n}"
            )
            await store.record_rating(exchange.id, asker.id, 1)
    return asker


def _files(out_dir: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(out_dir)): path.read_bytes()
        for path in sorted(out_dir.rglob("*"))
        if path.is_file()
    }


def _stored_photo(data_dir: Path, name: str) -> Path:
    return next(data_dir.glob(f"photos/*/{name}"))


def _hidden_entries(directory: Path) -> list[str]:
    """Names starting with a dot: what a half-done export would leave behind."""
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def _images_in(out_dir: Path, name: str) -> set[str]:
    text = (out_dir / name).read_text(encoding="utf-8")
    return {json.loads(line)["image"] for line in text.splitlines()}


# -- split and determinism ---------------------------------------------------------------


async def test_the_split_goes_by_photo_hash_and_no_photo_is_in_both_files(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    await _liked_answers(store, 40, questions_per_photo=2)

    summary, _ = await export(store, data_dir, tmp_path / "out", val_fraction=0.3)

    train, val = (
        _images_in(tmp_path / "out", "train.jsonl"),
        _images_in(tmp_path / "out", "val.jsonl"),
    )
    assert train
    assert val
    assert not train & val
    assert len(train | val) == 40
    for image in val:
        assert is_validation_photo(image.split(".")[0], 0.3)
    for image in train:
        assert not is_validation_photo(image.split(".")[0], 0.3)
    assert summary.train_samples + summary.val_samples == 80
    assert summary.val_samples == 2 * len(val)


async def test_raising_the_validation_fraction_only_moves_photos_into_validation(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    await _liked_answers(store, 30)

    await export(store, data_dir, tmp_path / "small", val_fraction=0.2)
    await export(store, data_dir, tmp_path / "large", val_fraction=0.5)

    assert _images_in(tmp_path / "small", "val.jsonl") <= _images_in(
        tmp_path / "large", "val.jsonl"
    )


async def test_exporting_the_same_data_again_writes_byte_identical_files(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = await _liked_answers(store, 12, questions_per_photo=2)
    admin = await add_user(store, "900")
    exchange = await answered(store, asker, photo=await add_photo(store), answer="叉烧")
    await store.record_correction(exchange.id, admin.id, "肠粉")
    out = tmp_path / "out"

    await export(store, data_dir, out, val_fraction=0.25)
    first = _files(out)
    await export(store, data_dir, out, val_fraction=0.25)

    assert _files(out) == first
    assert set(first) >= EXPORT_FILES
    assert sum(name.startswith("images/") for name in first) == 13


# -- images ------------------------------------------------------------------------------


async def test_photos_are_hard_linked_when_on_the_same_file_system(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    await _liked_answers(store, 2)

    summary, records = await export(store, data_dir, tmp_path / "out")

    for record in records:
        exported = tmp_path / "out" / "images" / record["image"]
        stored = _stored_photo(data_dir, record["image"])
        assert exported.stat().st_ino == stored.stat().st_ino
    assert (summary.photos_linked, summary.photos_copied) == (2, 0)


async def test_photos_are_copied_when_a_hard_link_is_not_possible(
    store: Store, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _liked_answers(store, 2)

    def other_file_system(source: Any, target: Any, **_: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", other_file_system)
    summary, records = await export(store, data_dir, tmp_path / "out")

    for record in records:
        exported = tmp_path / "out" / "images" / record["image"]
        stored = _stored_photo(data_dir, record["image"])
        assert exported.stat().st_ino != stored.stat().st_ino
        assert exported.read_bytes() == stored.read_bytes()
    assert (summary.photos_linked, summary.photos_copied) == (0, 2)


async def test_a_photo_whose_bytes_changed_on_disk_is_reported_not_exported(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    await _liked_answers(store, 2)
    damaged = _stored_photo(data_dir, "*.jpg")
    damaged.write_bytes(damaged.read_bytes()[:-10])  # truncated

    summary, records = await export(store, data_dir, tmp_path / "out")

    assert len(records) == 1
    assert summary.missing_photos == 1
    assert not (tmp_path / "out" / "images" / damaged.name).exists()


async def test_a_copied_photo_whose_bytes_no_longer_match_its_hash_is_reported(
    store: Store, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _liked_answers(store, 2)
    damaged = _stored_photo(data_dir, "*.jpg")
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    damaged.write_bytes(bytes(data))

    def other_file_system(source: Any, target: Any, **_: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", other_file_system)
    summary, records = await export(store, data_dir, tmp_path / "out")

    assert len(records) == 1
    assert summary.missing_photo_examples == (damaged.stem,)
    assert not (tmp_path / "out" / "images" / damaged.name).exists()


# -- the output directory ----------------------------------------------------------------


async def test_a_non_empty_directory_not_written_by_an_export_is_refused_untouched(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    await _liked_answers(store, 1)
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("…", encoding="utf-8")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("notes", encoding="utf-8")

    with pytest.raises(ExportError, match="not empty and was not written by `dishbot export`"):
        await export(store, data_dir, precious)
    with pytest.raises(ExportError, match="is not a directory"):
        await export(store, data_dir, a_file)
    with pytest.raises(ExportError):
        await export(store, data_dir, data_dir)  # the data directory itself

    assert [p.name for p in precious.iterdir()] == ["chapter1.tex"]
    assert a_file.read_text(encoding="utf-8") == "notes"
    assert issubclass(ExportError, DishbotError)
    assert "\n" not in str(ExportError("x"))
    assert _hidden_entries(tmp_path) == []


async def test_an_empty_or_new_directory_is_written_and_a_previous_export_replaced(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = await _liked_answers(store, 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    nested = tmp_path / "a" / "b" / "export"

    await export(store, data_dir, empty)
    await export(store, data_dir, nested)
    stale_images = {p.name for p in (nested / "images").iterdir()}
    await store.forget(asker.id)  # the photos go, so the next export has none
    summary, records = await export(store, data_dir, nested)

    assert set(_files(empty)) >= EXPORT_FILES
    assert len(stale_images) == 2
    assert records == []
    assert summary.samples == 0
    assert not any((nested / "images").iterdir())
    assert _hidden_entries(nested.parent) == []  # no leftovers beside it


async def test_a_failed_export_leaves_the_previous_one_as_it_was(
    store: Store, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _liked_answers(store, 3)
    out = tmp_path / "out"
    await export(store, data_dir, out)
    before = _files(out)

    def disk_full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DatasetWriter, "_write_record", disk_full)
    with pytest.raises(OSError, match="No space"):
        await export(store, data_dir, out)

    assert _files(out) == before
    assert _hidden_entries(tmp_path) == []


# -- manifest, config, meta, card --------------------------------------------------------


async def test_the_manifest_holds_filters_source_counts_and_every_files_sha256(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    await _liked_answers(store, 3)
    out = tmp_path / "out"

    summary, _ = await export(store, data_dir, out, val_fraction=0.2, min_votes=1)

    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    written = {
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"
    }
    assert set(manifest["files"]) == written
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    assert list(manifest["files"]) == sorted(manifest["files"])
    assert manifest["system_prompt"] == XTUNER_INTERNLM2_SYSTEM_PROMPT
    assert manifest["source_database"].endswith("dishbot.db")
    assert manifest["filters"]["val_fraction"] == 0.2
    assert manifest["filters"]["agreeing_corrections"] == 2
    assert manifest["counts"] == summary.counts()
    assert manifest["counts"]["samples"]["train"] + manifest["counts"]["samples"]["val"] == 3


async def test_a_database_password_never_reaches_the_manifest_or_card(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    await _liked_answers(store, 1)
    settings = Settings(data_dir=data_dir, database_url="postgresql://dishbot:pg-secret@db/dishbot")

    await export_dataset(store, settings, tmp_path / "out", ExportOptions())

    for name in ("manifest.json", "README.md"):
        assert "pg-secret" not in (tmp_path / "out" / name).read_text(encoding="utf-8")


def _config_assignments(text: str) -> dict[str, ast.expr]:
    tree = ast.parse(text)
    return {
        node.targets[0].id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }


def _run_config(text: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Execute the config as mmengine would, with XTuner's modules stood in for."""
    stubs = {
        "mmengine.hooks": [
            "CheckpointHook",
            "DistSamplerSeedHook",
            "IterTimerHook",
            "LoggerHook",
            "ParamSchedulerHook",
        ],
        "mmengine.optim": ["AmpOptimWrapper", "CosineAnnealingLR", "LinearLR"],
        "peft": ["LoraConfig"],
        "torch.optim": ["AdamW"],
        "transformers": ["AutoTokenizer"],
        "xtuner.dataset": ["InternVL_V1_5_Dataset"],
        "xtuner.dataset.collate_fns": ["default_collate_fn"],
        "xtuner.dataset.samplers": ["LengthGroupedSampler"],
        "xtuner.engine.hooks": ["DatasetInfoHook"],
        "xtuner.engine.runner": ["TrainLoop"],
        "xtuner.model": ["InternVL_V1_5"],
        "xtuner.utils": ["PROMPT_TEMPLATE"],
    }
    for module_name, names in stubs.items():
        module = types.ModuleType(module_name)
        for name in names:
            stand_in = types.SimpleNamespace(
                name=name, internlm2_chat="internlm2", from_pretrained=f"{name}.from_pretrained"
            )
            setattr(module, name, stand_in)
        monkeypatch.setitem(sys.modules, module_name, module)
    namespace: dict[str, Any] = {}
    exec(compile(text, "xtuner_config.py", "exec"), namespace)
    return namespace


async def test_the_xtuner_config_points_into_the_export_and_takes_the_training_settings(
    store: Store, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _liked_answers(store, 2)
    out = tmp_path / "out"
    await export(store, data_dir, out)

    text = (out / "xtuner_config.py").read_text(encoding="utf-8")
    config = _run_config(text, monkeypatch)

    assert config["path"] == "OpenGVLab/InternVL2-2B"
    assert config["data_path"] == str(out / "train.jsonl")
    assert config["image_folder"] == str(out / "images")
    assert config["data_root"] == f"{out}/"
    assert (config["batch_size"], config["lr"], config["max_epochs"]) == (2, 3e-5, 10)
    assert (config["save_steps"], config["max_length"]) == (64, 8192)
    dataset = config["train_dataloader"]["dataset"]
    assert (dataset["data_paths"], dataset["image_folders"]) == (
        config["data_path"],
        config["image_folder"],
    )
    assert dataset["type"].name == "InternVL_V1_5_Dataset"
    assert config["model"]["model_path"] == config["path"]
    assert config["default_hooks"]["checkpoint"]["interval"] == 64
    assert config["optim_wrapper"]["optimizer"]["lr"] == 3e-5


async def test_every_setting_of_the_config_says_what_it_is_for(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    await _liked_answers(store, 1)
    await export(store, data_dir, tmp_path / "out")

    lines = (tmp_path / "out" / "xtuner_config.py").read_text(encoding="utf-8").splitlines()
    part_one = lines[lines.index("# Model") : lines.index("save_total_limit = 1") + 1]
    for number, line in enumerate(part_one):
        if " = " in line and not line.startswith("#"):
            assert part_one[number - 1].startswith("#"), f"no comment above {line!r}"


async def test_training_settings_change_the_generated_config(
    store: Store, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _liked_answers(store, 1)
    training = {"batch_size": 2, "learning_rate": 1e-4, "epochs": 3, "save_steps": 16}
    training |= {"base_model": "/models/InternVL2-2B", "lora_r": 8, "max_length": 4096}
    await export(store, data_dir, tmp_path / "out", training=training)

    config = _run_config(
        (tmp_path / "out" / "xtuner_config.py").read_text(encoding="utf-8"), monkeypatch
    )

    assert (config["batch_size"], config["lr"], config["max_epochs"]) == (2, 1e-4, 3)
    assert (config["save_steps"], config["path"], config["max_length"]) == (
        16,
        "/models/InternVL2-2B",
        4096,
    )
    assert config["model"]["llm_lora"]["r"] == 8
    assert "data_root" in _config_assignments(
        (tmp_path / "out" / "xtuner_config.py").read_text(encoding="utf-8")
    )


def test_training_defaults_are_the_ones_that_fit_small_feedback_data() -> None:
    training = load_settings().training

    # The origin lesson had to cut the batch from 4 to 2 to fit in GPU memory.
    assert (training.batch_size, training.learning_rate, training.epochs) == (2, 3e-5, 10)
    assert (training.save_steps, training.agreeing_corrections) == (64, 2)
    assert training.max_samples_per_user >= 1
    assert TrainingSettings.model_fields["max_samples_per_user"].description


async def test_the_internvl_meta_file_describes_the_training_file(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    await _liked_answers(store, 5)
    out = tmp_path / "out"

    summary, _ = await export(store, data_dir, out, val_fraction=0.2)

    meta = json.loads((out / "internvl_meta.json").read_text(encoding="utf-8"))
    assert list(meta) == ["dishbot_train"]
    entry = meta["dishbot_train"]
    assert set(entry) == {"root", "annotation", "data_augment", "repeat_time", "length"}
    assert Path(entry["annotation"]) == out / "train.jsonl"
    assert Path(entry["root"]) == out / "images"
    assert entry["length"] == summary.train_samples == len(read_records(out)) - summary.val_samples
    assert (entry["data_augment"], entry["repeat_time"]) == (False, 1)


async def test_the_dataset_card_gives_counts_ratings_dishes_versions_and_commands(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker, critic = await add_user(store, "1"), await add_user(store, "2")
    admin = await add_user(store, "900")
    for n, photo in enumerate(await photos(store, 4)):
        exchange = await answered(store, asker, photo=photo, answer="叉烧，广东烧味。")
        await store.record_rating(exchange.id, asker.id, 1 if n < 3 else -1)
    corrected = await answered(store, critic, photo=await add_photo(store), answer="叉烧")
    await store.record_correction(corrected.id, admin.id, "肠粉")
    out = tmp_path / "out"

    await export(store, data_dir, out)

    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| exported | 4 |" in card
    assert "| excluded: net-negative | 1 |" in card
    assert "| net positive | 3 |" in card
    assert "| 叉烧 | 3 |" in card
    assert "| 肠粉 | 1 |" in card
    assert "| internvl2-2b | 4 |" in card
    assert (
        "export RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500\n"
        "python -m xtuner.tools.train xtuner_config.py --work-dir work_dirs/xtuner_config "
        "--deepspeed deepspeed_zero2\n"
    ) in card
    # 4 samples, batches of 4 x 2 accumulated, 10 epochs: 20 iterations on one GPU.
    assert (
        "python -m xtuner.configs.internvl.v1_5.convert_to_official xtuner_config.py "
        "work_dirs/xtuner_config/iter_20.pth ./fine-tuned-model\n"
    ) in card
    assert "xtuner train" not in card  # the wrapper exits 0 even when training failed
    assert XTUNER_INTERNLM2_SYSTEM_PROMPT in card


async def test_the_summary_reads_well_in_a_chat_reply(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    asker = await _liked_answers(store, 3)
    unrated = await answered(store, asker, photo=await add_photo(store), answer="烧鹅")
    del unrated

    summary, _ = await export(store, data_dir, tmp_path / "out", training={}, val_fraction=0.0)

    lines = summary.lines()
    assert lines[0] == (
        f"Exported 3 samples (3 train, 0 validation) from 3 of 4 answers, with 3 photos, "
        f"to {tmp_path / 'out'}."
    )
    assert "Held back: 1 unrated." in lines
    assert all("\n" not in line for line in lines)
    assert settings_for(data_dir).training.agreeing_corrections == 2


@pytest.mark.parametrize(
    ("sha256", "fraction", "in_validation"),
    [
        ("00" + "f" * 62, 0.1, True),
        ("19" + "0" * 62, 0.1, True),  # 0x19/0x100 is just under 0.1
        ("19a" + "0" * 61, 0.1, False),  # 0x19a/0x1000 is just over
        ("80" + "0" * 62, 0.5, False),
        ("7f" + "f" * 62, 0.5, True),
        ("00" + "0" * 62, 0.0, False),
    ],
)
def test_the_split_is_a_fixed_function_of_the_photo_hash(
    sha256: str, fraction: float, in_validation: bool
) -> None:
    # The same in every process and on every machine: no salted hash(), no random state.
    assert is_validation_photo(sha256, fraction) is in_validation
