"""Blocking probes (imports, drivers, child processes) run so that none can hang the doctor."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


async def in_thread(function: Callable[[], T]) -> T:
    """``function()`` in a daemon thread: a probe that hangs (a driver, an import) is given up
    on at its check's time limit and cannot keep the doctor from exiting."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # the check gave up on it already
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = function()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the doctor has finished meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name="doctor-probe", daemon=True).start()
    return await future


def run_command(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to its end (killed after ``timeout_s``: `subprocess.TimeoutExpired`)."""
    return subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        check=False,
    )
