"""The web console for operators: /healthz, /readyz and /metrics; its settings."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.cli import main
from bot.core import buttons
from bot.store import Store
from tests.web_console import a_photo, web_console


async def test_readyz_is_false_until_the_model_is_loaded_then_true(
    store: Store, data_dir: Path
) -> None:
    async with web_console(store, data_dir, start_engine=False) as console:
        client = console.visitor().client
        await client.start_server()
        try:
            assert (await client.get("/healthz")).status == 200
            before = await client.get("/readyz")
            assert before.status == 503
            assert (await before.json())["problems"] == {"model": "not loaded"}

            await console.engine.start()

            after = await client.get("/readyz")
            assert after.status == 200
            assert await after.json() == {"ready": True}
        finally:
            await client.close()


async def test_readyz_names_an_unreachable_database_and_a_disconnected_adapter(
    data_dir: Path,
) -> None:
    class DroppedDiscord:
        connected = False
        port = type("Port", (), {"platform": "discord"})()

    nothing_listens = Store.open("postgresql+asyncpg://dishbot@127.0.0.1:9/dishbot", data_dir)
    try:
        async with web_console(nothing_listens, data_dir, peers=(DroppedDiscord(),)) as console:
            client = console.visitor().client
            await client.start_server()
            try:
                response = await client.get("/readyz")
                problems = (await response.json())["problems"]
            finally:
                await client.close()
    finally:
        await nothing_listens.close()
    assert response.status == 503
    assert problems["database"].startswith("unreachable")
    assert problems["discord"] == "not connected"
    assert "model" not in problems


def _figures(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    figures = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            figures[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return figures


async def test_metrics_move_as_questions_are_answered_rated_and_corrected(
    store: Store, data_dir: Path
) -> None:
    async with web_console(store, data_dir) as console, console.visitor() as visitor:
        scrape = visitor.client.get
        before = _figures(await (await scrape("/metrics")).text())
        await visitor.open_page()
        await visitor.listen()
        assert (await visitor.ask("what is this?", a_photo())).status == 202
        answer = await visitor.answer()
        await visitor.press(answer["id"], buttons.encode(buttons.Rate(_exchange(answer), 1)))
        await visitor.next_update("notice")
        assert (await visitor.correct(_exchange(answer), "char siu")).status == 202
        assert "char siu" in await visitor.bot_says(besides=answer["id"])  # the thanks
        response = await scrape("/metrics")
        after = _figures(await response.text())

    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert ("dishbot_answers_total", (("outcome", "answered"),)) not in before
    assert after[("dishbot_answers_total", (("outcome", "answered"),))] == 1
    for histogram in (
        "dishbot_request_queue_time_seconds",
        "dishbot_time_to_first_token_seconds",
        "dishbot_e2e_request_latency_seconds",
    ):
        assert before[(histogram + "_count", ())] == 0
        assert after[(histogram + "_count", ())] == 1
    assert after[("dishbot_generation_tokens_total", ())] > 0
    assert after[("dishbot_ratings_total", (("rating", "up"),))] == 1
    assert after[("dishbot_corrections_total", ())] == 1
    assert after[("dishbot_num_requests_waiting", ())] == 0
    assert after[("dishbot_num_requests_running", ())] == 0
    assert after[("dishbot_circuit_state", (("state", "closed"),))] == 1
    assert after[("dishbot_training_runs", (("state", "training"),))] == 0
    assert ("dishbot_model_version_info", (("role", "served"), ("version", "scripted-model"))) in (
        after
    )


def _exchange(answer: dict[str, object]) -> int:
    rate = buttons.decode(str(answer["buttons"][0]["data"]))  # type: ignore[index]
    assert isinstance(rate, buttons.Rate)
    return rate.exchange_id


def test_config_shows_the_web_settings_but_not_the_admin_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISHBOT_WEB__ADMIN_PASSWORD", "web-admin-secret")
    monkeypatch.setenv("DISHBOT_WEB__PORT", "9090")

    assert main(["config"]) == 0

    out = capsys.readouterr().out
    assert "web-admin-secret" not in out
    assert "9090" in out
    assert "127.0.0.1" in out


async def test_a_taken_port_stops_a_console_alone_but_not_the_chat_bots(
    store: Store, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from bot.adapters.web import WebAdapter
    from bot.adapters.web.server import WebConsoleUnavailable
    from bot.core.dialog import Dialog
    from bot.metrics import Metrics
    from bot.settings import Settings
    from engine.engine import Engine
    from engine.types import ModelSpec
    from tests.scripted_backend import ScriptedBackend

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = Settings(data_dir=data_dir, web={"port": taken.getsockname()[1]})
        dialog = Dialog(store, Engine(ScriptedBackend(), ModelSpec("scripted", "scripted")))
        alone = WebAdapter(settings, dialog, Metrics())
        beside_telegram = WebAdapter(settings, dialog, Metrics(), peers=(object(),))

        with pytest.raises(WebConsoleUnavailable, match=r"cannot listen on 127\.0\.0\.1:\d+"):
            await alone.start()
        await beside_telegram.start()
        await beside_telegram.stop()

    assert beside_telegram.url is None
    assert "serving the chat platforms without it" in caplog.text
