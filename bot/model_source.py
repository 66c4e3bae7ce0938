"""Where the served model comes from: the default per backend, its format, the download.

A model is a local directory or a Hugging Face hub repository id. A repository is fetched
into the hub's own cache (``HF_HOME``), which resumes an interrupted download and is shared
with every other tool on the machine. Every problem is a `ModelUnobtainable` whose message
is one line saying what is wrong and what to set.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import logging
import os
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bot.errors import DishbotError
from bot.settings import EngineSettings

log = logging.getLogger(__name__)

MODEL_VARIABLE = "DISHBOT_ENGINE__MODEL"
# The mission's model, in OpenGVLab's own (remote-code) format, which lmdeploy serves.
LMDEPLOY_DEFAULT = "OpenGVLab/InternVL2-2B"
# The smallest InternVL checkpoint in transformers' native format (no remote code): 1 B
# parameters, about 2 GB of bf16 weights, so it loads in a few GB of RAM and answers on a CPU.
TRANSFORMERS_DEFAULT = "OpenGVLab/InternVL3-1B-hf"
DEFAULT_MODELS = {"lmdeploy": LMDEPLOY_DEFAULT, "transformers": TRANSFORMERS_DEFAULT}
# What a model needs to be served; anything else in a repository (other weight formats,
# images of the model card) is not downloaded.
MODEL_FILES = ("*.json", "*.safetensors", "*.py", "*.model", "*.txt", "*.jinja", "*.tiktoken")
WEIGHT_FILES = "*.safetensors"
HUB_TIMEOUT_S = 10.0
# Files at least this big are downloaded so that a restart goes on where the last one stopped.
RESUMABLE_BYTES = 2**20
RESUME_ATTEMPTS = 5  # connections dropped in one download before it gives up until next start
PARTIAL_SUFFIX = ".partial"
CHUNK_BYTES = 2**20
GB = 1e9
# Loading needs the weights and some room beside them (activations, the tokenizer, Python).
MEMORY_MARGIN = 1.2


class ModelFormat(StrEnum):
    """How a checkpoint's code and weights are laid out."""

    REMOTE_CODE = "remote-code"  # OpenGVLab's InternVLChatModel, code shipped in the repo
    HF_NATIVE = "hf-native"  # transformers' own InternVLForConditionalGeneration

    @property
    def described(self) -> str:
        if self is ModelFormat.REMOTE_CODE:
            return "OpenGVLab's own format (InternVLChatModel)"
        return "transformers' native format (InternVLForConditionalGeneration, the -hf checkpoints)"


ARCHITECTURES = {
    "InternVLChatModel": ModelFormat.REMOTE_CODE,
    "InternVLForConditionalGeneration": ModelFormat.HF_NATIVE,
}


class ModelUnobtainable(DishbotError):
    """The model cannot be had here: not found, not downloadable, the wrong format, or too
    big for this machine. The message says what to set. ``may_mend``: it may work when tried
    again later (the network or a server was down, a download was cut short)."""

    def __init__(self, message: str, *, may_mend: bool = False) -> None:
        super().__init__(message)
        self.may_mend = may_mend


@dataclass(frozen=True)
class DownloadProgress:
    """How far a download is: bytes on disk of ``total_bytes`` (None until known)."""

    done_bytes: int
    total_bytes: int | None


ProgressCallback = Callable[[DownloadProgress], None]


def model_for(engine: EngineSettings, backend: str) -> str | None:
    """The model to serve: ``engine.model`` when set, else the backend's default. For the
    openai backend, ``engine.openai.model`` or None (the server's first model)."""
    if engine.model:
        return engine.model
    if backend == "openai":
        return engine.openai.model
    return DEFAULT_MODELS[backend]


def names_a_model(engine: EngineSettings, backend: str) -> bool:
    """Whether the operator named the model (rather than leaving the backend's default):
    ``engine.model``, or ``engine.openai.model`` for the openai backend."""
    return engine.model is not None or (backend == "openai" and engine.openai.model is not None)


def is_local(model: str) -> bool:
    """Whether ``model`` names a directory rather than a hub repository ("owner/name")."""
    if model.startswith(("/", ".", "~")):
        return True
    return model.count("/") != 1 or Path(model).expanduser().is_dir()


