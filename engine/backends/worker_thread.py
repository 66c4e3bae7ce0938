"""One daemon thread that runs calls in order, for backends whose model lives on a thread."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Call = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class WorkerThread(Executor):
    """An executor of one daemon thread: calls run one at a time, in the order submitted.

    Unlike `ThreadPoolExecutor`'s threads, the interpreter does not wait for this one at
    exit: a model load that hangs (a stalled download, a slow disk) cannot keep a process
    that was told to stop from stopping. A thread cannot be cancelled; it is abandoned.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on the thread after every call submitted before it."""
        if self._closed:
            raise RuntimeError("cannot schedule new calls after shutdown")
        future: Future[T] = Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Let the thread end after the calls already submitted; wait for that if ``wait``."""
        self._closed = True
        self._calls.put(None)
        if wait:
            self._thread.join()

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args, kwargs = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as error:
                future.set_exception(error)
            else:
                future.set_result(result)


async def on_own_thread(name: str, call: Callable[[], T]) -> T:
    """``call()``, run on a `WorkerThread` of its own named ``name``: one still running when
    the process is told to stop (a download, an import) is abandoned at exit instead of
    holding the process until it ends."""
    worker = WorkerThread(name)
    try:
        return await asyncio.get_running_loop().run_in_executor(worker, call)
    finally:
        worker.shutdown(wait=False)
