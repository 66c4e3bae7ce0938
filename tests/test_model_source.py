"""Which model each backend serves by default, what format a model is in, and whether it fits."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.error
from email.message import Message
from pathlib import Path
from typing import Any, ClassVar

import pytest

from bot import model_source
from bot.engine_setup import build_engine, configured_model_path
from bot.model_source import (
    DEFAULT_MODELS,
    ModelFormat,
    ModelUnobtainable,
    fetch,
    format_problem,
    locate,
    memory_problem,
    model_for,
    model_format,
)
from bot.settings import Settings, load_settings


def _settings(**engine: object) -> Settings:
    return load_settings(engine=engine)


def _checkpoint(path: Path, architecture: str, dtype: str = "bfloat16", size: int = 0) -> Path:
    path.mkdir(parents=True)
    config = {"architectures": [architecture], "torch_dtype": dtype}
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"\0" * size)
    return path


def test_each_backend_serves_its_own_default_model() -> None:
    assert configured_model_path(_settings(backend="lmdeploy")) == "OpenGVLab/InternVL2-2B"
    assert configured_model_path(_settings(backend="transformers")) == "OpenGVLab/InternVL3-1B-hf"


def test_auto_on_a_machine_without_a_gpu_serves_the_hf_native_default() -> None:
    # No lmdeploy and no CUDA here: auto is the transformers backend, with a model it can run.
    assert configured_model_path(_settings()) == "OpenGVLab/InternVL3-1B-hf"
    assert format_problem("transformers", configured_model_path(_settings())) is None


def test_the_openai_backend_asks_for_what_the_server_serves_unless_told() -> None:
    assert model_for(_settings(backend="openai").engine, "openai") is None
    named = _settings(backend="openai", openai={"model": "internvl2"})
    assert model_for(named.engine, "openai") == "internvl2"


def test_an_explicit_model_always_wins(tmp_path: Path) -> None:
    for backend in ("lmdeploy", "transformers", "openai"):
        settings = _settings(backend=backend, model=str(tmp_path))
        assert configured_model_path(settings) == str(tmp_path)


def test_the_default_models_are_in_the_format_their_backend_runs() -> None:
    assert model_format(DEFAULT_MODELS["lmdeploy"]) is ModelFormat.REMOTE_CODE
    assert model_format(DEFAULT_MODELS["transformers"]) is ModelFormat.HF_NATIVE


def test_a_local_model_is_known_by_its_config(tmp_path: Path, tiny_internvl: Path) -> None:
    remote = _checkpoint(tmp_path / "internvl2", "InternVLChatModel")

    assert model_format(str(remote)) is ModelFormat.REMOTE_CODE
    assert model_format(str(tiny_internvl)) is ModelFormat.HF_NATIVE
    assert model_format(str(tmp_path / "nothing-here")) is None


def test_a_remote_code_model_on_transformers_gets_one_line_naming_the_format_and_a_checkpoint(
    tmp_path: Path,
) -> None:
    remote = _checkpoint(tmp_path / "internvl2", "InternVLChatModel")

    problem = format_problem("transformers", str(remote))

    assert problem is not None
    assert "\n" not in problem
    assert "transformers' native format (InternVLForConditionalGeneration" in problem
    assert "DISHBOT_ENGINE__MODEL=OpenGVLab/InternVL3-1B-hf" in problem
    assert f"{remote} is in OpenGVLab's own format" in problem


def test_an_hf_native_model_on_lmdeploy_turbomind_names_the_format_it_needs(
    tiny_internvl: Path,
) -> None:
    problem = format_problem("lmdeploy", str(tiny_internvl))

    assert problem is not None
    assert "OpenGVLab's own format (InternVLChatModel)" in problem
    assert "DISHBOT_ENGINE__MODEL=OpenGVLab/InternVL2-2B" in problem
    # lmdeploy's pytorch engine and an openai server are not second-guessed.
    assert format_problem("lmdeploy", str(tiny_internvl), "pytorch") is None
    assert format_problem("openai", "OpenGVLab/InternVL2-2B") is None


def test_building_an_engine_for_a_model_in_the_wrong_format_is_refused_before_loading() -> None:
    settings = _settings(backend="transformers", model="OpenGVLab/InternVL2-2B")

    with pytest.raises(ModelUnobtainable, match="InternVL3-1B-hf"):
        build_engine(settings)


def test_a_directory_without_a_model_is_refused_with_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(ModelUnobtainable, match=r"no config\.json.*DISHBOT_ENGINE__MODEL"):
        fetch(str(tmp_path))


def test_a_local_model_is_served_from_where_it_is(tiny_internvl: Path) -> None:
    assert fetch(str(tiny_internvl)) == tiny_internvl
    assert locate(str(tiny_internvl)) == tiny_internvl


def test_offline_a_hub_model_not_downloaded_yet_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    with pytest.raises(ModelUnobtainable) as refused:
        fetch("OpenGVLab/InternVL3-1B-hf")

    message = str(refused.value)
    assert "OpenGVLab/InternVL3-1B-hf is not downloaded yet" in message
    assert "HF_HUB_OFFLINE" in message
    assert "DISHBOT_ENGINE__MODEL" in message
    assert locate("OpenGVLab/InternVL3-1B-hf") is None


def test_a_model_too_big_for_the_free_memory_says_how_much_and_what_to_set(
    tmp_path: Path,
) -> None:
    model = _checkpoint(tmp_path / "big", "InternVLForConditionalGeneration", size=1000)

    # bf16 weights load as float32 on a CPU: twice their size, and some room besides.
    problem = memory_problem(model, "cpu", available=2000, name="big/model")
    fits = memory_problem(model, "cpu", available=10_000)
    on_gpu = memory_problem(model, "cuda", available=1500)

    assert problem is not None
    assert problem.startswith("not enough memory to load big/model")
    assert "DISHBOT_ENGINE__MODEL" in problem
    assert fits is None
    assert on_gpu is None  # on a GPU, bf16 stays bf16


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every GET: the hub redirects to its CDN, the CDN sends the bytes asked for."""

    seen: ClassVar[list[tuple[str, str | None]]] = []
    cdn: ClassVar[str] = ""
    body: ClassVar[bytes] = b"0123456789" * 100

    def do_GET(self) -> None:
        self.seen.append((self.headers["Host"], self.headers.get("Authorization")))
        if self.path.startswith("/hub/"):
            self.send_response(302)
            self.send_header("Location", self.cdn + "/cdn/weights")
            self.end_headers()
            return
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
        part = self.body[start:]
        self.send_response(206)
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        self.wfile.write(part)

    def log_message(self, *args: object) -> None:
        pass