def _architectures_format(config_file: Path) -> ModelFormat | None:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    for name in architectures or ():
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    return None


def model_format(model: str) -> ModelFormat | None:
    """The format of ``model``, from its config.json (a local directory or the hub cache),
    else from its name when it is one of OpenGVLab's; None when that cannot be told here."""
    if is_local(model):
        return _architectures_format(Path(model).expanduser() / "config.json")
    cached = _cached_file(model, "config.json")
    if cached is not None:
        return _architectures_format(cached)
    owner, name = model.split("/")
    if owner == "OpenGVLab" and name.startswith("InternVL"):
        return ModelFormat.HF_NATIVE if name.lower().endswith("-hf") else ModelFormat.REMOTE_CODE
    return None


def needed_format(backend: str, lmdeploy_engine: str = "turbomind") -> ModelFormat | None:
    """The format ``backend`` runs; None when it runs either (or the server decides)."""
    if backend == "transformers":
        return ModelFormat.HF_NATIVE
    if backend == "lmdeploy" and lmdeploy_engine == "turbomind":
        return ModelFormat.REMOTE_CODE
    return None


def format_problem(backend: str, model: str, lmdeploy_engine: str = "turbomind") -> str | None:
    """One line when ``model`` is known to be in a format ``backend`` cannot run, naming the
    format it needs and a checkpoint that has it."""
    needed = needed_format(backend, lmdeploy_engine)
    found = model_format(model)
    if needed is None or found is None or found is needed:
        return None
    example = DEFAULT_MODELS[backend]
    other = "lmdeploy" if backend == "transformers" else "transformers"
    return (
        f"the {backend} backend needs a model in {needed.described}, such as {example}; "
        f"{model} is in {found.described}: set {MODEL_VARIABLE}={example} "
        f"(or serve {model} with the {other} backend)"
    )


def check_name(model: str) -> None:
    """Raise `ModelUnobtainable` unless ``model`` is a directory or a well-formed hub id."""
    if is_local(model):
        return
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

    try:
        validate_repo_id(model)
    except ValueError:
        raise ModelUnobtainable(
            f"{model!r} is neither a directory here nor a Hugging Face hub id (owner/name): "
            f"set {MODEL_VARIABLE} to one, such as {TRANSFORMERS_DEFAULT}"
        ) from None


