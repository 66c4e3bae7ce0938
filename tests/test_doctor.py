"""`dishbot doctor`: each check's line as an operator reads it, and the exit status.

Checks run through the real command (`main(["doctor"])`) against real parts: SQLite (and
PostgreSQL when DISHBOT_TEST_POSTGRES_URL is set), the Telegram and Discord emulators, a local
OpenAI-compatible server, the XTuner stand-in in a child Python, real sockets. What this
machine cannot be (a GPU host, an old Python, a full disk) is described to the checks through
`Probes`, the functions they otherwise probe this machine with.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

import bot.doctor.database
import bot.doctor.model
from bot.cli import main
from bot.doctor import Probes, diagnose
from bot.doctor.context import Context
from bot.doctor.findings import Finding, ok
from bot.doctor.probes import GIB, CudaDevice, DiskSpace, LMDeployInfo, TorchInfo
from bot.doctor.runner import Check, run_checks
from bot.store import Store
from bot.store.database import open_engine
from bot.store.schema import head_revision, upgrade
from tests.discord_emulator import DiscordEmulator
from tests.hub_emulator import HubEmulator, running_hub
from tests.openai_server import FakeOpenAIServer
from tests.telegram_emulator import DEFAULT_BOT_USERNAME, TelegramEmulator

REPO = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).parent / "xtuner_standin"
CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


@dataclass
class Report:
    """What `dishbot doctor` printed and how it exited."""

    status: int
    text: str

    def line(self, check: str) -> str:
        """The line of ``check``, as printed (status word, name, text)."""
        for line in self.text.splitlines():
            words = line.split(maxsplit=2)
            if len(words) >= 2 and words[0] in ("ok", "warn", "FAIL") and words[1] == check:
                return line
        raise AssertionError(f"no {check} line in:\n{self.text}")


@pytest.fixture(autouse=True)
def any_free_web_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another program on port 8080 must not fail the checks these tests are not about."""
    monkeypatch.setenv("DISHBOT_WEB__PORT", "0")


@pytest.fixture(autouse=True)
def a_model_that_is_here(monkeypatch: pytest.MonkeyPatch, tiny_internvl: Path) -> None:
    """The tiny InternVL as engine.model: tests are offline, and the default is not cached."""
    monkeypatch.setenv("DISHBOT_ENGINE__MODEL", str(tiny_internvl))


def doctor(capsys: pytest.CaptureFixture[str]) -> Report:
    """`dishbot doctor`, run as the command runs it."""
    status = main(["doctor"])
    return Report(status, capsys.readouterr().out)


async def doctor_beside_servers(capsys: pytest.CaptureFixture[str]) -> Report:
    """`dishbot doctor` in a thread of its own, while this loop serves the emulators."""
    status = await asyncio.to_thread(main, ["doctor"])
    return Report(status, capsys.readouterr().out)


def doctor_on(probes: Probes) -> Report:
    """The doctor on a machine ``probes`` describe (the settings are read as usual)."""
    out = io.StringIO()
    status = diagnose(probes=probes, out=out)
    return Report(status, out.getvalue())


# ----------------------------------------------------------------------------- python


def test_python_line_shows_the_running_version_and_what_dishbot_needs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = doctor(capsys)
    version = ".".join(str(part) for part in sys.version_info[:3])
    assert report.line("python") == f"ok    python      {version} (needs 3.11+)"
    assert report.status == 0


def test_an_old_python_fails_with_how_to_get_a_new_one() -> None:
    report = doctor_on(Probes(python_version=lambda: (3, 10, 12)))
    assert report.line("python") == (
        "FAIL  python      3.10.12, but dishbot needs 3.11+ — install Python 3.11 or newer "
        "and dishbot into it (python3.11 -m venv .venv)"
    )
    assert report.status == 1


# ----------------------------------------------------------------------------- packages


def test_packages_line_lists_each_required_distribution_with_its_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = doctor(capsys).line("packages")
    required = importlib.metadata.requires("dishbot") or []
    own = [r for r in required if "extra ==" not in r]
    assert line.startswith(f"ok    packages    all {len(own)} required installed: ")
    assert f"discord.py {importlib.metadata.version('discord.py')}" in line
    assert f"sqlalchemy {importlib.metadata.version('sqlalchemy')}" in line
    assert "torch" not in line  # an extra's requirement, not dishbot's own


