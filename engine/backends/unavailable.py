"""A backend that could not be built here (its library is missing): every load says why."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

from engine.errors import ModelLoadFailed
from engine.types import BackendEvent, GenerationJob, ModelSpec


class UnavailableBackend:
    """Stands in for a backend that cannot run, so the rest of the app can still start and
    show ``reason`` (say, "torch is not installed: ...") where the model's state is shown."""

    capacity = 1
    max_batches = 1

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    async def load(self, model: ModelSpec) -> None:
        """Always fails, with the reason the backend cannot run."""
        raise ModelLoadFailed(self.reason)

    async def generate(self, jobs: Sequence[GenerationJob]) -> AsyncGenerator[BackendEvent, None]:
        """Never called: the engine generates only with a loaded model."""
        raise ModelLoadFailed(self.reason)
        yield  # pragma: no cover - makes this an async generator

    async def close(self) -> None:
        """Nothing to free."""
