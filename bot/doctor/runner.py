"""Running the doctor's checks: each guarded, each with a time limit, reported in order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from bot.doctor.context import Context
from bot.doctor.findings import Finding, Status, fail

# A probe that talks to a server: long enough for a slow network, short enough to wait for.
NETWORK_TIMEOUT_S = 10.0
# A probe that starts Python and imports something heavy (lmdeploy, XTuner and torch).
IMPORT_TIMEOUT_S = 60.0
# Anything else: files, sockets, a local database.
LOCAL_TIMEOUT_S = 30.0

Probe = Callable[[Context], Awaitable[Finding]]


@dataclass(frozen=True)
class Check:
    """One line of the report: its name, how to find it out, and how long that may take."""

    name: str
    probe: Probe
    timeout_s: float = LOCAL_TIMEOUT_S


async def run_checks(checks: Sequence[Check], context: Context, out: TextIO) -> list[Finding]:
    """Run ``checks`` side by side; print each line in order as soon as it and those before
    it are done. A check that crashes or overruns is a FAIL line, never a traceback."""
    tasks = [asyncio.ensure_future(_guarded(check, context)) for check in checks]
    findings: list[Finding] = []
    try:
        for task in tasks:
            finding = await task
            findings.append(finding)
            print(context.scrub(finding.line()), file=out, flush=True)
    finally:
        for task in tasks:
            task.cancel()
    return findings


async def _guarded(check: Check, context: Context) -> Finding:
    try:
        return await asyncio.wait_for(check.probe(context), check.timeout_s)
    except TimeoutError:
        return fail(check.name, f"no answer within {check.timeout_s:g} s: the check gave up")
    except Exception as exc:
        return fail(check.name, f"the check itself failed: {type(exc).__name__}: {exc}")


def exit_status(findings: Sequence[Finding]) -> int:
    """1 when something would stop `dishbot run` from starting or answering, else 0."""
    return 1 if any(finding.status is Status.FAIL for finding in findings) else 0