def _cached_file(repo_id: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a well-formed hub id: nothing of it is cached
        return None
    return Path(found) if isinstance(found, str) else None


def locate(model: str) -> Path | None:
    """``model``'s directory when it is here already: a local directory, or a complete
    snapshot in the hub cache (config and weights, nothing half-downloaded)."""
    if is_local(model):
        path = Path(model).expanduser()
        return path if path.is_dir() else None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(
            snapshot_download(model, local_files_only=True, allow_patterns=list(MODEL_FILES))
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return folder if _complete(folder) else None


def _complete(folder: Path) -> bool:
    """Whether ``folder`` holds a whole model: its config, and every weights file (each shard
    its index names); a link into the cache whose blob is missing does not count."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return bool(shards) and all((folder / shard).is_file() for shard in shards)
    return any(path.is_file() for path in folder.glob(WEIGHT_FILES))


def _repo_cache(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def reachability_problem(model: str, timeout_s: float = HUB_TIMEOUT_S) -> str | None:
    """None when the hub answers for the repository ``model``; else one line with the fix."""
    try:
        _hub_files(model, timeout_s)
    except ModelUnobtainable as exc:
        return str(exc)
    return None


def _not_here(model: str, why: str, *, may_mend: bool = False) -> ModelUnobtainable:
    return ModelUnobtainable(
        f"the model {model} is not downloaded yet and {why}: allow the download (unset "
        f"HF_HUB_OFFLINE, or set HF_ENDPOINT to a mirror), or set {MODEL_VARIABLE} to a "
        "directory holding an InternVL model",
        may_mend=may_mend,
    )


def _hub_files(model: str, timeout_s: float) -> _HubRepo:
    """The files of ``model`` dishbot needs, with their sizes, as the hub lists them."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if _offline():
        raise _not_here(model, "the hub is switched off here (HF_HUB_OFFLINE=1)")
    try:
        info = HfApi().model_info(model, files_metadata=True, timeout=timeout_s)
    except GatedRepoError:
        raise _gated(model) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ModelUnobtainable(
            f"there is no model {model} on the Hugging Face hub (or it is private: set "
            f"HF_TOKEN): set {MODEL_VARIABLE} to an InternVL model that exists, "
            f"such as {TRANSFORMERS_DEFAULT}"
        ) from None
    except OfflineModeIsEnabled:
        raise _not_here(model, "the hub is switched off here (HF_HUB_OFFLINE=1)") from None
    except ValueError:  # HFValidationError: not a repository id at all
        raise ModelUnobtainable(
            f"{model!r} is neither a directory here nor a Hugging Face hub id (owner/name): "
            f"set {MODEL_VARIABLE} to one, such as {TRANSFORMERS_DEFAULT}"
        ) from None
    except Exception as exc:  # connection refused, DNS, TLS, timeouts, 5xx
        why = f"the hub cannot be reached ({type(exc).__name__})"
        raise _not_here(model, why, may_mend=True) from None
    return _HubRepo(
        model,
        {
            sibling.rfilename: _HubFile(
                sibling.size or 0, sibling.lfs.sha256 if sibling.lfs is not None else None
            )
            for sibling in info.siblings or ()
            if _wanted(sibling.rfilename)
        },
    )


@dataclass(frozen=True)
class _HubFile:
    size: int
    sha256: str | None  # large (LFS) files: the name of their blob in the cache


@dataclass(frozen=True)
class _HubRepo:
    repo_id: str
    files: dict[str, _HubFile]

    @property
    def total_bytes(self) -> int:
        return sum(file.size for file in self.files.values())


def _gated(model: str) -> ModelUnobtainable:
    return ModelUnobtainable(
        f"the model {model} is gated on the Hugging Face hub: accept its terms on its page "
        f"there and set HF_TOKEN to a token of that account, or set {MODEL_VARIABLE} to "
        "another model"
    )


def _refused(error: Exception) -> bool:
    """Whether the hub refused a file for want of access (a gated or private repository)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    if isinstance(error, GatedRepoError):
        return True
    response = getattr(error, "response", None) if isinstance(error, HfHubHTTPError) else None
    return getattr(response, "status_code", None) in (401, 403)


def _wanted(name: str) -> bool:
    return "/" not in name and any(fnmatch(name, pattern) for pattern in MODEL_FILES)


def fetch(
    model: str,
    progress: ProgressCallback | None = None,
    *,
    poll_s: float = 0.5,
    timeout_s: float = HUB_TIMEOUT_S,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """``model``'s directory, downloading it into the hub cache first when it is a repository
    not (completely) there yet; ``progress`` is called from time to time while it downloads.
    ``check`` is called with the directory once its small files (config.json) are there and
    before the weights download, to refuse a model early (say, in the wrong format).

    Blocking: call it in a thread. Raises `ModelUnobtainable`.
    """
    if is_local(model):
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise ModelUnobtainable(
                f"there is no model in {path} (no config.json): set {MODEL_VARIABLE} to a "
                f"directory holding an InternVL model, or to a hub id such as "
                f"{TRANSFORMERS_DEFAULT}"
            )
        return path
    try:
        repo = _hub_files(model, timeout_s)
    except ModelUnobtainable:
        cached = locate(model)  # offline or unreachable: a complete copy here still serves
        if cached is None:
            raise
        return cached
    if not any(fnmatch(name, WEIGHT_FILES) for name in repo.files):
        raise ModelUnobtainable(
            f"the hub's {model} has no .safetensors weights: set {MODEL_VARIABLE} to an "
            f"InternVL checkpoint such as {TRANSFORMERS_DEFAULT}"
        )
    return _download(repo, progress, poll_s, timeout_s, check)


def _download(
    repo: _HubRepo,
    progress: ProgressCallback | None,
    poll_s: float,
    timeout_s: float,
    check: Callable[[Path], None] | None,
) -> Path:
    model, total_bytes = repo.repo_id, repo.total_bytes
    blobs = _repo_cache(model) / "blobs"
    done = threading.Event()

    def report() -> None:
        while not done.wait(poll_s):
            if progress is not None:
                progress(DownloadProgress(min(_bytes_in(blobs), total_bytes), total_bytes))

    reporter = threading.Thread(target=report, name="model-download-progress", daemon=True)
    reporter.start()
    try:
        large = {
            name: file
            for name, file in repo.files.items()
            if file.sha256 is not None and file.size >= RESUMABLE_BYTES
        }
        # The small files (configs, tokenizer, code) first, as the hub's library keeps them,
        # with the snapshot's refs; then the large ones beside them, each resumable. One by
        # one on this (daemon) thread: the library's own pool of threads would keep a
        # process that was told to stop alive until they finish.
        small = [name for name in repo.files if name not in large]
        folder = _fetch_small_files(model, small)
        if check is not None:
            check(folder)
        for name, file in large.items():
            _fetch_resumably(model, folder, name, file, timeout_s)
    except ModelUnobtainable:
        raise
    except OSError as exc:  # the hub library's HTTP errors are OSErrors too
        if _refused(exc):
            raise _gated(model) from None
        if exc.errno == errno.ENOSPC:
            raise ModelUnobtainable(
                f"not enough disk space to download {model} ({size_words(total_bytes)}) into "
                f"{_repo_cache(model).parent}: free some, or set HF_HOME to a bigger disk"
            ) from None
        raise ModelUnobtainable(
            f"downloading {model} failed ({exc}); it goes on from where it stopped",
            may_mend=True,
        ) from None
    except Exception as exc:
        raise ModelUnobtainable(
            f"downloading {model} failed ({type(exc).__name__}: {exc}); it goes on from "
            "where it stopped",
            may_mend=True,
        ) from None
    finally:
        done.set()
        reporter.join()
    if progress is not None:
        progress(DownloadProgress(total_bytes, total_bytes))
    return folder


def _fetch_small_files(model: str, names: list[str]) -> Path:
    """Download ``names`` of ``model`` into the hub cache, one after the other; the
    snapshot's folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import disable_progress_bars  # type: ignore[attr-defined]

    disable_progress_bars()  # dishbot draws one bar for the whole model, not one per file
    folder: Path | None = None
    for name in sorted(names, key=lambda name: name != "config.json"):  # the config first
        folder = Path(hf_hub_download(model, name)).parent
    assert folder is not None, "a model has a config.json"
    return folder


def _fetch_resumably(
    repo_id: str, snapshot: Path, name: str, file: _HubFile, timeout_s: float
) -> None:
    """Download one large file into the hub cache's blob for it, going on from the bytes a
    download cut short (a restart, a dropped connection) left in ``<blob>.partial``, and
    checking its sha256; then link it into the snapshot as the hub's library does.

    (huggingface_hub downloads into a file unique to its process and deletes it when it
    fails, so without this a restart fetches a half-downloaded 2 GB file from its first byte.)
    """
    from huggingface_hub import hf_hub_url

    assert file.sha256 is not None
    blob = _repo_cache(repo_id) / "blobs" / file.sha256
    pointer = snapshot / name
    if not blob.is_file():
        partial = blob.with_name(blob.name + PARTIAL_SUFFIX)
        partial.parent.mkdir(parents=True, exist_ok=True)
        url = hf_hub_url(repo_id, name, revision=snapshot.name)  # the snapshot's commit
        for _attempt in range(RESUME_ATTEMPTS):
            have = partial.stat().st_size if partial.exists() else 0
            if have >= file.size:
                break
            try:
                _append_from(url, partial, have, timeout_s)
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):
                    raise _gated(repo_id) from None
                busy = exc.code in (408, 429) or exc.code >= 500  # the hub's trouble: wait
                raise ModelUnobtainable(
                    f"the hub answered {exc.code} when asked for {name} of {repo_id}"
                    + ("" if busy else f": set {MODEL_VARIABLE} to another model"),
                    may_mend=busy,
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    raise
                if isinstance(getattr(exc, "reason", None), ssl.SSLError):
                    raise ModelUnobtainable(
                        f"the TLS certificate of the server {name} comes from is not trusted "
                        f"here ({exc}): set SSL_CERT_FILE to your CA bundle, or set "
                        f"{MODEL_VARIABLE} to a local directory"
                    ) from None
                log.warning("downloading %s was cut short (%s); going on", name, exc)
        if not partial.exists() or partial.stat().st_size < file.size:
            raise ModelUnobtainable(
                f"downloading {name} of {repo_id} kept being cut short; it goes on from "
                "where it stopped",
                may_mend=True,
            )
        if _sha256_of(partial) != file.sha256:
            partial.unlink()
            raise ModelUnobtainable(
                f"{name} of {repo_id} arrived damaged (its sha256 does not match); it is "
                "downloaded again",
                may_mend=True,
            )
        os.replace(partial, blob)
    if not pointer.exists():
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.unlink(missing_ok=True)  # a dangling link
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))


