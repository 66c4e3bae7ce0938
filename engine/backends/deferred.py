"""A backend built at its first load, off the event loop, for backends whose libraries take
seconds to import (torch, transformers): whatever else the process serves starts at once."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence

from engine.backends.base import Backend
from engine.backends.worker_thread import on_own_thread
from engine.types import BackendEvent, GenerationJob, ModelSpec


class DeferredBackend:
    """Stands in for the backend ``build`` makes, which it makes when a model is first loaded.

    ``capacity`` and ``max_batches`` must be the built backend's (the scheduler reads them
    before it exists). ``build`` raises `ModelLoadFailed` when the backend cannot run here
    (its library is missing); that load fails with its words, and the next load tries again.
    """

    def __init__(
        self, name: str, capacity: int, max_batches: int, build: Callable[[], Backend]
    ) -> None:
        self.name = name
        self._capacity = capacity
        self._max_batches = max_batches
        self._build = build
        self._backend: Backend | None = None

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_batches(self) -> int:
        return self._max_batches

    async def load(self, model: ModelSpec) -> None:
        """Build the backend (importing its libraries on a daemon thread, so a stop during
        the import is not held up by it), then load ``model`` with it."""
        if self._backend is None:
            self._backend = await on_own_thread(f"{self.name}-import", self._build)
        await self._backend.load(model)

    def generate(self, jobs: Sequence[GenerationJob]) -> AsyncGenerator[BackendEvent, None]:
        """The built backend's answers (the engine generates only after a load)."""
        assert self._backend is not None, "generate before load"
        return self._backend.generate(jobs)

    async def close(self) -> None:
        """Free the built backend's model, if there is one."""
        if self._backend is not None:
            await self._backend.close()
