"""`dishbot doctor`: checks what `dishbot run` needs and explains each problem with its fix.

One line per check (``ok``, ``warn`` or ``FAIL``); the exit status is 1 when a FAIL line
says `dishbot run` would not start or not answer. See `bot.doctor.checks` for the list.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import TextIO

from bot.doctor.checks import AFTER_SETTINGS, BEFORE_SETTINGS
from bot.doctor.context import Context
from bot.doctor.environment import settings_failed, settings_ok
from bot.doctor.findings import Finding, Status
from bot.doctor.probes import Probes
from bot.doctor.runner import exit_status, run_checks
from bot.errors import ConfigError
from bot.logs import configure_logging
from bot.settings import Settings, load_settings

__all__ = ["Finding", "Probes", "Status", "diagnose"]


def diagnose(
    *,
    probes: Probes | None = None,
    settings: Callable[[], Settings] = load_settings,
    out: TextIO | None = None,
) -> int:
    """Run every check, print the report on ``out`` (stdout); the exit status."""
    return asyncio.run(_diagnose(probes or Probes(), settings, out or sys.stdout))


async def _diagnose(probes: Probes, read_settings: Callable[[], Settings], out: TextIO) -> int:
    context = Context(probes)
    findings = await run_checks(BEFORE_SETTINGS, context, out)
    try:
        settings = read_settings()
    except ConfigError as exc:
        findings.append(settings_failed(str(exc)))
        print(findings[-1].line(), file=out)
        print("\nthe other checks need settings that can be read; fix them first", file=out)
        return exit_status(findings)
    # Only a library's warning reaches the log, and never with a secret in it.
    configure_logging("WARNING", settings.secret_values())
    findings.append(settings_ok())
    print(findings[-1].line(), file=out, flush=True)
    findings += await run_checks(AFTER_SETTINGS, context.with_settings(settings), out)
    print(f"\n{_summary(findings)}", file=out)
    return exit_status(findings)


def _summary(findings: list[Finding]) -> str:
    failed = sum(finding.status is Status.FAIL for finding in findings)
    warned = sum(finding.status is Status.WARN for finding in findings)
    if failed:
        which = "the FAIL line above is" if failed == 1 else f"the {failed} FAIL lines above are"
        return f"`dishbot run` cannot start or answer until {which} fixed"
    if warned:
        return f"`dishbot run` can start; {warned} warning{'s' * (warned > 1)} to look at"
    return "everything `dishbot run` needs is in place"
