"""`dishbot run` stops promptly and cleanly when told to stop while it is still starting."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

DISHBOT = str(Path(sys.executable).with_name("dishbot"))
GUARD_S = 30.0  # how long the test waits for the bot; a guard against hangs, not a measurement
PROMPT_STOP_S = 5.0  # "promptly": well within a few seconds, against a 10-minute load timeout


class SilentServer:
    """A TCP server that accepts connections and never answers: a model server that hangs."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.connected = threading.Event()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            self._held.append(connection)
            self.connected.set()

    def close(self) -> None:
        for connection in self._held:
            connection.close()
        self._socket.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


def test_sigterm_while_the_model_loads_stops_promptly_and_cleanly(
    silent_server: SilentServer, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "DISHBOT_DATA_DIR": str(tmp_path / "data"),
        "DISHBOT_TELEGRAM__TOKEN": "123456:never-used-while-starting",
        "DISHBOT_TELEGRAM__BASE_URL": f"http://127.0.0.1:{silent_server.port}/bot",
        "DISHBOT_ENGINE__BACKEND": "openai",
        "DISHBOT_ENGINE__OPENAI__BASE_URL": f"http://127.0.0.1:{silent_server.port}/v1",
        "DISHBOT_ENGINE__LOAD_TIMEOUT_S": "600",
        "DISHBOT_LOG_LEVEL": "INFO",
    }
    process = subprocess.Popen(
        [DISHBOT, "run"], env=env, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        assert silent_server.connected.wait(GUARD_S), "dishbot never asked for its model"
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=PROMPT_STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"dishbot was still starting {PROMPT_STOP_S} s after SIGTERM")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0, stderr
    assert "stopped during start-up" in stderr
    assert "Traceback" not in stderr


def test_sigterm_while_a_model_downloads_in_a_thread_stops_promptly_and_cleanly(
    silent_server: SilentServer, tmp_path: Path
) -> None:
    # The transformers backend loads in a worker thread, which cannot be cancelled: here it
    # waits on a model hub that never answers, as on a slow download of a large checkpoint.
    env = {
        **os.environ,
        "DISHBOT_DATA_DIR": str(tmp_path / "data"),
        "DISHBOT_TELEGRAM__TOKEN": "123456:never-used-while-starting",
        "DISHBOT_ENGINE__BACKEND": "transformers",
        "DISHBOT_ENGINE__DEVICE": "cpu",
        "DISHBOT_ENGINE__MODEL": "OpenGVLab/InternVL3-1B-hf",
        "DISHBOT_LOG_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": f"http://127.0.0.1:{silent_server.port}",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_ETAG_TIMEOUT": "600",
        "HF_HUB_DOWNLOAD_TIMEOUT": "600",
    }
    process = subprocess.Popen(
        [DISHBOT, "run"], env=env, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        assert silent_server.connected.wait(GUARD_S), "dishbot never asked for its model"
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=PROMPT_STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"dishbot was still starting {PROMPT_STOP_S} s after SIGTERM")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0, stderr
    assert "stopped during start-up" in stderr
    assert "Traceback" not in stderr