def _append_from(url: str, partial: Path, have: int, timeout_s: float) -> None:
    """Write what ``url`` has from byte ``have`` on at the end of ``partial``."""
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    headers = {**build_hf_headers(), "Range": f"bytes={have}-"}
    request = urllib.request.Request(url, headers=headers)
    opener = urllib.request.build_opener(_TokenStaysHome)
    with opener.open(request, timeout=max(timeout_s, 60.0)) as response:
        if have and response.status != 206:  # the server sent it all again: start over
            have = 0
        with partial.open("r+b" if have else "wb") as out:
            out.seek(have)
            out.truncate()
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)


class _TokenStaysHome(urllib.request.HTTPRedirectHandler):
    """Follows the hub's redirects (to its CDN) without taking the hub token (HF_TOKEN) to
    another host, as urllib otherwise would."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        redirected = super().redirect_request(req, fp, code, msg, headers, newurl)
        if redirected is not None and urlsplit(newurl).netloc != urlsplit(req.full_url).netloc:
            redirected.remove_header("Authorization")
        return redirected


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def size_words(count: int) -> str:
    """``count`` bytes in the unit that shows them: "2.1 GB", "35 MB", "512 kB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            shown = count / scale
            return f"{shown:.1f} {unit}" if shown < 10 else f"{shown:.0f} {unit}"
    return f"{count} B"


