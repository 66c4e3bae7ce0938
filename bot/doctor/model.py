"""The model `dishbot run` would serve: in a format its backend runs, here or downloadable,
and small enough for the memory free.

That is the database's active version when a retraining run made it (it wins over
engine.model, as in `dishbot run`), else engine.model or the backend's default.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from bot.doctor.blocking import in_thread
from bot.doctor.context import Context
from bot.doctor.findings import Finding, Status, fail, ok, warn
from bot.doctor.runner import NETWORK_TIMEOUT_S
from bot.engine_setup import resolve_backend_name
from bot.errors import DishbotError
from bot.model_source import (
    ModelUnobtainable,
    fetch,
    format_problem,
    is_local,
    locate,
    memory_problem,
    model_for,
    names_a_model,
    reachability_problem,
)
from bot.settings import EngineSettings, Settings
from bot.store import Store
from bot.store.database import database_errors, missing_sqlite_file
from bot.store.schema import current_revision, head_revision
from bot.training.versions import is_trained

HUB_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class _Served:
    """The model `dishbot run` serves, and the version it is registered as (if it is)."""

    model: str | None
    version: str | None = None
    trained: bool = False


async def check_model(context: Context) -> Finding:
    """The model line: which model, for which backend, and whether it can be had."""
    settings = context.settings
    engine = settings.engine
    backend = await in_thread(lambda: resolve_backend_name(engine))
    configured = model_for(engine, backend)
    active = await _active_version(settings)
    served = active or _Served(configured)
    finding = await _model_finding(context, engine, backend, served)
    if active is None or configured is None or configured == active.model:
        return finding
    # `dishbot run` serves the active version whatever engine.model says: say so, or a fix
    # that sets DISHBOT_ENGINE__MODEL would seem to do nothing.
    if active.trained:
        overruled = (
            f"engine.model {configured} is not used: the trained version {active.version} "
            "is active and wins (`dishbot models` lists the versions)"
        )
    else:
        overruled = (
            f"the default {configured} is not used: the database serves {active.model} as "
            f"{active.version}; set DISHBOT_ENGINE__MODEL to serve another"
        )
    if finding.status is Status.OK:
        return warn("model", f"{finding.text}; {overruled}")
    return Finding(finding.status, "model", f"{finding.text} ({overruled})")


async def _model_finding(
    context: Context, engine: EngineSettings, backend: str, served: _Served
) -> Finding:
    model = served.model
    if backend == "openai":
        if model is None:
            return ok(
                "model",
                "the server chooses: its first model (set DISHBOT_ENGINE__OPENAI__MODEL to pick)",
            )
        return ok("model", f"{model}, asked of the server (the openai line says what it serves)")
    assert model is not None  # every other backend has a default
    version = f", version {served.version}" if served.version else ""
    named = f"{model} ({backend} backend{version})"
    problem = format_problem(backend, model, engine.lmdeploy_engine)
    if problem is not None:
        return fail("model", problem)
    if is_local(model):
        try:
            directory = fetch(model)  # a directory is only looked at, never downloaded
        except ModelUnobtainable as exc:
            return fail("model", str(exc))
        return await _fits(context, engine, backend, model, directory, f"{named}: at {directory}")
    found = await in_thread(lambda: locate(model))
    if found is not None:
        return await _fits(context, engine, backend, model, found, f"{named}: cached at {found}")
    problem = await in_thread(lambda: reachability_problem(model, HUB_TIMEOUT_S))
    if problem is not None:
        return fail("model", problem)
    return ok("model", f"{named}: downloadable from the hub, `dishbot run` fetches it")


async def _active_version(settings: Settings) -> _Served | None:
    """The database's active version when `dishbot run` serves it: a trained one, or an
    untrained one while no model is named; None when the model named replaces it, or when
    the database is not there or not at head (the database line says so, and the configured
    model is what is checked)."""
    url = settings.db_url
    try:
        if missing_sqlite_file(url) is not None:
            return None
        store = Store.open(url, settings.data_dir)
    except DishbotError:
        return None
    try:
        async with asyncio.timeout(NETWORK_TIMEOUT_S), database_errors(url):
            if await current_revision(store.engine) != head_revision():
                return None
            active = await store.active_model_version()
    except (DishbotError, TimeoutError):
        return None
    finally:
        await store.close()
    if active is None:
        return None
    trained = is_trained(active)
    if not trained and names_a_model(settings.engine, settings.engine.backend):
        return None  # an untrained version: the model named replaces it at the next start
    return _Served(active.path, active.name, trained=trained)


async def _fits(
    context: Context,
    engine: EngineSettings,
    backend: str,
    model: str,
    directory: Path,
    line: str,
) -> Finding:
    """``line`` when the model in ``directory`` fits in the memory free where it would load."""
    device = await _device(context, engine, backend)
    free = await in_thread(lambda: context.probes.free_memory(device))
    problem = memory_problem(directory, device, free, name=model)
    if problem is not None:
        return fail("model", problem)
    return ok("model", line)


async def _device(context: Context, engine: EngineSettings, backend: str) -> str:
    """Where the model would load, as `dishbot run` chooses it."""
    if backend == "lmdeploy":
        return "cuda"
    if engine.device != "auto":
        return engine.device
    return "cuda" if (await context.torch()).cuda else "cpu"
