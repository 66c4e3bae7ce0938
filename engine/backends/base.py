"""The one protocol every backend implements."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

from engine.types import BackendEvent, GenerationJob, ModelSpec


class Backend(Protocol):
    """Generates answers for batches of jobs; the scheduler decides what runs when.

    * ``capacity``: how many jobs may be generating at once, over all batches
      (lmdeploy's ``max_batch_size``; the transformers batch size; an HTTP server's
      concurrency). The scheduler never exceeds it.
    * ``max_batches``: how many `generate` calls may run at once. A continuous-batching
      engine (lmdeploy, a remote server) takes jobs one by one as slots free up, so this
      equals ``capacity``; static batching (transformers) runs one batch at a time: 1.
    """

    name: str

    @property
    def capacity(self) -> int: ...

    @property
    def max_batches(self) -> int: ...

    async def load(self, model: ModelSpec) -> None:
        """Load ``model`` (replacing any loaded one); raise `ModelLoadFailed` if it cannot."""
        ...

    def generate(self, jobs: Sequence[GenerationJob]) -> AsyncGenerator[BackendEvent, None]:
        """Generate answers for ``jobs``, streaming text as it comes.

        Yields `JobDelta` events and, for every job, exactly one `JobFinished` or
        `JobFailed`. A job that fails, whatever its inputs, must not fail the others: its
        users' answers do not depend on who else was asking. CPU- or GPU-bound work runs
        off the event loop.
        """
        ...

    async def close(self) -> None:
        """Release the model and its memory (GPU memory included)."""
        ...