def downloaded_bytes(model: str | None) -> int:
    """Bytes of ``model`` in the hub cache so far, finished or not (0 for a directory)."""
    if model is None or is_local(model):
        return 0
    return _bytes_in(_repo_cache(model) / "blobs")


def _bytes_in(folder: Path) -> int:
    total = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        try:
            total += entry.stat().st_size
        except OSError:
            continue  # renamed from .incomplete meanwhile
    return total


def weights_bytes(model_dir: Path) -> int:
    """The size of the weights in ``model_dir``."""
    return sum(path.stat().st_size for path in model_dir.glob(WEIGHT_FILES))


def _stored_in_16_bits(model_dir: Path) -> bool:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    dtype = config.get("torch_dtype") or config.get("dtype") if isinstance(config, dict) else None
    return dtype in ("bfloat16", "float16")


def memory_needed(model_dir: Path, device: str) -> int:
    """Bytes of memory loading ``model_dir`` on ``device`` takes, roughly: the weights, twice
    over on a CPU, where 16-bit weights are loaded as float32."""
    factor = 2 if device == "cpu" and _stored_in_16_bits(model_dir) else 1
    return int(weights_bytes(model_dir) * factor * MEMORY_MARGIN)


def free_memory(device: str) -> int | None:
    """Bytes free on ``device`` ("cpu" or "cuda"), None when that cannot be told."""
    if device.startswith("cuda"):
        try:
            import torch

            return int(torch.cuda.mem_get_info()[0])
        except Exception:
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_problem(
    model_dir: Path, device: str, available: int | None = None, name: str | None = None
) -> str | None:
    """One line when ``model_dir`` (the model ``name``) does not fit in the memory free on
    ``device`` (``available`` bytes, when given)."""
    free = free_memory(device) if available is None else available
    needed = memory_needed(model_dir, device)
    if free is None or needed <= free:
        return None
    where = "GPU memory" if device.startswith("cuda") else "memory"
    return (
        f"not enough {where} to load {name or model_dir.name}: it needs about "
        f"{size_words(needed)} and "
        f"{size_words(free)} is free; free some, or set {MODEL_VARIABLE} to a smaller "
        f"checkpoint such as {TRANSFORMERS_DEFAULT}"
    )
