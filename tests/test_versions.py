"""Model versions as every serving process sees them: the base version, following the active
row, activation and rollback from another process, and a version that will not load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.settings import EngineSettings, Settings
from bot.store import NothingToRollBack, Store
from bot.training.versions import (
    VersionFollower,
    activate,
    ensure_base_version,
    model_spec,
    rollback,
)
from engine.engine import Engine, Request
from engine.types import ModelSpec
from tests.scripted_backend import ScriptedBackend

BASE_PATH = "/models/base"
INTERVAL_S = 0.1


async def answered_by(engine: Engine, question: str = "这是什么菜？") -> str:
    handle = await engine.submit(Request(key="telegram:1", question=question))
    return (await handle.result()).model


async def eventually_served_by(engine: Engine, name: str, timeout_s: float = 5.0) -> float:
    """Seconds until ``engine`` serves ``name``."""
    started = time.monotonic()
    while engine.model.name != name:
        assert time.monotonic() - started < timeout_s, f"still serving {engine.model.name}"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, engine=EngineSettings(model=BASE_PATH))


@pytest.fixture
async def other_process(database_url: str, data_dir: Path) -> AsyncIterator[Store]:
    """A second connection to the same database: the CLI, or another bot process."""
    other = Store.open(database_url, data_dir)
    try:
        yield other
    finally:
        await other.close()


async def test_a_fresh_install_serves_the_configured_model_as_base(
    store: Store, other_process: Store, settings: Settings
) -> None:
    first, second = await asyncio.gather(
        ensure_base_version(store, settings), ensure_base_version(other_process, settings)
    )

    assert first == second
    assert (first.name, first.path, first.is_active) == ("base", BASE_PATH, True)
    assert [v.name for v in await store.model_versions()] == ["base"]
    assert await ensure_base_version(store, settings) == first
    spec = model_spec(first)
    assert (spec.path, spec.name, spec.system_prompt) == (BASE_PATH, "base", None)


async def test_setting_another_model_after_a_first_start_serves_it_while_untrained(
    store: Store, settings: Settings, data_dir: Path
) -> None:
    # A first start registered the default; the operator then set the model they have.
    await ensure_base_version(store, settings)
    changed = Settings(data_dir=data_dir, engine=EngineSettings(model="/models/local"))

    switched = await ensure_base_version(store, changed, repoint=True)
    again = await ensure_base_version(store, changed, repoint=True)
    back = await ensure_base_version(store, settings, repoint=True)

    assert (switched.name, switched.path, switched.is_active) == ("base-2", "/models/local", True)
    assert again == switched
    assert (back.name, back.path) == ("base", BASE_PATH)  # the earlier base, not a third
    assert [v.name for v in await store.model_versions()] == ["base", "base-2"]


async def test_a_trained_version_once_active_wins_over_the_settings(
    store: Store, settings: Settings, data_dir: Path
) -> None:
    base = await ensure_base_version(store, settings)
    await store.add_model_version("run-1", "/runs/1/model", parent_id=base.id)
    await activate(store, "run-1")
    changed = Settings(data_dir=data_dir, engine=EngineSettings(model="/models/local"))

    served = await ensure_base_version(store, changed, repoint=True)

    assert (served.name, served.path) == ("run-1", "/runs/1/model")


async def test_only_dishbot_run_with_a_named_model_repoints_the_base(
    store: Store, settings: Settings, data_dir: Path
) -> None:
    # A retrain or another host (whose `auto` may land on another backend's default) reads
    # the active version; it does not take turns switching every process's model.
    base = await ensure_base_version(store, settings)
    other = Settings(data_dir=data_dir, engine=EngineSettings(model="/models/local"))

    served = await ensure_base_version(store, other)

    assert served == base
    assert [v.name for v in await store.model_versions()] == ["base"]


async def test_every_process_follows_an_activation_made_elsewhere_within_seconds(
    store: Store, other_process: Store, settings: Settings
) -> None:
    await ensure_base_version(store, settings)
    await other_process.add_model_version(
        "run-1", "/runs/1/model", system_prompt="You are a food expert.", template="chatml"
    )
    async with (
        Engine(ScriptedBackend(), ModelSpec(BASE_PATH, "base")) as engine,
        VersionFollower(store, engine, INTERVAL_S),
    ):
        assert await answered_by(engine) == "base"
        in_flight = await engine.submit(Request(key="telegram:2", question="slow question"))

        await activate(other_process, "run-1")  # `dishbot models activate run-1`

        assert await eventually_served_by(engine, "run-1") < 2
        assert engine.model.system_prompt == "You are a food expert."
        assert await answered_by(engine) == "run-1"
        assert (await in_flight.result()).model == "base"  # nobody's question was dropped

        await rollback(other_process)  # `dishbot models rollback`, from any process

        assert await eventually_served_by(engine, "base") < 2
        assert await answered_by(engine) == "base"
        with pytest.raises(NothingToRollBack):
            await rollback(other_process)


async def test_a_version_that_will_not_load_leaves_the_old_one_serving(
    store: Store, other_process: Store, settings: Settings
) -> None:
    await ensure_base_version(store, settings)
    await other_process.add_model_version("broken", "missing")  # the scripted backend fails it
    await other_process.add_model_version("good", "/runs/2/model")
    backend = ScriptedBackend()
    async with (
        Engine(backend, ModelSpec(BASE_PATH, "base")) as engine,
        VersionFollower(store, engine, INTERVAL_S),
    ):
        await activate(other_process, "broken")
        await asyncio.sleep(INTERVAL_S * 5)

        assert engine.model.name == "base"
        assert await answered_by(engine) == "base"
        assert backend.loads.count("base") == 2  # loaded again once after the failure, no more

        await activate(other_process, "good")  # the next change is followed again
        await eventually_served_by(engine, "good")
        assert await answered_by(engine) == "good"
