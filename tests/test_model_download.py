"""`dishbot run` on a fresh machine fetches its model from the hub while the web console serves.

The hub is the emulator in tests/hub_emulator.py serving the tiny InternVL as a repo; dishbot
runs as a real process in a pseudo-terminal, with an empty HF_HOME, as an operator starts it.
A download is held at a point in the weights (the emulator sends nothing past it until
released), so what the terminal and the page say mid-download is seen without racing it.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pexpect
import pytest

from tests.factories import jpeg_bytes
from tests.hub_emulator import HubEmulator, running_hub

REPO_ID = "tiny/InternVL-tiny-hf"
MODEL_VARIABLE = "DISHBOT_ENGINE__MODEL"
ROOT = Path(__file__).resolve().parents[1]  # the checkout under test, for the child's imports
# Slow enough that the download takes a while, as a real one does (the hold makes it certain).
THROTTLE_BYTES_PER_S = 2 * 1024 * 1024
WAIT_S = 120.0  # a safety net for a broken run, not a timing claim
STOP_WITHIN_S = 10.0  # what `docker stop` allows before it kills
PROGRESS = re.compile(r"downloading the model \S+, (\d+)% of ([\d.]+) ([kKMG]?B)")
UNITS = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}


@pytest.fixture
def hub(tiny_internvl: Path) -> Iterator[HubEmulator]:
    with running_hub(throttle_bytes_per_s=THROTTLE_BYTES_PER_S) as hub:
        hub.add_repo(REPO_ID, tiny_internvl)
        yield hub


class DishbotRun:
    """`dishbot run` in a pseudo-terminal; everything it prints is kept in `output`."""

    def __init__(self, hub: HubEmulator, home: Path, model: str = REPO_ID, **env: str) -> None:
        variables = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("HF_", "DISHBOT_")) and name != "TRANSFORMERS_OFFLINE"
        }
        variables.update(
            PYTHONPATH=str(ROOT),
            DISHBOT_DATA_DIR=str(home / "data"),
            DISHBOT_ENGINE__BACKEND="transformers",
            DISHBOT_ENGINE__DEVICE="cpu",
            DISHBOT_WEB__PORT="0",  # any free port: the printed URL says which
            HF_ENDPOINT=hub.url,
            HF_HOME=str(home / "hf"),
            HF_HUB_DISABLE_TELEMETRY="1",
            **{MODEL_VARIABLE: model},
            **env,
        )
        self.transcript = io.StringIO()
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "bot.cli", "run"],
            env=variables,
            timeout=WAIT_S,
            encoding="utf-8",
        )
        self.child.logfile_read = self.transcript
        self.child.expect(r"web console: (http://127\.0\.0\.1:\d+/)")
        self.url: str = self.child.match.group(1)

    @property
    def output(self) -> str:
        self._drain()
        return self.transcript.getvalue()

    def _drain(self) -> None:
        """Read what it printed so far (a full terminal would stop it)."""
        if self.child.closed:
            return
        try:
            while True:
                self.child.read_nonblocking(64 * 1024, timeout=0)
        except (pexpect.TIMEOUT, pexpect.EOF):
            pass

    def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait for ``condition``, reading the terminal meanwhile; fail saying ``what``."""
        deadline = time.monotonic() + WAIT_S
        while not condition():
            if time.monotonic() > deadline or not self.child.isalive():
                pytest.fail(f"{what} never happened; dishbot printed:\n{self.output[-3000:]}")
            self._drain()
            time.sleep(0.1)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as refused:
            return refused.code, refused.read().decode()

    def model_status(self) -> dict[str, Any]:
        status, body = self.get("model-status")
        assert status == 200
        return dict(json.loads(body))

    def ready(self) -> bool:
        return self.get("readyz")[0] == 200

    def stop(self) -> int:
        """SIGTERM, as Ctrl-C or a service manager stops it; its exit status."""
        self._drain()
        self.child.kill(signal.SIGTERM)
        self.child.expect(pexpect.EOF)
        self.child.close()
        return int(self.child.exitstatus)

    def kill(self) -> None:
        """SIGKILL: a power cut, as far as the download is concerned."""
        if self.child.closed:
            return
        self._drain()
        if self.child.isalive():
            self.child.kill(signal.SIGKILL)
        self.child.close(force=True)


