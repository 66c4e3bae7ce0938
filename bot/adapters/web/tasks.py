"""The dialog calls the web console has running in the background: at most so many at once.

Each POST hands the dialog a call that runs on after the response (an answer streams to the
page later). Each holds what the visitor sent, a photo perhaps, so their number is capped:
`full` says when no more may start, and the chat routes refuse the request then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


class TasksInHand:
    """Background dialog calls, at most ``limit`` at once, finished (for a while) at stop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running: set[asyncio.Future[None]] = set()

    def __len__(self) -> int:
        return len(self._running)

    @property
    def full(self) -> bool:
        """Whether no more calls may start now."""
        return len(self._running) >= self.limit

    def start(self, call: Awaitable[None]) -> None:
        """Run ``call`` in the background, tracked (check `full` first)."""
        task = asyncio.ensure_future(call)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def finish(self, grace_s: float) -> None:
        """Let the calls in progress finish for up to ``grace_s``, then cancel the rest."""
        if not self._running:
            return
        _, late = await asyncio.wait(set(self._running), timeout=grace_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
