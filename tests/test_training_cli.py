"""`dishbot retrain`, `dishbot runs` and `dishbot models` as an operator uses them.

The store is real (SQLite, and PostgreSQL where a test needs no training), and so is the
model: the tiny random InternVL served by the transformers backend. A run that must learn
trains with dishbot's own LoRA trainer on the recipe of tests/test_retraining_loop.py; a run
whose outcome is the point, not the learning, uses a stand-in trainer whose subprocess copies
the active model (so the candidate answers exactly as the active model does) or fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pexpect
import pytest

import bot.cli
from bot.cli import main
from bot.store import RunStage, Store, TrainingRunRecord
from bot.store.schema import upgrade
from bot.training.export.writer import is_validation_photo
from bot.training.trainers.base import (
    ProgressCallback,
    TrainedModel,
    TrainingFailed,
    TrainingJob,
    read_progress,
)
from bot.training.trainers.process import group_alive, log_tail, run_logged
from tests.factories import add_photo, add_user, answered, jpeg_bytes
from tests.test_export_selection import ADMIN_ID

DISHBOT = str(Path(sys.executable).with_name("dishbot"))
CHEUNG_FUN = (240, 240, 240)  # the photo the base model gets wrong
CORRECTED = {CHEUNG_FUN: "肠粉", (200, 30, 30): "叉烧", (40, 180, 60): "虾饺"}
LIKED = (30, 60, 200)
# tests/test_retraining_loop.py's recipe: 4 samples, 2 a batch, 40 epochs = 80 iterations.
RECIPE = {
    "TRAINER": "transformers",
    "EPOCHS": "40",
    "LEARNING_RATE": "1e-2",
    "BATCH_SIZE": "2",
    "ACCUMULATIVE_COUNTS": "1",
    "LORA_R": "8",
    "LORA_ALPHA": "16",
    "LORA_DROPOUT": "0",
    "THREADS": "1",
    # A random model's approved answers are byte noise it does not give back whole once
    # trained on: "kept" is shown but does not decide here (as in the loop test).
    "KEPT_TOLERANCE": "1.0",
}
EPOCHS_TO_CANCEL = "5000"  # a run that trains far longer than the test waits
GUARD_S = 120.0  # a guard against hangs, not a measurement


# -- the database and the operator's environment ---------------------------------------


async def _seed(url: str, data_dir: Path) -> None:
    """An admin's corrections of three photos (肠粉 among them) and one approved answer."""
    store = Store.open(url, data_dir)
    await upgrade(store.engine)
    try:
        asker = await add_user(store, "43")
        admin = await add_user(store, ADMIN_ID)
        fan = await add_user(store, "44")
        for colour, dish in CORRECTED.items():
            wrong = await answered(store, asker, photo=await add_photo(store, colour))
            await store.record_correction(wrong.id, admin.id, dish)
        liked = await answered(store, asker, photo=await add_photo(store, LIKED), answer="云吞面")
        await store.record_rating(liked.id, fan.id, 1)
    finally:
        await store.close()


def _in_store(url: str, data_dir: Path, action: Callable[[Store], Any]) -> Any:
    async def go() -> Any:
        store = Store.open(url, data_dir)
        try:
            return await action(store)
        finally:
            await store.close()

    return asyncio.run(go())


@dataclass(frozen=True)
class Operator:
    """The database and data directory the `dishbot` commands of a test work on."""

    url: str
    data_dir: Path

    def store(self, action: Callable[[Store], Any]) -> Any:
        """What ``action`` returns on a store of our own."""
        return _in_store(self.url, self.data_dir, action)

    def run(self, run_id: int) -> TrainingRunRecord:
        run = self.store(lambda store: store.get_training_run(run_id))
        assert run is not None
        return run

    def active_version(self) -> str:
        return str(self.store(lambda store: store.active_model_version()).name)


