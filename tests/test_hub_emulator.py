"""The installed huggingface_hub downloads models from the hub emulator as it does from the hub.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported, so each
client runs in its own Python process with those set, as `dishbot run` would.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.hub_emulator import HubEmulator, running_hub

REPO_ID = "tiny/InternVL-tiny-hf"
BIG_REPO_ID = "tiny/twelve-mebibytes"
# huggingface_hub writes a download to disk in chunks of this size (constants.DOWNLOAD_CHUNK_SIZE),
# so a download resumes from a multiple of it.
CLIENT_CHUNK_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo with one weights file larger than the client's write chunk, so a drop can resume."""
    directory = tmp_path_factory.mktemp("big-model")
    (directory / "config.json").write_text('{"model_type": "none"}\n')
    (directory / "model.safetensors").write_bytes(random.Random(15).randbytes(12 * 1024 * 1024))
    return directory


@pytest.fixture
def hub(tiny_internvl: Path, big_model: Path) -> Iterator[HubEmulator]:
    with running_hub() as hub:
        hub.add_repo(REPO_ID, tiny_internvl)
        hub.add_repo(BIG_REPO_ID, big_model)
        yield hub


def client_env(hub: HubEmulator, hf_home: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
    return env


def run_client(hub: HubEmulator, hf_home: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=client_env(hub, hf_home),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def snapshot_download(hub: HubEmulator, hf_home: Path, repo_id: str) -> Path:
    done = run_client(
        hub,
        hf_home,
        f"""
        from huggingface_hub import snapshot_download
        print(snapshot_download({repo_id!r}))
        """,
    )
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in directory.rglob("*")
        if path.is_file()
    }


def test_snapshot_download_gets_the_model_byte_for_byte(
    hub: HubEmulator, tiny_internvl: Path, tmp_path: Path
) -> None:
    snapshot = snapshot_download(hub, tmp_path / "hf", REPO_ID)

    assert snapshot.is_relative_to(tmp_path / "hf" / "hub")
    assert snapshot.name == hub.repos[REPO_ID].sha
    assert files_of(snapshot) == files_of(tiny_internvl)
    assert hub.bytes_served == hub.repos[REPO_ID].size


def test_second_snapshot_download_comes_from_the_cache_without_fetching_a_file(
    hub: HubEmulator, tmp_path: Path
) -> None:
    first = snapshot_download(hub, tmp_path / "hf", REPO_ID)
    hub.reset_counts()

    second = snapshot_download(hub, tmp_path / "hf", REPO_ID)

    assert second == first
    assert hub.file_gets() == []
    assert hub.bytes_served == 0


def test_model_info_lists_every_file_with_its_size(hub: HubEmulator, tmp_path: Path) -> None:
    done = run_client(
        hub,
        tmp_path / "hf",
        f"""
        from huggingface_hub import HfApi
        info = HfApi().model_info({REPO_ID!r}, files_metadata=True)
        print(info.sha)
        for sibling in info.siblings:
            print(sibling.rfilename, sibling.size)
        """,
    )

    assert done.returncode == 0, done.stderr
    sha, *siblings = done.stdout.split("\n")[:-1]
    repo = hub.repos[REPO_ID]
    assert sha == repo.sha
    assert sorted(siblings) == sorted(f"{file.path} {file.size}" for file in repo.files.values())


def test_a_dropped_connection_resumes_with_a_range_request_instead_of_starting_over(
    hub: HubEmulator, big_model: Path, tmp_path: Path
) -> None:
    weights = hub.repos[BIG_REPO_ID].files["model.safetensors"]
    hub.drop_once(after_bytes=11 * 1024 * 1024, filename="model.safetensors")

    snapshot = snapshot_download(hub, tmp_path / "hf", BIG_REPO_ID)

    gets = [get for get in hub.file_gets() if get.filename == "model.safetensors"]
    assert [(get.status, get.range) for get in gets] == [
        (200, None),
        (206, f"bytes={CLIENT_CHUNK_BYTES}-"),
    ]
    assert gets[1].body_bytes == weights.size - CLIENT_CHUNK_BYTES
    assert files_of(snapshot) == files_of(big_model)


def test_a_killed_download_fetches_only_the_unfinished_files_when_run_again(
    hub: HubEmulator, tmp_path: Path
) -> None:
    repo = hub.repos[REPO_ID]
    weights = repo.files["model.safetensors"]
    others = [file for file in repo.files.values() if file is not weights]
    hub.hold(after_bytes=weights.size // 2, filename="model.safetensors")
    blobs = tmp_path / "hf" / "hub" / "models--tiny--InternVL-tiny-hf" / "blobs"
    client = subprocess.Popen(
        [sys.executable, "-c", f"import huggingface_hub as h; h.snapshot_download({REPO_ID!r})"],
        env=client_env(hub, tmp_path / "hf"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        hub.wait_until_held()
        wait_for(lambda: all((blobs / file.etag).is_file() for file in others))
    finally:
        client.kill()
        client.wait()
    hub.release()
    hub.reset_counts()

    snapshot_download(hub, tmp_path / "hf", REPO_ID)

    assert [get.filename for get in hub.file_gets()] == ["model.safetensors"]
    assert hub.bytes_served < repo.size


def test_an_unknown_repo_is_repository_not_found(hub: HubEmulator, tmp_path: Path) -> None:
    done = run_client(
        hub,
        tmp_path / "hf",
        """
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError
        try:
            snapshot_download("nobody/no-such-model")
        except RepositoryNotFoundError as error:
            print("not found:", error.response.status_code)
        """,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "not found: 404"
    assert hub.file_gets() == []


def wait_for(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    """Poll `condition` until it is true; fail the test if it never is."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("the condition never came true")
        time.sleep(0.05)
