"""One HTTP GET with a time limit, for the checks that ask a server whether it answers."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from bot.doctor.runner import NETWORK_TIMEOUT_S


class Unreachable(Exception):
    """The server did not answer at all; the message says why, in a few words."""


@dataclass(frozen=True)
class Answer:
    """A server's answer: its status and its body as JSON (None when it is not JSON)."""

    status: int
    body: Any


async def get_json(
    url: str,
    headers: Mapping[str, str] | None = None,
    *,
    trust_env: bool = False,
    timeout_s: float = NETWORK_TIMEOUT_S,
) -> Answer:
    """GET ``url``; raises `Unreachable` when no answer comes (refused, DNS, TLS, timeout)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, trust_env=trust_env) as session,
            session.get(url, headers=dict(headers or {})) as response,
        ):
            text = await response.text(errors="replace")
            return Answer(response.status, _json(text))
    except TimeoutError:
        raise Unreachable(f"no answer within {timeout_s:g} s") from None
    except aiohttp.InvalidURL:
        raise Unreachable("not a valid URL") from None
    except aiohttp.ClientConnectorError as exc:
        raise Unreachable(_connect_reason(exc)) from None
    except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
        raise Unreachable(f"{type(exc).__name__}: {exc}") from None


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _connect_reason(exc: aiohttp.ClientConnectorError) -> str:
    """ "connection refused" rather than aiohttp's sentence with the socket's address."""
    error = exc.os_error
    # asyncio words a refused connection "Connect call failed (address)"; errno says it plainly.
    reason = os.strerror(error.errno) if error.errno else str(error)
    return f"cannot connect to {exc.host}:{exc.port} ({reason.lower()})"