@pytest.fixture
def operator(
    database_url: str,
    data_dir: Path,
    tiny_internvl: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Operator:
    """Feedback to train on, and the settings `dishbot` reads, in the environment."""
    # Every photo lands in training (the export splits by photo hash), as in the loop test.
    for colour in (*CORRECTED, LIKED):
        assert not is_validation_photo(hashlib.sha256(jpeg_bytes(colour)).hexdigest(), 0.1)
    asyncio.run(_seed(database_url, data_dir))
    environment = {
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": database_url,
        "ADMINS": f"telegram:{ADMIN_ID}",
        "LOG_LEVEL": "WARNING",
        "ENGINE__BACKEND": "transformers",
        "ENGINE__MODEL": str(tiny_internvl),
        "ENGINE__DEVICE": "cpu",
        "ENGINE__MAX_TILES": "1",
        "ENGINE__MAX_NEW_TOKENS": "8",
        **{f"TRAINING__{name}": value for name, value in RECIPE.items()},
    }
    for name, value in environment.items():
        monkeypatch.setenv(f"DISHBOT_{name}", value)
    return Operator(database_url, data_dir)


# Runs that load and train the model use SQLite; the rest run on PostgreSQL too.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


# -- stand-in trainers -----------------------------------------------------------------

# The stand-in's subprocess: a progress line, then the active model copied as "the" model.
COPY_SCRIPT = """
import json, shutil, sys
base, output, progress, status = sys.argv[1:]
print("stand-in trainer: copying", base, flush=True)
with open(progress, "a") as lines:
    lines.write(json.dumps({"iter": 1, "loss": 0.5, "time": 0.01}) + "\\n")
if int(status):
    print("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", flush=True)
    sys.exit(int(status))
shutil.copytree(base, output)
"""


@dataclass
class CopyingTrainer:
    """A trainer with the real interface whose subprocess copies the model it was given."""

    exit_status: int = 0
    name: str = "copy"

    async def train(self, job: TrainingJob, progress: ProgressCallback) -> TrainedModel:
        job.work_dir.mkdir(parents=True, exist_ok=True)
        scalars = job.work_dir / "scalars.json"
        arguments = (job.base_model, job.output_dir, scalars, self.exit_status)
        status = await run_logged(
            [sys.executable, "-c", COPY_SCRIPT, *map(str, arguments)],
            log_path=job.log_path,
            poll=lambda: progress(read_progress(scalars, "training", job.total_iterations)),
            poll_interval_s=0.05,
        )
        if status != 0:
            raise TrainingFailed(f"the trainer exited with status {status}", log_tail(job.log_path))
        return TrainedModel(job.output_dir, job.system_prompt, "chatml")


def use_trainer(monkeypatch: pytest.MonkeyPatch, trainer: CopyingTrainer) -> None:
    monkeypatch.setattr(bot.cli, "trainer_for", lambda settings: trainer)


# -- retrain ----------------------------------------------------------------------------


@SQLITE_ONLY
def test_a_dry_run_prints_the_plan_and_trains_nothing(
    operator: Operator, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["retrain", "--dry-run"]) == 0

    out = capsys.readouterr().out
    assert out.startswith("Retraining run 1: dry run done, nothing was trained\n")
    assert (
        "Decision: dry run: would train on 4 training and 0 held-out samples; 80 iterations "
        "with the transformers trainer from version base"
    ) in out
    run_dir = Path(operator.run(1).run_dir or "")
    assert (run_dir / "export" / "train.jsonl").is_file()
    assert not (run_dir / "model").exists()
    assert not (run_dir / "train.log").exists()
    assert operator.active_version() == "base"


@SQLITE_ONLY
def test_retrain_trains_evaluates_and_promotes_and_models_shows_the_new_version_active(
    operator: Operator, capsys: pytest.CaptureFixture[str]
) -> None:
    # A real `dishbot retrain` on a terminal: the bar, then the table and the decision.
    session = pexpect.spawn(
        DISHBOT, ["retrain"], env=dict(os.environ), encoding="utf-8", timeout=GUARD_S
    )
    session.expect(pexpect.EOF)
    session.close()
    screen = session.before

    assert session.exitstatus == 0, screen
    bar = [line for line in screen.split("\r") if line.startswith("\x1b[Krun 1: training ")]
    assert any("%" in line and "loss" in line and "left" in line for line in bar), screen
    assert "Retraining run 1: done: the new model is answering" in screen
    taught = next(line for line in screen.splitlines() if line.startswith("taught"))
    assert taught.split()[1:3] == ["0.00", "1.00"], screen
    assert "Decision: better on taught and kept" in screen
    assert "now answering: run-1" in screen
    assert "every running bot switches to it within 2 s (training.follow_interval_s)" in screen

    assert main(["models"]) == 0
    listed = capsys.readouterr().out.splitlines()
    heading = "VERSION  HELD OUT  TAUGHT  KEPT  TRAINER       RUN  CREATED (UTC)"
    assert " ".join(listed[0].split()) == " ".join(heading.split()) + " PATH"
    base, run_1 = (line.split() for line in listed[1:3])
    assert base[:6] == ["base", "–", "–", "–", "–", "–"]
    assert run_1[:3] == ["*", "run-1", "–"]  # active; nothing was held out
    assert run_1[3] == "1.00"  # it names every dish it was taught
    assert run_1[5:7] == ["transformers", "1"]

    assert main(["runs", "show", "1"]) == 0
    shown = capsys.readouterr().out
    assert "model version: run-1 (active)" in shown
    assert f"the end of {operator.run(1).log_path}:" in shown


@SQLITE_ONLY
def test_a_candidate_no_better_than_the_active_model_is_rejected_with_status_2(
    operator: Operator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_trainer(monkeypatch, CopyingTrainer())

    assert main(["retrain"]) == 2

    out = capsys.readouterr().out
    assert out.startswith("Retraining run 1: rejected: the active model stays")
    assert "candidate" in out
    assert "taught" in out
    assert "Decision: not better enough on taught and kept" in out
    assert "now answering" not in out
    assert operator.active_version() == "base"
    assert main(["models"]) == 0
    assert [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:2]] == [
        ["*", "base"]
    ]


@SQLITE_ONLY
def test_a_trainer_that_fails_ends_the_run_with_status_1_and_its_log_tail_on_stderr(
    operator: Operator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_trainer(monkeypatch, CopyingTrainer(exit_status=1))

    assert main(["retrain"]) == 1

    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Retraining run 1: failed" in captured.err
    assert "the trainer exited with status 1" in captured.err
    assert "RuntimeError: CUDA out of memory" in captured.err
    assert operator.active_version() == "base"


@SQLITE_ONLY
def test_a_second_retrain_is_refused_with_status_3_and_runs_cancel_stops_the_first(
    operator: Operator, capsys: pytest.CaptureFixture[str]
) -> None:
    with retraining_in_background() as first:
        training = _wait_for(operator, lambda run: run.trainer_pgid is not None)

        assert main(["retrain"]) == 3
        refused = capsys.readouterr().err
        assert refused.startswith("dishbot: training run 1 is already training")
        assert "nothing was started" in refused
        assert "Retraining run 1: training" in refused

        assert main(["runs", "cancel", "1"]) == 0
        assert capsys.readouterr().out == "training run 1 cancelled (it was training)\n"
        _out, err = first.communicate(timeout=GUARD_S)

    assert first.returncode == 1, err
    assert "Retraining run 1: cancelled" in err
    assert operator.run(1).stage is RunStage.CANCELLED
    assert training.trainer_pgid is not None
    assert not group_alive(training.trainer_pgid), "the trainer's processes are gone"
    assert main(["runs"]) == 0
    [heading, line] = capsys.readouterr().out.splitlines()
    assert heading.split()[:3] == ["RUN", "STAGE", "TRAINER"]
    assert line.split()[:3] == ["1", "cancelled", "transformers"]
    assert line.endswith("cancelled by an admin")


@SQLITE_ONLY
def test_ctrl_c_cancels_the_run_and_stops_its_trainer(operator: Operator) -> None:
    with retraining_in_background() as retrain:
        training = _wait_for(operator, lambda run: run.trainer_pgid is not None)
        retrain.send_signal(signal.SIGINT)
        _out, err = retrain.communicate(timeout=GUARD_S)

    assert retrain.returncode == 130, err
    assert "Retraining run 1: cancelled" in err
    assert operator.run(1).stage is RunStage.CANCELLED
    assert training.trainer_pgid is not None
    assert not group_alive(training.trainer_pgid), "the trainer's processes are gone"


@contextlib.contextmanager
def retraining_in_background() -> Iterator[subprocess.Popen[str]]:
    """`dishbot retrain` as a process of its own, on a run far longer than the test."""
    environment = {**os.environ, "DISHBOT_TRAINING__EPOCHS": EPOCHS_TO_CANCEL}
    retrain = subprocess.Popen(
        [DISHBOT, "retrain"],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield retrain
    finally:
        if retrain.poll() is None:
            retrain.kill()
            retrain.communicate()


def _wait_for(operator: Operator, condition: Callable[[TrainingRunRecord], bool]) -> Any:
    """The newest run once ``condition`` holds for it."""
    deadline = time.monotonic() + GUARD_S
    while time.monotonic() < deadline:
        runs = operator.store(lambda store: store.training_runs())
        if runs and condition(runs[0]):
            return runs[0]
        time.sleep(0.2)
    pytest.fail(f"the run never got there: {runs}")


# -- runs and models, without training ---------------------------------------------------


def test_runs_lists_runs_and_shows_one_with_its_evaluation_and_log_tail(
    operator: Operator, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["runs"]) == 0
    assert capsys.readouterr().out == "no retraining runs yet; start one with `dishbot retrain`\n"
    run = _finished_run(operator, log="Iter(train) [80/80]  loss: 0.0123\nsaved the model\n")

    assert main(["runs"]) == 0
    [_heading, line] = capsys.readouterr().out.splitlines()
    assert line.split()[:3] == [str(run.id), "rejected", "transformers"]
    assert line.endswith("not better enough on taught and kept: 0.50 vs 0.50 (needs +0.1)")

    assert main(["runs", "show", str(run.id)]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"Retraining run {run.id}: rejected")
    assert "candidate" in shown
    assert "taught" in shown
    assert "trainer: transformers" in shown
    assert shown.endswith("Iter(train) [80/80]  loss: 0.0123\nsaved the model\n")


def test_models_activate_and_rollback_switch_the_version_every_bot_answers_with(
    operator: Operator, capsys: pytest.CaptureFixture[str]
) -> None:
    _register_run_1(operator)

    assert main(["models", "activate", "run-1"]) == 0
    assert capsys.readouterr().out == (
        "run-1 is the active model version: every running bot switches to it within 2 s "
        "(training.follow_interval_s)\n"
    )
    assert operator.active_version() == "run-1"

    assert main(["models", "rollback"]) == 0
    assert capsys.readouterr().out.startswith("rolled back: base is the active model version")
    assert operator.active_version() == "base"


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        (["runs", "show", "7"], "there is no training run 7 (`dishbot runs` lists them)"),
        (["runs", "cancel", "7"], "there is no training run 7 (`dishbot runs` lists them)"),
        (["models", "activate", "run-9"], "there is no model version 'run-9' (versions: base)"),
        (["models", "rollback"], "there is no earlier model version to go back to"),
    ],
)
@SQLITE_ONLY
def test_an_unknown_run_or_version_is_one_clear_line_and_status_1(
    operator: Operator,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    complaint: str,
) -> None:
    operator.store(lambda store: store.add_model_version("base", "/models/base"))
    operator.store(lambda store: store.activate_model_version("base", reason="base"))

    assert main(arguments) == 1

    captured = capsys.readouterr()
    assert captured.err == f"dishbot: {complaint}\n"
    assert captured.out == ""


@SQLITE_ONLY
def test_cancelling_a_run_that_has_ended_says_so(
    operator: Operator, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _finished_run(operator, log="")

    assert main(["runs", "cancel", str(run.id)]) == 1

    assert capsys.readouterr().err == (
        f"dishbot: training run {run.id} has already ended (rejected); nothing to cancel\n"
    )


def test_runs_and_models_without_a_database_say_so_and_create_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISHBOT_DATA_DIR", str(tmp_path / "nothing"))

    for arguments in (["runs"], ["models"], ["retrain"]):
        assert main(arguments) == 1
        assert "no database at" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


# -- helpers that write what a run would have -------------------------------------------

EVALUATION: dict[str, Any] = {
    "summary": {
        "held_out": {"count": 0, "active": None, "candidate": None},
        "taught": {"count": 1, "active": 0.0, "candidate": 1.0},
        "kept": {"count": 1, "active": 1.0, "candidate": 0.0},
    },
    "samples": [
        {
            "set_name": "taught",
            "image": "a.jpg",
            "question": "这是什么菜？",
            "expected": "这是肠粉。",
            "active_answer": "叉烧",
            "candidate_answer": "肠粉",
            "active_score": 0.0,
            "candidate_score": 1.0,
        },
        {
            "set_name": "kept",
            "image": "b.jpg",
            "question": "这是什么菜？",
            "expected": "云吞面",
            "active_answer": "云吞面",
            "candidate_answer": "叉烧",
            "active_score": 1.0,
            "candidate_score": 0.0,
        },
    ],
}


def _finished_run(operator: Operator, *, log: str) -> TrainingRunRecord:
    """A rejected run of the transformers trainer, with ``log`` as its train.log."""
    log_path = operator.data_dir / "training" / "runs" / "1" / "train.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(log, encoding="utf-8")

    async def finish(store: Store) -> TrainingRunRecord:
        run = await store.create_training_run(trainer="transformers")
        await store.update_training_run(
            run.id, stage=RunStage.TRAINING, run_dir=str(log_path.parent), log_path=str(log_path)
        )
        return await store.finish_training_run(
            run.id,
            RunStage.REJECTED,
            evaluation=EVALUATION,
            decision="not better enough on taught and kept: 0.50 vs 0.50 (needs +0.1)",
        )

    return operator.store(finish)  # type: ignore[no-any-return]


def _register_run_1(operator: Operator) -> None:
    async def register(store: Store) -> None:
        base = await store.add_model_version("base", "/models/base")
        await store.activate_model_version("base", reason="base")
        await store.add_model_version(
            "run-1",
            "/models/run-1",
            parent_id=base.id,
            trainer="transformers",
            evaluation=EVALUATION,
        )

    operator.store(register)