def held_in_the_weights(hub: HubEmulator) -> None:
    weights = hub.repos[REPO_ID].files["model.safetensors"]
    hub.hold(after_bytes=weights.size // 2, filename="model.safetensors")


def blob_of(home: Path, hub: HubEmulator, filename: str) -> Path:
    etag = hub.repos[REPO_ID].files[filename].etag
    return home / "hf" / "hub" / "models--tiny--InternVL-tiny-hf" / "blobs" / etag


async def ask_through_the_page(url: str, question: str) -> str:
    """Open the chat page as a browser does, ask about a photo, and wait for the answer."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with session.get(url) as page:
            html = await page.text()
        page_data = re.search(r'id="page-data">(.*?)</script>', html, re.S)
        assert page_data is not None
        csrf = json.loads(page_data.group(1))["csrf"]
        async with session.get(url + "events") as events:
            form = aiohttp.FormData(default_to_multipart=True)
            form.add_field("photo", jpeg_bytes((200, 80, 40), size=(320, 240)), filename="dish.jpg")
            form.add_field("question", question)
            async with session.post(url + "ask", data=form, headers={"X-CSRF-Token": csrf}) as ask:
                assert ask.status == 202
            async with asyncio.timeout(WAIT_S):
                async for line in events.content:
                    if not line.startswith(b"data: "):
                        continue
                    update = json.loads(line[len(b"data: ") :])
                    is_bot = update["kind"] == "message" and update["author"] == "bot"
                    if is_bot and update["buttons"]:  # an answer comes with rating buttons
                        return str(update["text"])
    raise AssertionError("the answer stream ended without an answer")


def test_a_fresh_machine_downloads_the_model_with_progress_then_answers(
    hub: HubEmulator, tmp_path: Path
) -> None:
    repo = hub.repos[REPO_ID]
    held_in_the_weights(hub)
    run = DishbotRun(hub, tmp_path)
    try:
        run.until(lambda: hub.downloads_held > 0, "the download reaching the weights")
        run.until(lambda: run.model_status()["phase"] == "downloading", "phase downloading")
        midway = run.model_status()
        page = run.get("")[1]
        readiness = run.get("readyz")
        hub.release()
        run.until(run.ready, "/readyz turning 200")
        until_ready = run.output
        answer = asyncio.run(ask_through_the_page(run.url, "what dish is this?"))
        exit_status = run.stop()
    finally:
        run.kill()

    assert midway["ready"] is False
    assert midway["total_bytes"] == repo.size
    assert 0 <= midway["done_bytes"] < midway["total_bytes"]
    assert "downloading the model" in midway["message"]
    status_element = re.search(r'id="model-status".*?</div>', page, re.S)
    assert status_element is not None
    assert "downloading the model" in status_element.group(0)
    assert readiness[0] == 503
    assert json.loads(readiness[1]) == {"ready": False, "problems": {"model": midway["message"]}}
    progress = PROGRESS.findall(until_ready)
    assert progress, "the terminal showed no download progress"
    assert any(int(percent) < 100 for percent, _, _ in progress)
    assert answer.strip()
    assert exit_status == 0
    assert "Traceback" not in until_ready, until_ready[until_ready.find("Traceback") - 300 :]


def test_a_download_killed_midway_goes_on_from_what_it_had_when_run_again(
    hub: HubEmulator, tmp_path: Path
) -> None:
    repo = hub.repos[REPO_ID]
    finished_first = [name for name in repo.files if name != "model.safetensors"]
    held_in_the_weights(hub)
    first = DishbotRun(hub, tmp_path)
    try:
        first.until(lambda: hub.downloads_held > 0, "the download reaching the weights")
        first.until(
            lambda: all(blob_of(tmp_path, hub, name).is_file() for name in finished_first),
            "the small files landing in the cache",
        )
    finally:
        first.kill()
    hub.release()
    hub.reset_counts()

    second = DishbotRun(hub, tmp_path)
    try:
        second.until(second.ready, "/readyz turning 200 after the restart")
        second_served = hub.bytes_served
        refetched = sorted({str(get.filename) for get in hub.file_gets()})
    finally:
        second.kill()

    assert second_served < repo.size
    assert refetched == ["model.safetensors"]


def test_an_unknown_repo_says_so_names_the_setting_and_stays_up(
    hub: HubEmulator, tmp_path: Path
) -> None:
    run = DishbotRun(hub, tmp_path, model="nobody/no-such-model")
    try:
        run.until(lambda: run.model_status()["phase"] == "failed", "phase failed")
        status = run.model_status()
        page = run.get("")[1]
        readiness = run.get("readyz")
        run.until(lambda: MODEL_VARIABLE in run.output, "the log naming the setting")
        still_up = run.child.isalive() and run.get("healthz")[0] == 200
        exit_status = run.stop()
    finally:
        run.kill()

    assert status["ready"] is False
    assert "nobody/no-such-model" in status["message"]
    assert MODEL_VARIABLE in status["message"]
    status_element = re.search(r'id="model-status".*?</div>', page, re.S)
    assert status_element is not None
    assert MODEL_VARIABLE in status_element.group(0)
    assert readiness[0] == 503
    assert json.loads(readiness[1])["problems"]["model"] == status["message"]
    log_lines = [line for line in run.output.splitlines() if MODEL_VARIABLE in line]
    assert any("nobody/no-such-model" in line for line in log_lines)
    assert still_up
    assert exit_status == 0
    assert hub.file_gets() == []


def test_the_download_progress_shows_a_small_model_s_size_in_a_unit_that_shows_it() -> None:
    from bot.model_source import DownloadProgress
    from bot.model_startup import downloading_message

    total = 2_151_721
    message = downloading_message(REPO_ID, DownloadProgress(1_000_000, total))

    shown = PROGRESS.search(message)
    assert shown is not None, message
    size = float(shown.group(2)) * UNITS[shown.group(3)]
    assert 0.9 * total <= size <= 1.1 * total, message


def test_a_model_finished_after_a_killed_download_is_found_in_the_cache_offline(
    hub: HubEmulator, tmp_path: Path
) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("HF_")}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    download = [
        sys.executable,
        "-c",
        f"import huggingface_hub as h; h.snapshot_download({REPO_ID!r})",
    ]
    online = {**env, "HF_ENDPOINT": hub.url}
    held_in_the_weights(hub)
    killed = subprocess.Popen(download, env=online, stderr=subprocess.DEVNULL)
    try:
        hub.wait_until_held()
    finally:
        killed.kill()
        killed.wait()
    hub.release()
    subprocess.run(download, env=online, stderr=subprocess.DEVNULL, check=True, timeout=WAIT_S)

    found = subprocess.run(
        [sys.executable, "-c", f"from bot.model_source import locate; print(locate({REPO_ID!r}))"],
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=True,
        timeout=WAIT_S,
    )

    assert found.stdout.strip().endswith(f"snapshots/{hub.repos[REPO_ID].sha}"), found.stdout


BIG_REPO_ID = "tiny/big"
# The big model's weights are downloaded resumably, and one stopped past this many bytes has
# them on disk whoever writes it (huggingface_hub writes 10 MiB at a time).
WRITTEN_CHUNK = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo with a weights file big enough to download resumably (nothing loads it)."""
    model = tmp_path_factory.mktemp("big-model")
    (model / "config.json").write_text('{"architectures": ["InternVLForConditionalGeneration"]}')
    (model / "model.safetensors").write_bytes(random.Random(15).randbytes(12 * 1024 * 1024))
    return model


class FetchProcess:
    """dishbot's model fetch, as `dishbot run` calls it, in a process of its own."""

    def __init__(self, hub: HubEmulator, hf_home: Path, **env: str) -> None:
        self.env = {name: value for name, value in os.environ.items() if not name.startswith("HF_")}
        self.env.update(
            PYTHONPATH=str(ROOT),
            HF_HOME=str(hf_home),
            HF_ENDPOINT=hub.url,
            HF_HUB_DISABLE_TELEMETRY="1",
            **env,
        )
        code = f"from bot.model_source import fetch; print(fetch({BIG_REPO_ID!r}))"
        self.command = [sys.executable, "-c", code]

    def start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command, env=self.env, stderr=subprocess.DEVNULL)

    def run(self) -> Path:
        """Fetch to the end; the model's folder."""
        done = subprocess.run(
            self.command, env=self.env, capture_output=True, text=True, timeout=WAIT_S
        )
        assert done.returncode == 0, done.stderr
        return Path(done.stdout.strip().splitlines()[-1])

    def problem(self) -> str:
        """What dishbot says when the fetch cannot be done (the page and the log say it)."""
        code = (
            "from bot.model_source import ModelUnobtainable, fetch\n"
            f"try:\n    fetch({BIG_REPO_ID!r})\n"
            "except ModelUnobtainable as problem:\n    print(problem)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip(), "the fetch went through"
        return done.stdout.strip()


def test_a_restart_resumes_a_half_downloaded_weights_file_where_it_stopped(
    big_model: Path, tmp_path: Path
) -> None:
    blobs = tmp_path / "hf" / "hub" / "models--tiny--big" / "blobs"
    with running_hub() as hub:
        hub.add_repo(BIG_REPO_ID, big_model)
        fetch = FetchProcess(hub, tmp_path / "hf")
        hub.hold(after_bytes=WRITTEN_CHUNK + 1024 * 1024, filename="model.safetensors")
        killed = fetch.start()
        try:
            hub.wait_until_held()
            deadline = time.monotonic() + WAIT_S
            while _bytes_under(blobs) < WRITTEN_CHUNK:  # whatever the partial file is called
                assert time.monotonic() < deadline, "the first chunk never reached the disk"
                time.sleep(0.05)
        finally:
            killed.kill()
            killed.wait()
        hub.release()
        hub.reset_counts()

        folder = fetch.run()

        weights = hub.repos[BIG_REPO_ID].files["model.safetensors"]
        fetched_again = sum(
            get.body_bytes for get in hub.file_gets() if get.filename == "model.safetensors"
        )
    assert fetched_again <= weights.size - WRITTEN_CHUNK
    assert files_of(folder) == files_of(big_model)


def test_a_dropped_connection_goes_on_from_where_it_broke_in_the_same_run(
    big_model: Path, tmp_path: Path
) -> None:
    broke_after = 5 * 1024 * 1024
    with running_hub() as hub:
        hub.add_repo(BIG_REPO_ID, big_model)
        hub.drop_once(after_bytes=broke_after, filename="model.safetensors")

        folder = FetchProcess(hub, tmp_path / "hf").run()

        gets = [get for get in hub.file_gets() if get.filename == "model.safetensors"]
        size = hub.repos[BIG_REPO_ID].files["model.safetensors"].size
    assert [get.body_bytes for get in gets][:1] == [broke_after]
    assert len(gets) == 2
    resumed_at = re.fullmatch(r"bytes=(\d+)-", str(gets[1].range))
    assert resumed_at is not None, gets[1].range
    assert 0 < int(resumed_at.group(1)) <= broke_after
    assert gets[1].body_bytes == size - int(resumed_at.group(1))
    assert files_of(folder) == files_of(big_model)


def test_the_model_comes_from_the_cdn_the_hub_redirects_to_and_the_token_stays_on_the_hub(
    big_model: Path, tmp_path: Path
) -> None:
    with running_hub(cdn_host="localhost") as hub:
        hub.add_repo(BIG_REPO_ID, big_model)

        folder = FetchProcess(hub, tmp_path / "hf", HF_TOKEN="hf_emulated").run()

        cdn = hub.cdn_requests()
        on_the_hub = [request for request in hub.requests if request not in cdn]
    assert files_of(folder) == files_of(big_model)
    assert "model.safetensors" in {request.filename for request in cdn}
    assert all(request.authorized for request in on_the_hub)
    assert not any(request.authorized for request in cdn), "the HF token went to the CDN"


def test_a_damaged_download_is_refused_and_fetched_again_at_the_next_start(
    big_model: Path, tmp_path: Path
) -> None:
    with running_hub() as hub:
        hub.add_repo(BIG_REPO_ID, big_model)
        hub.corrupt_once("model.safetensors")
        fetch = FetchProcess(hub, tmp_path / "hf")

        problem = fetch.problem()
        folder = fetch.run()

    assert "model.safetensors" in problem, problem
    assert "damaged" in problem, problem
    assert files_of(folder) == files_of(big_model)


@pytest.mark.parametrize("token", [None, "hf_emulated"], ids=["no token", "a token"])
def test_a_gated_model_says_to_accept_its_terms_and_set_hf_token(
    big_model: Path, tmp_path: Path, token: str | None
) -> None:
    with running_hub() as hub:
        hub.add_repo(BIG_REPO_ID, big_model, gated=True)
        env = {"HF_TOKEN": token} if token else {}

        problem = FetchProcess(hub, tmp_path / "hf", **env).problem()

    assert "gated" in problem, problem
    assert "HF_TOKEN" in problem
    assert MODEL_VARIABLE in problem
    assert "ModelUnobtainable" not in problem  # one message, not one wrapped in another


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in directory.rglob("*")
        if path.is_file()
    }


