"""Model versions (at most one active, rollback walks back) and training runs (one at a time)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from bot.errors import NotFound
from bot.store import NothingToRollBack, ReportTarget, RunInProgress, RunStage, Store
from bot.store.models import ModelVersion
from bot.store.store import RunEnded
from tests.factories import add_user


async def test_activating_a_version_deactivates_the_previous_one(store: Store) -> None:
    base = await store.add_model_version("internvl2-2b", "OpenGVLab/InternVL2-2B")
    tuned = await store.add_model_version(
        "food-lora-1", "/models/food-lora-1", parent_id=base.id, metrics={"accuracy": 0.81}
    )
    assert await store.active_model_version() is None

    await store.activate_model_version("internvl2-2b")
    active = await store.activate_model_version("food-lora-1")

    assert active.name == "food-lora-1"
    assert active.is_active
    assert active.metrics == {"accuracy": 0.81}
    assert active.parent_id == base.id
    assert [(v.name, v.is_active) for v in await store.model_versions()] == [
        ("internvl2-2b", False),
        ("food-lora-1", True),
    ]
    assert (await store.active_model_version()) == active
    assert tuned.activated_at is None
    assert active.activated_at is not None


async def test_the_database_refuses_a_second_active_version(store: Store) -> None:
    await store.add_model_version("a", "/models/a")
    await store.add_model_version("b", "/models/b")
    await store.activate_model_version("a")

    async with store.engine.begin() as connection:
        with pytest.raises(IntegrityError):
            await connection.execute(
                update(ModelVersion).where(ModelVersion.name == "b").values(is_active=True)
            )


async def test_version_names_are_unique_and_unknown_ones_are_not_found(store: Store) -> None:
    await store.add_model_version("a", "/models/a")

    with pytest.raises(ValueError, match="already exists"):
        await store.add_model_version("a", "/models/other")
    with pytest.raises(NotFound):
        await store.activate_model_version("nope")


async def test_a_version_keeps_how_it_was_trained_and_must_be_served(store: Store) -> None:
    base = await store.add_model_version("base", "/models/base")
    tuned = await store.add_model_version(
        "run-1",
        "/runs/1/model",
        parent_id=base.id,
        trainer="transformers",
        run_id=1,
        system_prompt="You are a food expert.",
        template="chatml",
        evaluation={"summary": {"taught": {"active": 0.0, "candidate": 1.0}}},
    )

    again = await store.get_model_version("run-1")

    assert again == tuned
    assert (tuned.parent_id, tuned.trainer, tuned.run_id) == (base.id, "transformers", 1)
    assert (tuned.system_prompt, tuned.template) == ("You are a food expert.", "chatml")
    assert tuned.evaluation == {"summary": {"taught": {"active": 0.0, "candidate": 1.0}}}
    assert await store.get_model_version("nope") is None


async def test_rollback_walks_back_one_activation_at_a_time(store: Store) -> None:
    for name in ("a", "b", "c"):
        await store.add_model_version(name, f"/models/{name}")
        await store.activate_model_version(name)
    await store.activate_model_version("c")  # activating the active one changes nothing

    assert (await store.previous_model_version()).name == "b"  # type: ignore[union-attr]
    assert (await store.rollback_model_version()).name == "b"
    assert (await store.active_model_version()).name == "b"  # type: ignore[union-attr]
    assert (await store.rollback_model_version()).name == "a"
    assert await store.previous_model_version() is None
    with pytest.raises(NothingToRollBack):
        await store.rollback_model_version()
    assert (await store.active_model_version()).name == "a"  # type: ignore[union-attr]

    await store.activate_model_version("c")  # a new history starts from a
    assert (await store.rollback_model_version()).name == "a"


async def test_a_second_run_is_refused_naming_the_running_one(store: Store) -> None:
    admin = await add_user(store, "1")
    first = await store.create_training_run(
        requested_by=admin.id,
        report_to=ReportTarget("telegram", "42", "7"),
        trainer="transformers",
        host="gpu-host",
        pid=123,
    )
    await store.update_training_run(
        first.id,
        stage=RunStage.TRAINING,
        progress={"stage": "training", "iteration": 30, "total": 120, "eta_s": 300.0},
    )

    with pytest.raises(RunInProgress) as refused:
        await store.create_training_run(requested_by=admin.id)

    running = refused.value.run
    assert running.id == first.id
    assert running.stage is RunStage.TRAINING
    assert running.progress["iteration"] == 30
    assert "30/120" in str(refused.value)
    assert running.report_to == ReportTarget("telegram", "42", "7")
    assert (await store.running_training_run()) == running


async def test_the_slot_frees_when_the_run_ends_and_its_story_is_kept(store: Store) -> None:
    run = await store.create_training_run(trainer="transformers")
    await store.update_training_run(run.id, stage=RunStage.EXPORTING, notes=["exported 12"])
    await store.update_training_run(run.id, trainer_pgid=4242, notes=["batch halved"])

    failed = await store.finish_training_run(
        run.id, RunStage.FAILED, error="the trainer exited with status 1", notes=["log kept"]
    )
    late_cancel = await store.finish_training_run(run.id, RunStage.CANCELLED)

    assert failed.stage is RunStage.FAILED
    assert failed.finished
    assert failed.notes == ["exported 12", "batch halved", "log kept"]
    assert failed.trainer_pgid == 4242
    assert failed.finished_at is not None
    assert late_cancel == failed  # the first end wins
    with pytest.raises(RunEnded):
        await store.update_training_run(run.id, stage=RunStage.TRAINING)
    with pytest.raises(ValueError, match="end state"):
        await store.finish_training_run(run.id, RunStage.TRAINING)
    assert await store.running_training_run() is None
    second = await store.create_training_run()
    assert [r.id for r in await store.training_runs()] == [second.id, run.id]


async def test_two_processes_starting_runs_at_once_get_one_slot(
    store: Store, database_url: str, data_dir: Path
) -> None:
    others = [Store.open(database_url, data_dir) for _ in range(3)]
    try:
        outcomes = await asyncio.gather(
            *(s.create_training_run(pid=n) for n, s in enumerate([store, *others])),
            return_exceptions=True,
        )
    finally:
        for other in others:
            await other.close()

    started = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, RunInProgress)]
    assert len(started) == 1
    assert len(refused) == 3
    assert all(r.run.id == started[0].id for r in refused)
