"""The first minutes of `dishbot run` on a fresh machine: how soon the web console is up.

Runs `dishbot run` as a new user would, twice, each with an empty data directory and an empty
Hugging Face cache, the hub switched off:

1. nothing configured: the default model cannot be had here, so the page must say what to
   set. Timed: the console's URL printed, the page served, the reason on the page.
2. a local tiny InternVL configured (built by `tests.tiny_model`): timed as above, then
   `/readyz` turning 200.

Prints each moment in seconds since the process started, and the console's lead over the
model (how many times sooner the page is there than the answer). Run by hand:

    python bench/first_run.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.tiny_model

from tests.tiny_model import build_tiny_internvl  # noqa: E402

WAIT_S = 300.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def _until(condition: object, started: float) -> float:
    deadline = time.monotonic() + WAIT_S
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit("dishbot run never got there")
        time.sleep(0.02)
    return time.monotonic() - started


def run(model: Path | None) -> dict[str, float]:
    """Start `dishbot run` (with ``model``, or nothing configured) and time its first run."""
    home = Path(tempfile.mkdtemp(prefix="dishbot-first-run-"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISHBOT_", "HF_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        HF_HOME=str(home / "hf"),
        DISHBOT_DATA_DIR=str(home / "data"),
        DISHBOT_WEB__PORT=str(port),
    )
    if model is not None:
        env.update(DISHBOT_ENGINE__MODEL=str(model), DISHBOT_ENGINE__DEVICE="cpu")
    url = f"http://127.0.0.1:{port}/"
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "run"],
        env=env,
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    times: dict[str, float] = {}
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "web console:" in line:
                times["URL printed"] = time.monotonic() - started
                break
        times["page served"] = _until(lambda: _get(url)[0] == 200, started)

        def settled() -> bool:
            status = json.loads(_get(url + "model-status")[1])
            return bool(status["ready"] or status["phase"] == "failed")

        settled_at = _until(settled, started)
        ready = _get(url + "readyz")[0] == 200
        times["ready (/readyz 200)" if ready else "reason on the page"] = settled_at
    finally:
        process.terminate()
        process.wait(timeout=60)
    return times


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        tiny = build_tiny_internvl(Path(scratch) / "tiny")
        for label, model in (("nothing configured", None), ("a local tiny model", tiny)):
            times = run(model)
            shown = ", ".join(f"{what} {seconds:.1f} s" for what, seconds in times.items())
            print(f"{label}: {shown}")
            if "ready (/readyz 200)" in times:
                lead = times["ready (/readyz 200)"] / times["page served"]
                print(f"  the page is there {lead:.1f}x sooner than the model answers")


if __name__ == "__main__":
    main()