def test_a_missing_or_too_old_package_fails_with_the_pip_install_line() -> None:
    installed = importlib.metadata.version("discord.py")
    report = doctor_on(
        Probes(
            requirements=lambda: [
                "aiohttp>=3.9",
                "dishbot-no-such-package>=1.0",
                "discord.py>=999",
                'lmdeploy>=0.18; extra == "gpu"',
            ]
        )
    )
    assert report.line("packages") == (
        "FAIL  packages    dishbot-no-such-package is missing; discord.py "
        f"{installed} does not fit >=999 — pip install "
        '"dishbot-no-such-package>=1.0" "discord.py>=999"'
    )
    assert report.status == 1


# ----------------------------------------------------------------------------- settings


def test_settings_line_says_where_the_settings_came_from(
    capsys: pytest.CaptureFixture[str],
) -> None:
    Path("dishbot.toml").write_text("[limits]\nquestions_per_minute = 4\n", encoding="utf-8")
    line = doctor(capsys).line("settings")
    # DISHBOT_WEB__PORT and DISHBOT_ENGINE__MODEL, set for every test here.
    assert line == (
        "ok    settings    read from defaults + 2 DISHBOT_* environment variables + "
        f"{Path('dishbot.toml').resolve()}"
    )


def test_unreadable_settings_fail_and_the_checks_that_need_them_are_not_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISHBOT_TELEGRAM__MODE", "webhook")
    monkeypatch.setenv("DISHBOT_TELEGRAM__WEBHOOK_URL", "https://bot.example.org/telegram")
    monkeypatch.setenv("DISHBOT_TELEGRAM__WEBHOOK_SECRET", "not a secret Telegram takes!")
    report = doctor(capsys)
    assert report.line("settings") == (
        "FAIL  settings    invalid settings: telegram: telegram.webhook_secret must be 1-256 "
        "of A-Z a-z 0-9 _ - — fix it in the environment (DISHBOT_SECTION__NAME) or in "
        "dishbot.toml (`dishbot config` shows the effective settings)"
    )
    assert report.line("python").startswith("ok    python")
    assert "torch" not in report.text
    assert report.text.endswith("the other checks need settings that can be read; fix them first\n")
    assert report.status == 1


# ----------------------------------------------------------------------------- torch