def test_the_hub_token_is_not_sent_on_to_the_host_a_download_is_redirected_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    port = server.server_address[1]
    _Recorder.seen.clear()
    _Recorder.cdn = f"http://localhost:{port}"  # another host name: another origin
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    partial = tmp_path / "weights.partial"
    partial.write_bytes(_Recorder.body[:400])  # a download cut short earlier
    try:
        model_source._append_from(f"http://127.0.0.1:{port}/hub/weights", partial, 400, 10)
    finally:
        server.shutdown()

    hub, cdn = _Recorder.seen
    assert hub == (f"127.0.0.1:{port}", "Bearer hf_secret_token")
    assert cdn == (f"localhost:{port}", None)
    assert partial.read_bytes() == _Recorder.body  # and it went on from byte 400


@pytest.mark.parametrize("code", [429, 500, 503])
def test_a_busy_or_failing_hub_is_tried_again_later_and_a_refusal_is_not(
    code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def answering(status: int) -> Any:
        def append_from(url: str, partial: Path, have: int, timeout_s: float) -> None:
            raise urllib.error.HTTPError(url, status, "no", Message(), None)

        return append_from

    snapshot = tmp_path / "hub" / "models--org--m" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    weights = model_source._HubFile(5 << 20, "b" * 64)
    outcomes = {}
    for status in (code, 404):
        monkeypatch.setattr(model_source, "_append_from", answering(status))
        with pytest.raises(ModelUnobtainable) as refused:
            model_source._fetch_resumably("org/m", snapshot, "model.safetensors", weights, 1.0)
        outcomes[status] = refused.value

    assert outcomes[code].may_mend  # `dishbot run` tries again by itself
    assert f"answered {code}" in str(outcomes[code])
    assert not outcomes[404].may_mend
    assert "DISHBOT_ENGINE__MODEL" in str(outcomes[404])


@pytest.mark.parametrize("model", ["OpenGVLab/InternVL2 2B", "OpenGVLab/InternVL2--2B"])
def test_a_malformed_hub_id_is_named_as_such_and_not_tried_again(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # never asked

    with pytest.raises(ModelUnobtainable) as refused:
        fetch(model)

    assert "is neither a directory here nor a Hugging Face hub id" in str(refused.value)
    assert not refused.value.may_mend
