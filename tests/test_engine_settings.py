"""The circuit breaker's, the stall timeout's and the context's settings reach the engine."""

from __future__ import annotations

import json

import pytest

from bot.cli import main
from bot.engine_setup import engine_config, make_backend
from bot.settings import Settings
from engine.backends.lmdeploy import LMDeployBackend
from engine.backends.openai import OpenAIBackend


def test_the_circuit_and_context_settings_reach_the_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DISHBOT_ENGINE__CIRCUIT_FAILURES", "3")
    monkeypatch.setenv("DISHBOT_ENGINE__CIRCUIT_RESET_S", "12.5")
    monkeypatch.setenv("DISHBOT_ENGINE__CONTEXT_TOKENS", "4096")

    config = engine_config(Settings())

    assert config.circuit_failures == 3
    assert config.circuit_reset_s == 12.5
    assert config.context_tokens == 4096


def test_the_defaults_fail_fast_well_before_the_request_timeout() -> None:
    engine = Settings().engine

    assert engine.circuit_failures == 5
    assert engine.circuit_reset_s == 30.0
    assert engine.context_tokens == 8192
    assert engine.openai.stall_timeout_s < engine.request_timeout_s


def test_the_stall_timeout_reaches_the_openai_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISHBOT_ENGINE__BACKEND", "openai")
    monkeypatch.setenv("DISHBOT_ENGINE__OPENAI__STALL_TIMEOUT_S", "7")

    backend = make_backend(Settings().engine)

    assert isinstance(backend, OpenAIBackend)
    assert backend._config.stall_timeout_s == 7.0


def test_lmdeploy_sessions_are_as_long_as_the_context_the_engine_trims_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DISHBOT_ENGINE__BACKEND", "lmdeploy")
    monkeypatch.setenv("DISHBOT_ENGINE__CONTEXT_TOKENS", "16384")

    backend = make_backend(Settings().engine)

    assert isinstance(backend, LMDeployBackend)
    assert backend.config.session_len == 16384


def test_dishbot_config_shows_the_new_engine_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 0

    engine = json.loads(capsys.readouterr().out)["engine"]
    assert engine["circuit_failures"] == 5
    assert engine["circuit_reset_s"] == 30.0
    assert engine["context_tokens"] == 8192
    assert engine["openai"]["stall_timeout_s"] == 30.0
