"""Running a trainer's subprocess: its own process group, output to a log, stoppable.

Training starts helper processes (data loader workers, DeepSpeed launchers); killing only
the one we started would leave them running, holding GPU memory. So each command runs as
the leader of a new session, and stopping it signals the whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0  # after SIGTERM, how long the group has before SIGKILL
LOG_TAIL_LINES = 20


async def run_logged(
    command: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    on_start: Callable[[int], None] | None = None,
    poll: Callable[[], None] | None = None,
    poll_interval_s: float = 1.0,
    stop_grace_s: float = STOP_GRACE_S,
) -> int:
    """Run ``command`` in a new process group with its output appended to ``log_path``, and
    return its exit status.

    ``on_start`` gets the process id (= the group id) as soon as it runs, for a supervisor to
    record; ``poll`` is called every ``poll_interval_s`` while it runs (to read progress).
    Cancelling stops the whole group (SIGTERM, then SIGKILL after ``stop_grace_s``) before
    the cancellation goes on.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    if on_start is not None:
        on_start(process.pid)
    try:
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(process.wait()), poll_interval_s)
            except TimeoutError:
                if poll is not None:
                    poll()
    except BaseException:
        await stop_group(process.pid, stop_grace_s)
        with contextlib.suppress(Exception):
            await process.wait()
        raise
    finally:
        if poll is not None:
            with contextlib.suppress(Exception):
                poll()


async def stop_group(group: int, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM process group ``group``, then SIGKILL what is left of it after ``grace_s``."""
    if not _signal_group(group, signal.SIGTERM):
        return
    deadline = asyncio.get_running_loop().time() + grace_s
    while asyncio.get_running_loop().time() < deadline:
        if not group_alive(group):
            return
        await asyncio.sleep(0.05)
    log.warning("process group %d ignored SIGTERM for %.0f s: killing it", group, grace_s)
    _signal_group(group, signal.SIGKILL)


def group_alive(group: int) -> bool:
    """Whether any process of group ``group`` still runs."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(group: int, signal_number: int) -> bool:
    try:
        os.killpg(group, signal_number)
    except ProcessLookupError:
        return False
    return True


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log ("" when there is none)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