def test_cpu_torch_is_fine_for_the_transformers_backend(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = doctor(capsys)
    assert report.line("torch") == (
        f"ok    torch       {torch.__version__}, CPU only: the transformers backend runs on CPU, "
        "slowly"
    )
    assert report.status == 0


def test_a_cuda_device_setting_without_cuda_fails_with_the_setting_to_change(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISHBOT_ENGINE__DEVICE", "cuda")
    report = doctor(capsys)
    assert report.line("torch") == (
        f"FAIL  torch       {torch.__version__} sees no CUDA GPU, but engine.device = cuda — set "
        "DISHBOT_ENGINE__DEVICE=auto (or cpu), or install a CUDA build of torch"
    )
    assert report.status == 1


def test_missing_torch_fails_with_the_cpu_install_line() -> None:
    report = doctor_on(Probes(torch=lambda: TorchInfo(version=None)))
    assert report.line("torch") == (
        "FAIL  torch       not installed; the transformers backend needs it (lmdeploy is the "
        f"other choice, on a CUDA GPU) — {CPU_TORCH} (CPU), or "
        'pip install "dishbot[gpu]" on a CUDA machine'
    )
    assert report.status == 1


def test_torch_line_names_the_gpu_and_its_free_memory() -> None:
    h200 = CudaDevice(0, "NVIDIA H200", free_bytes=130 * GIB, total_bytes=140 * GIB)
    report = doctor_on(Probes(torch=lambda: TorchInfo("2.8.0+cu128", cuda_devices=(h200,))))
    assert report.line("torch") == (
        "ok    torch       2.8.0+cu128, CUDA: GPU 0 NVIDIA H200, 130.0 of 140.0 GiB free"
    )


def test_a_nearly_full_gpu_is_a_warning() -> None:
    busy = CudaDevice(0, "NVIDIA L4", free_bytes=2 * GIB, total_bytes=22 * GIB)
    report = doctor_on(Probes(torch=lambda: TorchInfo("2.8.0+cu128", cuda_devices=(busy,))))
    assert report.line("torch") == (
        "warn  torch       2.8.0+cu128, CUDA: GPU 0 NVIDIA L4, 2.0 of 22.0 GiB free: little "
        "free GPU memory, loading the model may fail — stop what else uses the GPU "
        "(nvidia-smi lists it)"
    )
    assert report.status == 0


def test_a_check_that_crashes_is_a_fail_line_naming_the_exception() -> None:
    def broken_driver() -> TorchInfo:
        raise RuntimeError("CUDA driver initialization failed")

    report = doctor_on(Probes(torch=broken_driver))
    assert report.line("torch") == (
        "FAIL  torch       the check itself failed: RuntimeError: CUDA driver initialization failed"
    )
    assert "Traceback" not in report.text
    assert report.line("database").startswith("ok    database")  # the others still ran
    assert report.status == 1


async def test_a_check_that_hangs_is_given_up_on_at_its_time_limit() -> None:
    async def hangs(context: Context) -> Finding:
        await asyncio.Event().wait()
        return ok("stuck", "never")

    out = io.StringIO()
    findings = await run_checks([Check("stuck", hangs, timeout_s=0.05)], Context(Probes()), out)
    assert out.getvalue() == "FAIL  stuck       no answer within 0.05 s: the check gave up\n"
    assert len(findings) == 1


# ----------------------------------------------------------------------------- lmdeploy


def test_lmdeploy_absent_is_fine_for_auto(capsys: pytest.CaptureFixture[str]) -> None:
    report = doctor(capsys)
    assert report.line("lmdeploy") == (
        "ok    lmdeploy    not installed: auto uses the transformers backend"
    )


def test_lmdeploy_backend_without_lmdeploy_fails_with_both_ways_out(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISHBOT_ENGINE__BACKEND", "lmdeploy")
    monkeypatch.setenv("DISHBOT_TRAINING__TRAINER", "transformers")  # not XTuner's env: faster
    report = doctor(capsys)
    assert report.line("lmdeploy") == (
        "FAIL  lmdeploy    not installed, but engine.backend = lmdeploy — pip install "
        '"dishbot[gpu]" on a CUDA machine, or set DISHBOT_ENGINE__BACKEND=transformers'
    )
    assert report.status == 1


def test_lmdeploy_on_a_gpu_is_what_auto_uses() -> None:
    gpu = CudaDevice(0, "NVIDIA A10G", free_bytes=20 * GIB, total_bytes=22 * GIB)
    report = doctor_on(
        Probes(
            torch=lambda: TorchInfo("2.8.0+cu128", cuda_devices=(gpu,)),
            lmdeploy=lambda _timeout: LMDeployInfo(installed=True, version="0.18.0"),
        )
    )
    assert report.line("lmdeploy") == (
        "ok    lmdeploy    0.18.0 on CUDA: auto uses the lmdeploy backend"
    )


def test_lmdeploy_that_does_not_import_fails_when_auto_would_pick_it() -> None:
    gpu = CudaDevice(0, "NVIDIA A10G", free_bytes=20 * GIB, total_bytes=22 * GIB)
    broken = "ImportError: libcudart.so.12: cannot open shared object file"
    report = doctor_on(
        Probes(
            torch=lambda: TorchInfo("2.8.0+cu128", cuda_devices=(gpu,)),
            lmdeploy=lambda _timeout: LMDeployInfo(installed=True, import_error=broken),
        )
    )
    assert report.line("lmdeploy") == (
        f"FAIL  lmdeploy    installed, but `import lmdeploy` fails: {broken} — pip install "
        '--force-reinstall "dishbot[gpu]" on a CUDA machine, or set '
        "DISHBOT_ENGINE__BACKEND=transformers"
    )
    assert report.status == 1


# ----------------------------------------------------------------------------- openai


@pytest.fixture
async def openai_server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer(models=["internvl2-8b"]) as server:
        yield server


async def test_openai_backend_line_names_what_the_server_serves(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    openai_server: FakeOpenAIServer,
) -> None:
    monkeypatch.setenv("DISHBOT_ENGINE__BACKEND", "openai")
    monkeypatch.setenv("DISHBOT_ENGINE__OPENAI__BASE_URL", openai_server.url)
    report = await doctor_beside_servers(capsys)
    assert report.line("openai") == (
        f"ok    openai      {openai_server.url} answers, serving internvl2-8b"
    )
    assert report.line("torch") == f"ok    torch       {torch.__version__}, CPU only"


async def test_openai_server_that_does_not_answer_fails_naming_the_base_url_setting(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    openai_server: FakeOpenAIServer,
) -> None:
    await openai_server.go_down()
    monkeypatch.setenv("DISHBOT_ENGINE__BACKEND", "openai")
    monkeypatch.setenv("DISHBOT_ENGINE__OPENAI__BASE_URL", openai_server.url)
    report = await doctor_beside_servers(capsys)
    port = openai_server.url.split(":")[2].split("/")[0]
    assert report.line("openai") == (
        f"FAIL  openai      {openai_server.url} does not answer: cannot connect to "
        f"127.0.0.1:{port} (connection refused) — start the server (lmdeploy serve "
        "api_server), or set DISHBOT_ENGINE__OPENAI__BASE_URL to the server's /v1 URL"
    )
    assert report.status == 1


# ----------------------------------------------------------------------------- model


def _write_config(directory: Path, architecture: str) -> Path:
    directory.mkdir(parents=True)
    config = {"architectures": [architecture], "torch_dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def test_a_model_directory_in_the_backend_s_format_is_ready(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tiny_internvl: Path
) -> None:
    monkeypatch.setenv("DISHBOT_ENGINE__MODEL", str(tiny_internvl))
    report = doctor(capsys)
    assert report.line("model") == (
        f"ok    model       {tiny_internvl} (transformers backend): at {tiny_internvl}"
    )
    assert report.status == 0


def test_a_model_in_the_wrong_format_fails_naming_one_in_the_right_format(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    internvl2 = _write_config(tmp_path / "InternVL2-2B", "InternVLChatModel")
    monkeypatch.setenv("DISHBOT_ENGINE__MODEL", str(internvl2))
    report = doctor(capsys)
    line = report.line("model")
    assert line.startswith(
        "FAIL  model       the transformers backend needs a model in transformers' native format"
    )
    assert f"{internvl2} is in OpenGVLab's own format (InternVLChatModel)" in line
    assert "set DISHBOT_ENGINE__MODEL=OpenGVLab/InternVL3-1B-hf" in line
    assert report.status == 1


def test_the_default_model_in_the_hub_cache_is_ready(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tiny_internvl: Path,
) -> None:
    """A fresh machine after its first download: the default model, complete in the cache."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--OpenGVLab--InternVL3-1B-hf"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_internvl, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40, encoding="utf-8")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("DISHBOT_ENGINE__MODEL")
    report = doctor(capsys)
    assert report.line("model") == (
        f"ok    model       OpenGVLab/InternVL3-1B-hf (transformers backend): cached at {snapshot}"
    )


@pytest.fixture
def online_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_internvl: Path
) -> Iterator[HubEmulator]:
    """The hub emulator serving the tiny model as OpenGVLab/InternVL3-1B-hf, with the hub
    switched on (as HF_ENDPOINT and no HF_HUB_OFFLINE would) and an empty model cache."""
    with running_hub() as hub:
        hub.add_repo("OpenGVLab/InternVL3-1B-hf", tiny_internvl)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        yield hub


def test_the_default_model_not_downloaded_yet_is_downloadable_from_the_hub(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, online_hub: HubEmulator
) -> None:
    monkeypatch.delenv("DISHBOT_ENGINE__MODEL")
    report = doctor(capsys)
    assert report.line("model") == (
        "ok    model       OpenGVLab/InternVL3-1B-hf (transformers backend): downloadable from "
        "the hub, `dishbot run` fetches it"
    )
    assert report.status == 0
    assert online_hub.file_gets() == []  # looking downloads nothing


def test_a_model_the_hub_does_not_have_fails_naming_the_model_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, online_hub: HubEmulator
) -> None:
    monkeypatch.setenv("DISHBOT_ENGINE__MODEL", "dishbot-test/no-such-model")
    report = doctor(capsys)
    line = report.line("model")
    assert line.startswith(
        "FAIL  model       there is no model dishbot-test/no-such-model on the Hugging Face hub"
    )
    assert "set DISHBOT_ENGINE__MODEL to an InternVL model that exists" in line
    assert report.status == 1


def test_a_model_too_big_for_the_free_memory_fails_naming_a_smaller_one(
    monkeypatch: pytest.MonkeyPatch, tiny_internvl: Path
) -> None:
    monkeypatch.setenv("DISHBOT_ENGINE__MODEL", str(tiny_internvl))
    report = doctor_on(Probes(free_memory=lambda _device: 1000))
    line = report.line("model")
    assert line.startswith(f"FAIL  model       not enough memory to load {tiny_internvl}: ")
    assert "1.0 kB is free; free some, or set DISHBOT_ENGINE__MODEL to a smaller checkpoint" in line
    assert report.status == 1


def _register_versions(tiny_internvl: Path) -> None:
    """A database where "base" (the default model) was retrained into "v1" (the tiny model)."""
    url = f"sqlite+aiosqlite:///{Path('data', 'dishbot.db').resolve()}"

    async def register() -> None:
        store = Store.open(url, Path())
        try:
            await upgrade(store.engine)
            base = await store.add_model_version("base", "OpenGVLab/InternVL3-1B-hf")
            await store.activate_model_version("base", reason="base")
            await store.add_model_version(
                "v1", str(tiny_internvl), parent_id=base.id, trainer="transformers"
            )
            await store.activate_model_version("v1", reason="promoted")
        finally:
            await store.close()

    asyncio.run(register())


def test_a_trained_active_version_is_the_model_checked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tiny_internvl: Path
) -> None:
    _register_versions(tiny_internvl)
    monkeypatch.setenv("DISHBOT_ENGINE__MODEL", "OpenGVLab/InternVL3-1B-hf")
    report = doctor(capsys)
    assert report.line("model") == (
        f"warn  model       {tiny_internvl} (transformers backend, version v1): at "
        f"{tiny_internvl}; engine.model OpenGVLab/InternVL3-1B-hf is not used: the trained "
        "version v1 is active and wins (`dishbot models` lists the versions)"
    )
    assert report.status == 0


def test_a_base_version_gives_way_to_the_configured_model(
    capsys: pytest.CaptureFixture[str], tiny_internvl: Path, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{Path('data', 'dishbot.db').resolve()}"

    async def register_base() -> None:
        store = Store.open(url, Path())
        try:
            await upgrade(store.engine)
            await store.add_model_version("base", str(tmp_path / "an-older-model"))
            await store.activate_model_version("base", reason="base")
        finally:
            await store.close()

    asyncio.run(register_base())
    report = doctor(capsys)
    assert report.line("model") == (
        f"ok    model       {tiny_internvl} (transformers backend): at {tiny_internvl}"
    )


def test_the_openai_server_chooses_the_model_when_none_is_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISHBOT_ENGINE__BACKEND", "openai")
    monkeypatch.delenv("DISHBOT_ENGINE__MODEL")
    report = doctor(capsys)
    assert report.line("model") == (
        "ok    model       the server chooses: its first model (set "
        "DISHBOT_ENGINE__OPENAI__MODEL to pick)"
    )


# ----------------------------------------------------------------------------- database


def test_a_fresh_machine_has_no_database_yet_and_that_is_fine(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = doctor(capsys)
    path = Path("data", "dishbot.db").resolve()
    assert report.line("database") == (
        f"ok    database    SQLite at {path}: will be created at first run"
    )
    assert not path.exists()  # looking did not create it


def test_database_at_the_newest_revision(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "upgrade"]) == 0
    capsys.readouterr()
    report = doctor(capsys)
    url = f"sqlite+aiosqlite:///{Path('data', 'dishbot.db').resolve()}"
    assert report.line("database") == (
        f"ok    database    {url} at revision {head_revision()} (the newest)"
    )


def _migrate_to(url: str, revision: str) -> None:
    async def migrate() -> None:
        engine = open_engine(url)
        try:
            await upgrade(engine, revision)
        finally:
            await engine.dispose()

    asyncio.run(migrate())


def test_an_sqlite_database_behind_is_upgraded_at_first_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"sqlite+aiosqlite:///{Path('data', 'dishbot.db').resolve()}"
    _migrate_to(url, "0003")
    report = doctor(capsys)
    assert report.line("database") == (
        f"ok    database    {url} at revision 0003, newest is {head_revision()}: upgraded at "
        "first run"
    )
    assert report.status == 0


def test_an_unreachable_database_fails_naming_the_url_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv(
        "DISHBOT_DATABASE_URL", f"postgresql://dishbot:s3cret-pw@127.0.0.1:{port}/dishbot"
    )
    report = doctor(capsys)
    line = report.line("database")
    assert line.startswith(
        f"FAIL  database    cannot use the database at postgresql://dishbot:***@127.0.0.1:{port}"
        "/dishbot: "
    )
    assert line.endswith(" — check DISHBOT_DATABASE_URL")
    assert "s3cret-pw" not in report.text
    assert report.status == 1


def test_a_database_server_that_never_answers_fails_instead_of_hanging(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bot.doctor.database, "NETWORK_TIMEOUT_S", 0.5)
    monkeypatch.setattr(bot.doctor.model, "NETWORK_TIMEOUT_S", 0.5)
    with socket.socket() as silent:  # connections are accepted, then nothing is said
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        monkeypatch.setenv("DISHBOT_DATABASE_URL", f"postgresql://dishbot:pw@127.0.0.1:{port}/db")
        report = doctor(capsys)
    assert report.line("database") == (
        f"FAIL  database    the database at postgresql://dishbot:***@127.0.0.1:{port}/db did not "
        "answer within 0.5 s — check DISHBOT_DATABASE_URL"
    )
    assert report.line("model").startswith("ok    model")
    assert report.status == 1


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_postgresql_database_behind_fails_until_it_is_upgraded(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    _migrate_to(database_url, "0003")
    monkeypatch.setenv("DISHBOT_DATABASE_URL", database_url)
    report = doctor(capsys)
    from bot.settings import redact_url

    assert report.line("database") == (
        f"FAIL  database    {redact_url(database_url)} is at revision 0003, newest is "
        f"{head_revision()} — run `dishbot db upgrade`"
    )
    assert report.status == 1


# ----------------------------------------------------------------------------- telegram


@pytest.fixture
async def telegram() -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator() as emulator:
        yield emulator


def test_no_telegram_token_means_telegram_is_off(capsys: pytest.CaptureFixture[str]) -> None:
    report = doctor(capsys)
    assert report.line("telegram") == (
        "ok    telegram    not set: Telegram off (set DISHBOT_TELEGRAM__TOKEN)"
    )


async def test_telegram_line_names_the_bot_the_token_belongs_to(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    telegram: TelegramEmulator,
) -> None:
    monkeypatch.setenv("DISHBOT_TELEGRAM__TOKEN", telegram.token)
    monkeypatch.setenv("DISHBOT_TELEGRAM__BASE_URL", telegram.base_url)
    report = await doctor_beside_servers(capsys)
    assert report.line("telegram") == f"ok    telegram    @{DEFAULT_BOT_USERNAME} (polling)"
    assert [call.method for call in telegram.calls()] == ["getMe"]
    assert telegram.token not in report.text
    assert report.status == 0


async def test_a_rejected_telegram_token_fails_without_showing_the_token(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    telegram: TelegramEmulator,
) -> None:
    wrong = "987654321:AAE-revoked-token-of-another-bot"
    monkeypatch.setenv("DISHBOT_TELEGRAM__TOKEN", wrong)
    monkeypatch.setenv("DISHBOT_TELEGRAM__BASE_URL", telegram.base_url)
    report = await doctor_beside_servers(capsys)
    origin = telegram.base_url.removesuffix("/bot")
    assert report.line("telegram") == (
        f"FAIL  telegram    token rejected by {origin} (401) — set DISHBOT_TELEGRAM__TOKEN to "
        "the token @BotFather gave you"
    )
    assert wrong not in report.text
    assert report.status == 1


def test_an_unreachable_telegram_api_fails_naming_where_it_was_looked_for(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, free_port: int
) -> None:
    monkeypatch.setenv("DISHBOT_TELEGRAM__TOKEN", "123456789:AAE-some-token")
    monkeypatch.setenv("DISHBOT_TELEGRAM__BASE_URL", f"http://127.0.0.1:{free_port}/bot")
    report = doctor(capsys)
    assert report.line("telegram") == (
        f"FAIL  telegram    cannot reach http://127.0.0.1:{free_port}: cannot connect to "
        f"127.0.0.1:{free_port} (connection refused) — check the network, or "
        "DISHBOT_TELEGRAM__BASE_URL (for a self-hosted Bot API)"
    )
    assert "AAE-some-token" not in report.text
    assert report.status == 1


def test_a_telegram_webhook_without_https_fails(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISHBOT_TELEGRAM__TOKEN", "123456789:AAE-some-token")
    monkeypatch.setenv("DISHBOT_TELEGRAM__MODE", "webhook")
    monkeypatch.setenv("DISHBOT_TELEGRAM__WEBHOOK_URL", "http://bot.example.org/telegram")
    report = doctor(capsys)
    assert report.line("telegram") == (
        "FAIL  telegram    webhook_url http://bot.example.org/telegram is not an https:// URL, "
        "and Telegram posts updates only over HTTPS — set DISHBOT_TELEGRAM__WEBHOOK_URL to the "
        "public https:// URL of your proxy, or DISHBOT_TELEGRAM__MODE=polling"
    )
    assert report.status == 1


def test_a_telegram_webhook_on_a_port_telegram_does_not_post_to_fails(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISHBOT_TELEGRAM__TOKEN", "123456789:AAE-some-token")
    monkeypatch.setenv("DISHBOT_TELEGRAM__MODE", "webhook")
    monkeypatch.setenv("DISHBOT_TELEGRAM__WEBHOOK_URL", "https://bot.example.org:8080/telegram")
    report = doctor(capsys)
    assert report.line("telegram") == (
        "FAIL  telegram    webhook_url https://bot.example.org:8080/telegram is on port 8080, "
        "and Telegram posts only to ports 443, 80, 88, 8443 — put the public https:// URL on "
        "one of those ports in DISHBOT_TELEGRAM__WEBHOOK_URL"
    )
    assert report.status == 1


async def test_a_telegram_webhook_on_https_passes(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    telegram: TelegramEmulator,
) -> None:
    monkeypatch.setenv("DISHBOT_TELEGRAM__TOKEN", telegram.token)
    monkeypatch.setenv("DISHBOT_TELEGRAM__BASE_URL", telegram.base_url)
    monkeypatch.setenv("DISHBOT_TELEGRAM__MODE", "webhook")
    monkeypatch.setenv("DISHBOT_TELEGRAM__WEBHOOK_URL", "https://bot.example.org/telegram")
    report = await doctor_beside_servers(capsys)
    assert report.line("telegram") == (
        f"ok    telegram    @{DEFAULT_BOT_USERNAME} (webhook at https://bot.example.org/telegram)"
    )


# ----------------------------------------------------------------------------- discord


@pytest.fixture
async def discord_emulator() -> AsyncIterator[DiscordEmulator]:
    async with DiscordEmulator() as emulator:
        yield emulator


def test_no_discord_token_means_discord_is_off(capsys: pytest.CaptureFixture[str]) -> None:
    report = doctor(capsys)
    assert report.line("discord") == (
        "ok    discord     not set: Discord off (set DISHBOT_DISCORD__TOKEN)"
    )


async def test_discord_line_names_the_bot_it_logs_in_as(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    discord_emulator: DiscordEmulator,
) -> None:
    monkeypatch.setenv("DISHBOT_DISCORD__TOKEN", discord_emulator.token)
    monkeypatch.setenv("DISHBOT_DISCORD__API_BASE", discord_emulator.api_base)
    report = await doctor_beside_servers(capsys)
    assert report.line("discord") == (
        f"ok    discord     logged in as dishbot (id {discord_emulator.bot_id})"
    )
    assert discord_emulator.token not in report.text


async def test_a_rejected_discord_token_fails_without_showing_the_token(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    discord_emulator: DiscordEmulator,
) -> None:
    wrong = "MTIzNDU2Nzg5.reset.token-that-was-reset"
    monkeypatch.setenv("DISHBOT_DISCORD__TOKEN", wrong)
    monkeypatch.setenv("DISHBOT_DISCORD__API_BASE", discord_emulator.api_base)
    report = await doctor_beside_servers(capsys)
    assert report.line("discord") == (
        f"FAIL  discord     token rejected by {discord_emulator.base_url} (401) — set "
        "DISHBOT_DISCORD__TOKEN to the bot token from the Developer Portal (Bot → Token)"
    )
    assert wrong not in report.text
    assert report.status == 1


# ----------------------------------------------------------------------------- retraining


def test_dishbot_s_own_trainer_needs_peft(capsys: pytest.CaptureFixture[str]) -> None:
    report = doctor(capsys)
    assert report.line("retraining") == (
        "ok    retraining  dishbot's trainer (transformers + peft "
        f"{importlib.metadata.version('peft')})"
    )


@pytest.fixture
def xtuner_env(tmp_path: Path) -> Path:
    """An interpreter whose environment has XTuner (the stand-in), deepspeed and a torch that
    sees one CUDA GPU: what a training host's XTuner environment looks like to the check."""
    gpu = tmp_path / "gpu-env"
    (gpu / "torch").mkdir(parents=True)
    (gpu / "torch" / "__init__.py").write_text(
        '__version__ = "2.8.0+cu128"\n\n\n'
        "class cuda:\n"
        "    is_available = staticmethod(lambda: True)\n"
        "    device_count = staticmethod(lambda: 1)\n",
        encoding="utf-8",
    )
    (gpu / "deepspeed").mkdir()
    (gpu / "deepspeed" / "__init__.py").write_text("", encoding="utf-8")
    python = tmp_path / "xtuner-env" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(
        f'#!/bin/sh\nPYTHONPATH="{gpu}:{STANDIN}" exec "{sys.executable}" "$@"\n',
        encoding="utf-8",
    )
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return python


def test_xtuner_line_names_its_python_and_gpus(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, xtuner_env: Path
) -> None:
    monkeypatch.setenv("DISHBOT_TRAINING__TRAINER", "xtuner")
    monkeypatch.setenv("DISHBOT_TRAINING__PYTHON", str(xtuner_env))
    report = doctor(capsys)
    assert report.line("retraining") == (
        f"ok    retraining  XTuner 0.2.0+standin in {xtuner_env}, 1 CUDA GPU"
    )


def test_xtuner_without_a_gpu_is_a_warning_naming_the_python_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(STANDIN))  # XTuner, and this machine's CPU torch
    monkeypatch.setenv("DISHBOT_TRAINING__TRAINER", "xtuner")
    monkeypatch.setenv("DISHBOT_TRAINING__PYTHON", sys.executable)
    report = doctor(capsys)
    assert report.line("retraining") == (
        f"warn  retraining  XTuner 0.2.0+standin in {sys.executable}, but its torch sees no "
        "CUDA GPU (training.gpus = 1): XTuner trains only on CUDA — run it on a GPU host, or "
        "set DISHBOT_TRAINING__PYTHON to the python of an environment with XTuner"
    )
    assert report.status == 0  # the bot answers without retraining


def test_a_missing_xtuner_python_is_a_warning(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-env" / "bin" / "python"
    monkeypatch.setenv("DISHBOT_TRAINING__TRAINER", "xtuner")
    monkeypatch.setenv("DISHBOT_TRAINING__PYTHON", str(missing))
    report = doctor(capsys)
    assert report.line("retraining") == (
        f"warn  retraining  training.python = {missing} does not exist — set "
        "DISHBOT_TRAINING__PYTHON to the python of an environment with XTuner"
    )
    assert report.status == 0


# ----------------------------------------------------------------------------- disk


def test_disk_line_shows_the_free_space_under_the_data_dir(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = doctor(capsys).line("disk")
    assert line.endswith(f" GiB free under {Path('data').resolve()} (data_dir)")
    assert line.startswith(("ok    disk", "warn  disk"))  # a small CI disk only warns


def test_a_nearly_full_disk_fails() -> None:
    report = doctor_on(Probes(disk=lambda _path: DiskSpace(100 * GIB, GIB // 2)))
    assert report.line("disk") == (
        f"FAIL  disk        0.5 GiB free under {Path('data').resolve()} (data_dir) — free some "
        "space, or set DISHBOT_DATA_DIR elsewhere"
    )
    assert report.status == 1


def test_little_disk_space_is_a_warning() -> None:
    report = doctor_on(Probes(disk=lambda _path: DiskSpace(100 * GIB, 5 * GIB)))
    assert report.line("disk") == (
        f"warn  disk        5.0 GiB free under {Path('data').resolve()} (data_dir): a model "
        "download or a retraining run may not fit — free some space, or set DISHBOT_DATA_DIR "
        "(and HF_HOME) elsewhere"
    )
    assert report.status == 0


# ----------------------------------------------------------------------------- web


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_web_line_gives_the_console_s_address(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, free_port: int
) -> None:
    monkeypatch.setenv("DISHBOT_WEB__PORT", str(free_port))
    report = doctor(capsys)
    assert report.line("web") == (
        f"ok    web         127.0.0.1:{free_port} is free: the console will be at "
        f"http://127.0.0.1:{free_port}/"
    )


def test_a_taken_web_port_fails_naming_the_port_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, taken_port: int
) -> None:
    monkeypatch.setenv("DISHBOT_WEB__PORT", str(taken_port))
    report = doctor(capsys)
    assert report.line("web") == (
        f"FAIL  web         cannot listen on 127.0.0.1:{taken_port}: address already in use — "
        "stop what uses it, or set DISHBOT_WEB__PORT to a free port (0: any)"
    )
    assert report.status == 1


# ----------------------------------------------------------------------------- the command


def test_a_fresh_offline_machine_is_told_the_model_cannot_be_had(tmp_path: Path) -> None:
    """The whole command, as a user runs it: every check in order, and the one FAIL a fresh
    machine without the hub has, with what to set."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DISHBOT_", "HF_"))},
        "PYTHONPATH": str(REPO),
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "DISHBOT_WEB__PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "bot.cli", "doctor"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    names = [line.split()[1] for line in done.stdout.splitlines() if line[:1] in "owF" and line]
    assert names == [
        "python",
        "packages",
        "settings",
        "torch",
        "lmdeploy",
        "model",
        "database",
        "telegram",
        "discord",
        "retraining",
        "disk",
        "web",
    ]
    assert (
        "FAIL  model       the model OpenGVLab/InternVL3-1B-hf is not downloaded yet and the hub "
        "is switched off here (HF_HUB_OFFLINE=1): allow the download (unset HF_HUB_OFFLINE, or "
        "set HF_ENDPOINT to a mirror), or set DISHBOT_ENGINE__MODEL to a directory holding an "
        "InternVL model\n"
    ) in done.stdout
    assert done.stdout.endswith(
        "\n`dishbot run` cannot start or answer until the FAIL line above is fixed\n"
    )
    assert done.stderr == ""
    assert done.returncode == 1
