"""Model versions: the active one is a row, and every serving process follows it.

A fresh install registers the configured model as the first version, "base". Promoting a
retrained model, `dishbot models activate` and a rollback all change the one active row;
each process's `VersionFollower` notices within ``training.follow_interval_s`` and swaps its
engine, so every process on the same database serves the same version. A version's name is
the name the engine reports (`Answer.model`), which is what new exchanges record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import fields
from typing import Any

from bot.engine_setup import configured_model_path
from bot.settings import Settings
from bot.store import ModelVersionRecord, Store
from engine.engine import Engine
from engine.errors import EngineError
from engine.types import ModelSpec

log = logging.getLogger(__name__)

BASE_VERSION = "base"
_SPEC_FIELDS = frozenset(f.name for f in fields(ModelSpec))


def model_spec(version: ModelVersionRecord) -> ModelSpec:
    """What the engine loads for ``version``: its path, name, system prompt and template."""
    values: dict[str, Any] = {
        "path": version.path,
        "name": version.name,
        "system_prompt": version.system_prompt,
    }
    if "template" in _SPEC_FIELDS:  # ModelSpec.template is being added beside this module
        values["template"] = version.template
    return ModelSpec(**values)


async def ensure_base_version(
    store: Store, settings: Settings, model: str | None = None, *, repoint: bool = False
) -> ModelVersionRecord:
    """The active version; on a fresh install, ``model`` (default: the configured
    ``engine.model``, or the backend's default) as "base".

    With ``repoint`` (what `dishbot run` asks when ``engine.model`` is set explicitly), an
    untrained active model gives way to ``model`` when it differs: the operator set another
    after a first start, so it is registered as a new base version ("base-2", ...) or an
    earlier base of it, and activated. A trained version, once active, wins over the
    settings (`dishbot models` lists them).

    Safe to call from several processes starting at once: they agree on one "base".
    """
    model = model or configured_model_path(settings)
    active = await store.active_model_version()
    if active is not None:
        if active.path == model:
            return active
        if repoint and not is_trained(active):
            return await _switch_base(store, model)
        log.warning(
            "engine.model is %s but the database serves %s as %r; the database wins "
            "(`dishbot models` lists the versions)",
            model,
            active.path,
            active.name,
        )
        return active
    with contextlib.suppress(ValueError):  # another process registered it a moment ago
        await store.add_model_version(BASE_VERSION, model)
    if (active := await store.active_model_version()) is not None:
        return active
    return await store.activate_model_version(BASE_VERSION, reason="base")


def is_trained(version: ModelVersionRecord) -> bool:
    """Whether a run trained ``version`` (else it is a base: a model as configured)."""
    return version.parent_id is not None or version.run_id is not None


async def _switch_base(store: Store, model: str) -> ModelVersionRecord:
    """Serve ``model`` as the base from now on: an earlier base version of it, or a new one."""
    versions = await store.model_versions()
    earlier = [v for v in versions if not is_trained(v) and v.path == model]
    if earlier:
        name = earlier[-1].name
    else:
        taken = {version.name for version in versions}
        name = next(
            f"{BASE_VERSION}-{n}"
            for n in range(2, len(taken) + 3)
            if f"{BASE_VERSION}-{n}" not in taken
        )
        with contextlib.suppress(ValueError):  # another process took the name a moment ago
            await store.add_model_version(name, model)
    log.info("engine.model is now %s: serving it as model version %s", model, name)
    return await store.activate_model_version(name, reason="base")


async def activate(store: Store, name: str) -> ModelVersionRecord:
    """Make version ``name`` the active one; every process's follower swaps to it.

    Raises `NotFound` for an unknown name.
    """
    version = await store.activate_model_version(name)
    log.info("model version %s activated", name)
    return version


async def rollback(store: Store) -> ModelVersionRecord:
    """Reactivate the version that was active before the current one, and return it.

    Raises `NothingToRollBack` when there is none.
    """
    version = await store.rollback_model_version()
    log.info("rolled back to model version %s", version.name)
    return version


class VersionFollower:
    """Keeps an engine serving the active version: polls the row and swaps when it changes.

    A version that fails to load is logged and not tried again until the active row changes;
    the engine keeps serving the model it had.
    """

    def __init__(self, store: Store, engine: Engine, interval_s: float) -> None:
        self.store = store
        self.engine = engine
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._failed: ModelSpec | None = None

    async def start(self) -> None:
        """Swap to the active version now if needed, then keep following it."""
        try:
            await self.sync()
        except EngineError:
            log.exception(
                "could not load the active model version; serving %s", self.engine.model.name
            )
        self._task = asyncio.create_task(self._follow_forever(), name="version-follower")

    async def stop(self) -> None:
        """Stop following (a swap under way is cancelled; the engine keeps a loaded model)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def sync(self) -> bool:
        """Swap the engine to the active version if it serves another; whether it swapped.

        Raises the engine's error when the swap fails (the old model is served again).
        """
        async with self._lock:
            active = await self.store.active_model_version()
            if active is None:
                return False
            wanted = model_spec(active)
            if wanted == self.engine.model:
                self._failed = None
                return False
            log.info(
                "model version %s is active: swapping from %s", wanted.name, self.engine.model.name
            )
            try:
                await self.engine.swap_model(wanted)
            except EngineError:
                # It would not load: wait for the active row to change rather than retry.
                # (A swap cut short by cancellation is tried again on the next check.)
                self._failed = wanted
                raise
            self._failed = None
            return True

    async def _follow_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                active = await self.store.active_model_version()
                if active is not None and model_spec(active) == self._failed:
                    continue  # it failed to load; wait for the active row to change
                await self.sync()
            except asyncio.CancelledError:
                raise
            except EngineError:
                log.exception(
                    "could not swap to the active model version; still serving %s",
                    self.engine.model.name,
                )
            except Exception:
                log.exception("could not check the active model version; will try again")

    async def __aenter__(self) -> VersionFollower:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()
