"""Building the engine from the settings: which backend, which model, which limits."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import PurePath

from bot.errors import ConfigError
from bot.settings import EngineSettings, Settings
from engine.backends.base import Backend
from engine.engine import Engine, EngineConfig
from engine.types import ModelSpec

log = logging.getLogger(__name__)


def resolve_backend_name(engine: EngineSettings) -> str:
    """The configured backend; for ``auto``, lmdeploy on a GPU, otherwise transformers."""
    if engine.backend != "auto":
        return engine.backend
    if importlib.util.find_spec("lmdeploy") is not None and _cuda_available():
        return "lmdeploy"
    return "transformers"


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def make_backend(engine: EngineSettings) -> Backend:
    """A backend object for the configured engine (its model is loaded by the Engine)."""
    name = resolve_backend_name(engine)
    if name == "lmdeploy":
        from engine.backends.lmdeploy import LMDeployBackend, LMDeployConfig

        return LMDeployBackend(
            LMDeployConfig(
                engine=engine.lmdeploy_engine,
                max_batch_size=engine.max_batch_size,
                tp=engine.tp,
                session_len=engine.context_tokens,
            )
        )
    if name == "openai":
        from engine.backends.openai import OpenAIBackend, OpenAIConfig

        api_key = engine.openai.api_key
        return OpenAIBackend(
            OpenAIConfig(
                base_url=engine.openai.base_url,
                api_key=api_key.get_secret_value() if api_key else None,
                model=engine.openai.model,
                max_concurrency=engine.max_batch_size,
                request_timeout_s=engine.request_timeout_s,
                stall_timeout_s=engine.openai.stall_timeout_s,
            )
        )
    from engine.backends.transformers import TransformersBackend, TransformersConfig

    return TransformersBackend(
        TransformersConfig(device=engine.device, max_batch_size=engine.max_batch_size)
    )


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's queue limits and generation defaults from the settings."""
    return EngineConfig(
        max_pending=settings.engine.max_queue,
        max_pending_per_key=settings.limits.max_pending_per_user,
        max_tiles=settings.engine.max_tiles,
        max_new_tokens=settings.engine.max_new_tokens,
        request_timeout_s=settings.engine.request_timeout_s,
        load_timeout_s=settings.engine.load_timeout_s,
        decode_time_budget_s=settings.engine.decode_time_budget_s,
        circuit_failures=settings.engine.circuit_failures,
        circuit_reset_s=settings.engine.circuit_reset_s,
        context_tokens=settings.engine.context_tokens,
    )


def configured_model(engine: EngineSettings) -> ModelSpec:
    """The model named in the settings, served with dishbot's system prompt."""
    name = PurePath(engine.model.rstrip("/")).name or engine.model
    return ModelSpec(path=engine.model, name=name)


# Checkpoints known to need InternVL's remote code, which the transformers backend does not run.
REMOTE_CODE_ONLY = frozenset({"OpenGVLab/InternVL2-2B", "OpenGVLab/InternVL2-1B"})
HF_NATIVE_EXAMPLE = "OpenGVLab/InternVL3-1B-hf"


def build_engine(settings: Settings, model: ModelSpec | None = None) -> Engine:
    """An engine (not yet started) for the configured backend and ``model``."""
    spec = model or configured_model(settings.engine)
    if resolve_backend_name(settings.engine) == "transformers" and spec.path in REMOTE_CODE_ONLY:
        raise ConfigError(
            f"the transformers backend (used without lmdeploy and a GPU) cannot run {spec.path}; "
            f"set DISHBOT_ENGINE__MODEL to an HF-native InternVL checkpoint such as "
            f"{HF_NATIVE_EXAMPLE}, or use the lmdeploy or openai backend"
        )
    backend = make_backend(settings.engine)
    log.info("engine: %s backend, model %s", backend.name, spec.path)
    return Engine(backend, spec, engine_config(settings))
