"""Start-up faults that must end in a status saying what to do, never in a crash, a retry
loop that cannot end, a mangled or revealing message, or a base version flipped by a host
that named nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp import web

from bot import model_startup
from bot.engine_setup import engine_to_start
from bot.model_source import LMDEPLOY_DEFAULT
from bot.model_startup import ModelStartup, Phase
from bot.settings import load_settings
from bot.store import Store
from bot.training.versions import activate, ensure_base_version
from engine.types import ModelSpec
from tests.test_first_run import _free_port, dishbot_run, hub_offline  # noqa: F401

GUARD_S = 30.0


async def test_an_openai_model_left_in_a_shared_config_does_not_repoint_a_gpu_host(
    store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One dishbot.toml for every host, with [engine.openai] model = "..." left in it (or set
    # for the hosts that use a server); backend auto. The GPU host registered lmdeploy's
    # default as base. A CPU host (auto -> transformers, no engine.model) starts.
    gpu = load_settings(data_dir=data_dir, engine={"backend": "lmdeploy"})
    await ensure_base_version(store, gpu)
    cpu = load_settings(
        data_dir=data_dir, engine={"backend": "transformers", "openai": {"model": "served"}}
    )
    startup = ModelStartup(cpu, engine_to_start(cpu), log_failure=False)

    await startup._chosen_model(store)

    active = await store.active_model_version()
    assert active is not None
    # A default is not "named": the database's base must not flip to the CPU default.
    assert active.path == LMDEPLOY_DEFAULT, f"repointed to {active.name} ({active.path})"


async def _refusing_server(status: int) -> tuple[web.AppRunner, str]:
    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "invalid api key"}}, status=status)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/v1"


async def test_an_openai_server_refusing_the_key_says_so_and_is_not_retried_for_ever(
    store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_startup, "RETRY_FIRST_S", 0.05)
    runner, url = await _refusing_server(401)
    try:
        settings = load_settings(
            data_dir=data_dir,
            engine={"backend": "openai", "openai": {"base_url": url, "api_key": "wrong"}},
        )
        startup = ModelStartup(settings, engine_to_start(settings), log_failure=False)
        run = asyncio.create_task(startup.run(store))
        done, _ = await asyncio.wait({run}, timeout=3.0)
        message = startup.status.message
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    finally:
        await runner.cleanup()

    assert "start the server" not in message, message  # it is up: it refuses the key
    assert "API_KEY" in message, message
    assert done, f"a 401 is tried again and again: {message}"


async def test_an_unexpected_error_while_loading_ends_in_a_failed_status_not_a_crash(
    store: Store, data_dir: Path, tiny_internvl: Path
) -> None:
    # torch.OutOfMemoryError from model.to("cuda") (outside _load_model's try) is a
    # RuntimeError: neither EngineError nor MemoryError.
    settings = load_settings(
        data_dir=data_dir, engine={"backend": "transformers", "model": str(tiny_internvl)}
    )
    engine = engine_to_start(settings)

    async def out_of_memory(_model: ModelSpec | None = None) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    engine.start = out_of_memory  # type: ignore[method-assign]
    startup = ModelStartup(settings, engine, log_failure=False)

    ready = await startup.run(store)  # not an exception that ends `dishbot run`

    assert not ready
    assert startup.status.phase is Phase.FAILED


async def test_activating_the_base_as_the_page_advises_is_followed_without_a_restart(
    tmp_path: Path,
    hub_offline: None,  # noqa: F811
) -> None:
    settings = load_settings(
        data_dir=tmp_path / "data",
        web={"port": _free_port()},
        training={"follow_interval_s": 0.2},
    )
    from bot.app import App

    store = await App(settings).open_store()
    base = await ensure_base_version(store, settings)
    trained = tmp_path / "runs" / "1" / "model"
    trained.mkdir(parents=True)
    (trained / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"]}))
    await store.add_model_version("run-1", str(trained), parent_id=base.id)
    await activate(store, "run-1")

    async with dishbot_run(settings) as dishbot:
        failed = await dishbot.until_status(lambda status: status["phase"] == "failed")
        await activate(store, "base")  # what the page says to do (or the console's Activate)
        await asyncio.sleep(2.0)
        _, later = await dishbot.get_json("model-status")
    await store.close()

    assert "run-1" in failed["message"]
    # Either the process follows the activation, or the page must say a restart is needed.
    assert "run-1" not in later["message"] or "restart" in later["message"], later["message"]


def test_a_common_word_as_a_password_neither_mangles_the_status_nor_reveals_itself(
    tmp_path: Path,
) -> None:
    # The usual compose file: postgresql://dishbot:dishbot@db/dishbot.
    settings = load_settings(
        data_dir=tmp_path / "data",
        database_url="postgresql+asyncpg://dishbot:dishbot@db:5432/dishbot",
        engine={"backend": "transformers"},
    )
    startup = ModelStartup(settings, engine_to_start(settings), log_failure=False)

    startup.fail(
        "cannot load the model in /models/x; set X to another model, or see `dishbot doctor`"
    )

    shown = startup.status.message
    # Starring out the weak password would both mangle dishbot's words and reveal it.
    assert "`dishbot doctor`" in shown, shown


async def test_a_malformed_hub_id_is_named_not_a_crash(store: Store, data_dir: Path) -> None:
    # A space typed into DISHBOT_ENGINE__MODEL.
    settings = load_settings(
        data_dir=data_dir, engine={"backend": "transformers", "model": "OpenGVLab/InternVL3 1B-hf"}
    )
    startup = ModelStartup(settings, engine_to_start(settings), log_failure=False)

    ready = await startup.run(store)

    assert not ready
    assert "neither a directory here nor a Hugging Face hub id" in startup.status.message
    assert await store.active_model_version() is None  # nothing malformed was kept
