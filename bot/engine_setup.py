"""Building the engine from the settings: which backend, which model, which limits."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import PurePath

from bot.model_source import ModelUnobtainable, format_problem, model_for
from bot.settings import EngineSettings, Settings
from engine.backends.base import Backend
from engine.backends.deferred import DeferredBackend
from engine.engine import Engine, EngineConfig
from engine.errors import ModelLoadFailed
from engine.types import ModelSpec

log = logging.getLogger(__name__)


def resolve_backend_name(engine: EngineSettings) -> str:
    """The configured backend; for ``auto``, lmdeploy on a GPU, otherwise transformers."""
    if engine.backend != "auto":
        return engine.backend
    if importlib.util.find_spec("lmdeploy") is not None and cuda_available():
        return "lmdeploy"
    return "transformers"


def cuda_available() -> bool:
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


def configured_model_path(settings: Settings) -> str:
    """The model named in the settings, or the default of the backend that serves; for the
    openai backend with none named, its URL (the server then answers with its first model)."""
    engine = settings.engine
    return model_for(engine, resolve_backend_name(engine)) or engine.openai.base_url


def configured_model(settings: Settings) -> ModelSpec:
    """The configured model, served with dishbot's system prompt."""
    return spec_for(configured_model_path(settings))


def spec_for(path: str) -> ModelSpec:
    """A model at ``path`` (a directory or hub id), served with dishbot's system prompt."""
    name = PurePath(path.rstrip("/")).name or path
    return ModelSpec(path=path, name=name)


def check_format(settings: Settings, model: str) -> None:
    """Raise `ModelUnobtainable` when ``model`` is known to be in a format the configured
    backend cannot run."""
    backend = resolve_backend_name(settings.engine)
    problem = format_problem(backend, model, settings.engine.lmdeploy_engine)
    if problem is not None:
        raise ModelUnobtainable(problem)


def engine_to_start(settings: Settings) -> Engine:
    """An engine for the configured backend whose model is chosen and loaded later
    (`Engine.start`). A backend whose libraries take seconds to import (transformers: torch)
    is built at that first load, off the event loop, so the web console is up at once; when
    the library is missing, that load says which extra to install."""
    engine = settings.engine
    name = resolve_backend_name(engine)
    if name != "transformers":
        return Engine(make_backend(engine), configured_model(settings), engine_config(settings))

    def build() -> Backend:
        try:
            return make_backend(engine)
        except ImportError as exc:
            raise ModelLoadFailed(
                f"the transformers backend cannot run here ({exc.name or exc} is not "
                'installed): install it with pip install "dishbot[cpu]", or set '
                "DISHBOT_ENGINE__BACKEND"
            ) from None

    backend = DeferredBackend(name, engine.max_batch_size, 1, build)
    return Engine(backend, configured_model(settings), engine_config(settings))


def build_engine(settings: Settings, model: ModelSpec | None = None) -> Engine:
    """An engine (not yet started) for the configured backend and ``model``.

    Raises `ModelUnobtainable` when the model is known to be in the wrong format for it.
    """
    spec = model or configured_model(settings)
    check_format(settings, spec.path)
    backend = make_backend(settings.engine)
    log.info("engine: %s backend, model %s", backend.name, spec.path)
    return Engine(backend, spec, engine_config(settings))
