"""Model versions (at most one active) and training runs (claimed by one worker each)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from bot.errors import NotFound
from bot.store import Store, TrainingStatus
from bot.store.models import ModelVersion
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


async def test_two_workers_never_claim_the_same_training_run(store: Store) -> None:
    admin = await add_user(store, "1")
    queued = [
        await store.request_training_run(requested_by=admin.id, parameters={"epochs": n})
        for n in (1, 2)
    ]

    claims = await asyncio.gather(*(store.claim_training_run(f"worker-{i}") for i in range(4)))

    claimed = [run for run in claims if run is not None]
    assert sorted(run.id for run in claimed) == sorted(run.id for run in queued)
    assert all(run.status is TrainingStatus.RUNNING and run.started_at for run in claimed)
    assert await store.claim_training_run("late") is None


async def test_a_finished_training_run_keeps_its_result(store: Store) -> None:
    run = await store.request_training_run(requested_by=None, parameters={"lr": 2e-5})
    await store.claim_training_run("gpu-host")

    failed = await store.finish_training_run(
        run.id, status=TrainingStatus.FAILED, error="CUDA out of memory"
    )

    assert failed.status is TrainingStatus.FAILED
    assert failed.error == "CUDA out of memory"
    assert failed.worker == "gpu-host"
    assert failed.finished_at is not None
    with pytest.raises(ValueError, match="end state"):
        await store.finish_training_run(run.id, status=TrainingStatus.RUNNING)
