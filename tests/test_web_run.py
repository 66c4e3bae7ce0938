"""`dishbot run` on a fresh machine with no token serves the web console and says where."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pexpect
import pytest

DISHBOT = str(Path(sys.executable).with_name("dishbot"))


def test_run_with_no_token_serves_the_chat_page_and_prints_its_url(
    tiny_internvl: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "DISHBOT_DATA_DIR": str(tmp_path / "data"),
        "DISHBOT_ENGINE__BACKEND": "transformers",
        "DISHBOT_ENGINE__MODEL": str(tiny_internvl),
        "DISHBOT_ENGINE__DEVICE": "cpu",
        "DISHBOT_WEB__PORT": "0",  # any free port: the printed URL says which
    }
    child = pexpect.spawn(DISHBOT, ["run"], env=env, timeout=120, encoding="utf-8")
    try:
        child.expect(r"web console: (http://127\.0\.0\.1:\d+/)")
        url = child.match.group(1)
        with urllib.request.urlopen(url, timeout=10) as page:
            html = page.read().decode()
        readiness = _readiness_once_loaded(url)
        child.kill(signal.SIGTERM)
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)

    assert 'id="photo"' in html
    assert readiness == {"ready": True}
    assert child.exitstatus == 0
    assert "Traceback" not in (child.before or "")


def _readiness_once_loaded(url: str, timeout_s: float = 120.0) -> dict[str, object]:
    """/readyz's body once it is 200: the page is served before the model has loaded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "readyz", timeout=10) as ready:
                return dict(json.loads(ready.read()))
        except urllib.error.HTTPError as not_ready:
            assert not_ready.code == 503
            time.sleep(0.2)
    pytest.fail(f"/readyz was not 200 within {timeout_s:g} s")
