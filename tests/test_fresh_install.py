"""The README's two commands on a fresh machine: its CPU install line, then `dishbot run`.

A new virtual environment (not the test's own: nothing is shared with it) gets the README's
CPU install line as written, run from a copy of this checkout. The one change is where the
CPU build of torch comes from: PyTorch's CPU index cannot be reached here, so the local
wheel that pip's configuration finds (find-links) stands in for it, pinned to its release
as the real index, which carries a CPU build of every release, would give one. Then that
environment's own `dishbot`, with no configuration at all, is started twice: once with no
model to be had (it must serve the page and say what to set, not exit) and once with a tiny
local model (it must answer a photo asked through the page).

Building the environment downloads dishbot's dependencies (about 1.5 minutes here); deselect
with ``-m "not fresh_install"``. CI runs it.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from aiohttp import ClientSession, CookieJar

from tests.web_console import ANSWER_WAIT_S, Visitor, a_photo

pytestmark = pytest.mark.fresh_install

REPO = Path(__file__).resolve().parents[1]
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
INSTALL_S = 900  # a safety net for a hung download, not a timing claim
START_S = 120
CONSOLE_URL = r"web console: (http://127\.0\.0\.1:\d+/)"


def readme_block(marker: str) -> str:
    """The shell command in the fenced block right after ``<!-- marker -->`` in the README."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- {re.escape(marker)} -->\s*```sh\n(.*?)```", readme, re.S)
    assert found is not None, f"README.md has no code block marked <!-- {marker} -->"
    return found.group(1).strip()


def local_cpu_torch_wheel() -> Path | None:
    """A CPU build of torch for this Python in one of pip's configured find-links folders."""
    folders = os.environ.get("PIP_FIND_LINKS", "").split()
    config = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    )
    for line in config.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            folders += value.strip("'\"").split()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels = [
        wheel
        for folder in folders
        if Path(folder).is_dir()
        for wheel in Path(folder).glob(f"torch-*+cpu-{tag}-*.whl")
    ]
    return max(wheels, default=None)


def checkout_copy(destination: Path) -> Path:
    """The files of this checkout that git tracks or would track, without build leftovers."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: an unpacked tarball
        leftovers = shutil.ignore_patterns(".git", "build", "data", "*.egg-info", "*cache*")
        return Path(shutil.copytree(REPO, destination, ignore=leftovers))
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new virtual environment with dishbot installed by the README's CPU install line."""
    wheel = local_cpu_torch_wheel()
    if wheel is None:
        pytest.skip(
            "no CPU build of torch in pip's find-links (see `pip config list`) to stand in "
            "for PyTorch's CPU index, which the README's install line names and which cannot "
            "be reached from here"
        )
    line = readme_block("install:cpu")
    index_option = f"--extra-index-url {PYTORCH_CPU_INDEX}"
    assert index_option in line, line
    root = tmp_path_factory.mktemp("fresh-install")
    release = wheel.name.split("-")[1].split("+")[0]
    pin = root / "torch-cpu.txt"
    pin.write_text(f"torch=={release}\n")
    command = line.replace(index_option, f"--find-links {wheel.parent} --constraint {pin}")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}", "VIRTUAL_ENV": str(venv)}
    installed = subprocess.run(
        ["bash", "-c", command],
        cwd=checkout_copy(root / "checkout"),
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_S,
    )
    assert installed.returncode == 0, f"{command}\n{installed.stdout[-4000:]}{installed.stderr}"
    yield venv
    shutil.rmtree(root, ignore_errors=True)  # 1.3 GB; pytest keeps its last three runs' files


def canonical(name: str) -> str:
    """A distribution's name as PyPI compares them (huggingface_hub is huggingface-hub)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_readme_cpu_install_line_installs_no_cuda(fresh_venv: Path) -> None:
    python = str(fresh_venv / "bin" / "python")
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format", "json"], capture_output=True, check=True
    )
    names = {canonical(package["name"]) for package in json.loads(listed.stdout)}
    cuda = subprocess.run(
        [python, "-c", "import torch; print(torch.version.cuda)"],
        capture_output=True,
        text=True,
        check=True,
    )

    assert {"dishbot", "torch", "transformers", "huggingface-hub"} <= names
    assert "torchvision" not in names
    assert [n for n in names if n.startswith(("nvidia-", "cuda-")) or n == "triton"] == []
    assert cuda.stdout.strip() == "None"


def bare_environment(tmp_path: Path, **settings: str) -> dict[str, str]:
    """A user's shell on a new machine: nothing configured, no model cache, no network."""
    home = tmp_path / "home"
    home.mkdir()
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    return env | {
        "HOME": str(home),
        "HF_HOME": str(home / ".cache" / "huggingface"),
        "HF_HUB_OFFLINE": "1",
        "DISHBOT_WEB__PORT": "0",  # any free port: the printed URL says which
        **settings,
    }