def _bytes_under(folder: Path) -> int:
    total = 0
    for path in folder.glob("*"):
        try:
            total += path.stat().st_size
        except FileNotFoundError:  # renamed into place meanwhile
            continue
    return total


def test_a_stop_while_a_small_file_downloads_ends_dishbot_promptly(
    hub: HubEmulator, tmp_path: Path
) -> None:
    # huggingface_hub's own pool of download threads would hold the process until its
    # retries gave up (over a minute): `docker stop` would have killed it by then.
    hub.hold(after_bytes=1000, filename="tokenizer.json")
    dishbot = DishbotRun(hub, tmp_path)
    try:
        dishbot.until(lambda: hub.downloads_held > 0, "the download reaching tokenizer.json")
        dishbot._drain()
        dishbot.child.kill(signal.SIGTERM)
        dishbot.child.expect(pexpect.EOF, timeout=STOP_WITHIN_S)  # fails the test past it
        dishbot.child.close()
        status = dishbot.child.exitstatus
        output = dishbot.output
    finally:
        hub.release()
        dishbot.kill()

    assert status == 0, output[-3000:]
    assert "stopped during start-up" in output
    assert "Traceback" not in output


def test_a_download_that_gets_further_each_time_is_tried_again_soon_not_later_and_later(
    big_model: Path, tmp_path: Path
) -> None:
    # A link that drops every megabyte: each try gets 5 MiB further (5 connections a try).
    with running_hub() as hub:
        hub.add_repo(BIG_REPO_ID, big_model)
        for _ in range(10):
            hub.drop_once(after_bytes=1024 * 1024, filename="model.safetensors")
        dishbot = DishbotRun(hub, tmp_path, model=BIG_REPO_ID)
        try:
            dishbot.until(lambda: dishbot.output.count("trying again in") >= 2, "two retries")
            waits = re.findall(r"trying again in (\d+) s", dishbot.output)
        finally:
            dishbot.kill()

    assert waits[:2] == ["5", "5"]  # not 5 then 10: it got further each time
