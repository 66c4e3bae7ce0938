"""This machine: free disk space for the data and the model, the web console's port."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from bot.doctor.context import Context
from bot.doctor.findings import Finding, fail, ok, warn, with_fix
from bot.doctor.probes import GIB, nearest_existing

# Below this, SQLite writes and photo uploads start failing.
DISK_FAIL_BYTES = 1 * GIB
# Below this, a model download (2-5 GB) and a retraining run's checkpoints may not fit.
DISK_WARN_BYTES = 10 * GIB


def model_cache() -> Path | None:
    """Where the hub's models are downloaded to (HF_HUB_CACHE / HF_HOME apply)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return Path(constants.HF_HUB_CACHE)


async def check_disk(context: Context) -> Finding:
    """The disk line: the space left where the data (and the downloaded model) go."""
    places = [(context.settings.data_dir, "data_dir")]
    cache = model_cache()
    if cache is not None and _device(cache) != _device(context.settings.data_dir):
        places.append((cache, "model downloads"))
    shown = []
    least = None
    for path, role in places:
        free = context.probes.disk(nearest_existing(path)).free_bytes
        shown.append(f"{free / GIB:.1f} GiB free under {path.absolute()} ({role})")
        least = free if least is None else min(least, free)
    line = "; ".join(shown)
    assert least is not None
    if least < DISK_FAIL_BYTES:
        return fail("disk", with_fix(line, "free some space, or set DISHBOT_DATA_DIR elsewhere"))
    if least < DISK_WARN_BYTES:
        return warn(
            "disk",
            with_fix(
                f"{line}: a model download or a retraining run may not fit",
                "free some space, or set DISHBOT_DATA_DIR (and HF_HOME) elsewhere",
            ),
        )
    return ok("disk", line)


def _device(path: Path) -> int:
    return os.stat(nearest_existing(path)).st_dev


async def check_web(context: Context) -> Finding:
    """The web console's address can be listened on."""
    web = context.settings.web
    if not web.enabled:
        return ok("web", "off (web.enabled = false)")
    if web.port == 0:
        return ok("web", f"{web.listen}, any free port (web.port = 0)")
    where = f"{web.listen}:{web.port}"
    problem = _bind_problem(web.listen, web.port)
    if problem is not None:
        return fail(
            "web",
            with_fix(
                f"cannot listen on {where}: {problem}",
                "stop what uses it, or set DISHBOT_WEB__PORT to a free port (0: any)",
            ),
        )
    shown = "127.0.0.1" if web.listen in ("0.0.0.0", "::", "") else web.listen
    return ok("web", f"{where} is free: the console will be at http://{shown}:{web.port}/")


def _bind_problem(host: str, port: int) -> str | None:
    """Why binding ``host:port`` fails now (as aiohttp binds: address reuse on), or None."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"{host} is not an address of this machine ({exc.strerror})"
    for family, kind, proto, _name, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                return (exc.strerror or str(exc)).lower()
    return None