@pytest.fixture
def empty_dir(tmp_path: Path) -> Path:
    path = tmp_path / "empty"
    path.mkdir()
    return path


def start(venv: Path, cwd: Path, env: dict[str, str]) -> tuple[pexpect.spawn, str]:
    """``dishbot run`` from the venv; returns the process and the console URL it printed."""
    child = pexpect.spawn(
        str(venv / "bin" / "dishbot"),
        ["run"],
        cwd=str(cwd),
        env=env,
        timeout=START_S,
        encoding="utf-8",
    )
    child.expect(CONSOLE_URL)
    return child, child.match.group(1)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_until_ready(child: pexpect.spawn, url: str) -> None:
    """Poll /readyz as a load balancer would, reading the process's output meanwhile."""
    for _ in range(START_S * 2):  # a safety net for a hung start, not a timing claim
        if get(url + "readyz")[0] == 200:
            return
        assert child.isalive(), child.before
        child.expect([pexpect.TIMEOUT, pexpect.EOF], timeout=0.5)
    pytest.fail(f"/readyz never said ready; dishbot printed:\n{child.before}")


def stop(child: pexpect.spawn) -> int | None:
    child.kill(signal.SIGTERM)
    child.expect(pexpect.EOF, timeout=START_S)
    child.close()
    return child.exitstatus


@pytest.fixture
def stopped_afterwards() -> Iterator[list[pexpect.spawn]]:
    children: list[pexpect.spawn] = []
    yield children
    for child in children:
        child.close(force=True)


def test_dishbot_run_with_no_model_to_be_had_serves_the_page_and_says_what_to_set(
    fresh_venv: Path, tmp_path: Path, empty_dir: Path, stopped_afterwards: list[pexpect.spawn]
) -> None:
    child, url = start(fresh_venv, empty_dir, bare_environment(tmp_path))
    stopped_afterwards.append(child)
    page_status, page = get(url)
    child.expect("DISHBOT_ENGINE__MODEL")  # the log names the setting once the model fails
    ready_status, ready = get(url + "readyz")
    status = json.loads(get(url + "model-status")[1])
    reloaded = re.search(r'<p id="model-status-text">(.*?)</p>', get(url)[1], re.S)
    still_running = child.isalive()
    exit_status = stop(child)

    assert page_status == 200
    assert 'id="photo"' in page
    assert 'id="model-status"' in page
    assert ready_status == 503
    assert json.loads(ready)["ready"] is False
    assert "DISHBOT_ENGINE__MODEL" in status["message"]
    assert reloaded is not None
    assert html.unescape(reloaded.group(1)) == status["message"]
    assert status["ready"] is False
    assert still_running
    assert exit_status == 0


class _LiveClient:
    """What `Visitor` needs of aiohttp's TestClient, over a real server's URL."""

    def __init__(self, url: str) -> None:
        self.session = ClientSession(base_url=url, cookie_jar=CookieJar(unsafe=True))

    async def start_server(self) -> None:
        pass

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.session.get(path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.session.post(path, **kwargs)

    async def close(self) -> None:
        await self.session.close()


async def ask_through_the_page(url: str) -> dict[str, Any]:
    async with Visitor(_LiveClient(url.rstrip("/"))) as visitor:  # type: ignore[arg-type]
        await visitor.open_page()
        await visitor.listen()
        asked = await visitor.ask("What dish is this?", a_photo())
        assert asked.status == 202
        return await visitor.answer()


def test_dishbot_run_with_a_local_model_answers_a_photo_asked_on_the_page(
    fresh_venv: Path,
    tiny_internvl: Path,
    tmp_path: Path,
    empty_dir: Path,
    stopped_afterwards: list[pexpect.spawn],
) -> None:
    env = bare_environment(
        tmp_path, DISHBOT_ENGINE__MODEL=str(tiny_internvl), DISHBOT_ENGINE__DEVICE="cpu"
    )
    child, url = start(fresh_venv, empty_dir, env)
    stopped_afterwards.append(child)
    wait_until_ready(child, url)
    answer = asyncio.run(asyncio.wait_for(ask_through_the_page(url), ANSWER_WAIT_S * 3))
    exit_status = stop(child)

    assert answer["author"] == "bot"
    assert answer["text"].strip()
    assert exit_status == 0
