"""Getting the model ready in the background while the web console already serves.

`ModelStartup` chooses the model (the active version, on a fresh install the backend's
default), checks its format, downloads it into the Hugging Face cache, checks it fits in
memory and starts the engine with it. Its `status` says how far it is, in words a person
reads on the chat page, in ``/readyz`` and in the log; when the model cannot be had, the
words say what to set, and the process stays up so the operator can read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TextIO

from bot import model_source
from bot.engine_setup import check_format, cuda_available, resolve_backend_name
from bot.model_source import (
    MODEL_VARIABLE,
    DownloadProgress,
    ModelUnobtainable,
    check_name,
    downloaded_bytes,
    fetch,
    is_local,
    memory_problem,
    model_for,
    names_a_model,
    size_words,
)
from bot.settings import Settings
from bot.store import ModelVersionRecord, Store
from bot.training.versions import ensure_base_version, is_trained, model_spec
from engine.backends.worker_thread import on_own_thread
from engine.engine import Engine
from engine.errors import EngineError, ModelRefused
from engine.types import ModelSpec

log = logging.getLogger(__name__)

LOG_EVERY_PERCENT = 10  # without a terminal, one log line per this much of a download
BAR_WIDTH = 30
REDRAW_INTERVAL_S = 0.2
OPENAI_SETTINGS = (
    "check DISHBOT_ENGINE__OPENAI__API_KEY, DISHBOT_ENGINE__OPENAI__BASE_URL and "
    "DISHBOT_ENGINE__OPENAI__MODEL"
)
RETRY_FIRST_S = 5.0  # a failure that may mend by itself is tried again after this long,
RETRY_MAX_S = 300.0  # then twice as long each time, up to this


class Phase(StrEnum):
    """Where the model is on its way to answering."""

    STARTING = "starting"
    DOWNLOADING = "downloading"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class ModelStatus:
    """What the model is doing now, as a person should read it."""

    phase: Phase
    message: str
    done_bytes: int | None = None
    total_bytes: int | None = None
    retry_in_s: float | None = None  # a failure that is tried again then

    @property
    def ready(self) -> bool:
        """Whether questions can be answered."""
        return self.phase is Phase.READY

    def as_json(self) -> dict[str, object]:
        """The status as `/model-status` sends it."""
        return {
            "phase": self.phase.value,
            "message": self.message,
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "retry_in_s": self.retry_in_s,
            "ready": self.ready,
        }


def downloading_message(model: str, progress: DownloadProgress) -> str:
    """The line shown while the model downloads: "downloading the model X, 42% of 2.1 GB"."""
    total = progress.total_bytes
    if not total:
        return f"downloading the model {model}"
    percent = min(100, progress.done_bytes * 100 // total)
    return f"downloading the model {model}, {percent}% of {size_words(total)}"


StatusListener = Callable[[ModelStatus], None]


@dataclass(frozen=True)
class Problem:
    """Why the model cannot be served now, and whether trying again later may help."""

    words: str
    may_mend: bool = False


def ready_message(engine: Engine) -> str:
    """The ready line: the model version's name (not its path, which is nobody's business
    on a public page)."""
    return f"ready: answering with model version {engine.model.name}"


# Credentials in a URL: user:password@, and the values of its query string (?api-key=...).
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@", re.IGNORECASE)
_URL_QUERY = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s?#]+)\?[^\s#)]*", re.IGNORECASE)


# Shorter secrets are not searched for in free text: a weak password ("dishbot") would star
# out dishbot's own words, and so tell anyone what it is. In URLs they are starred out anyway.
MIN_SCRUBBED_LENGTH = 8


def scrubbed(text: str, secrets: Sequence[str]) -> str:
    """``text`` without ``secrets`` and without the credentials and query of any URL in it."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= MIN_SCRUBBED_LENGTH:
            text = text.replace(secret, "***")
    text = _URL_USERINFO.sub(r"\1***@", text)
    return _URL_QUERY.sub(r"\1?***", text)


def _failed(message: str) -> str:
    return f"the model cannot be served: {message}"


class ModelStartup:
    """Brings the engine's model from nothing to answering, saying how far it is."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        listeners: tuple[StatusListener, ...] = (),
        free_memory_of: Callable[[str], int | None] | None = None,
        log_failure: bool = True,
    ) -> None:
        """``listeners`` are told each change of `status`; ``free_memory_of`` says how much
        memory a device ("cpu", "cuda") has free; without ``log_failure`` a failure is only
        in `status` (for a caller that reports it itself)."""
        self.settings = settings
        self._secrets = settings.secret_values()
        self._log_failure = log_failure
        self.engine = engine
        self.status = ModelStatus(Phase.STARTING, "starting: choosing the model")
        self.active_version: ModelVersionRecord | None = None  # once chosen
        self._model_path: str | None = None
        self._listeners = listeners
        self._free_memory_of = free_memory_of or (lambda device: model_source.free_memory(device))

    def _set(self, status: ModelStatus) -> None:
        # What the public page and /readyz show: never a token, password or key that a
        # message quotes (a server's URL with its credentials, say).
        status = replace(status, message=scrubbed(status.message, self._secrets))
        self.status = status
        for listener in self._listeners:
            listener(status)

    def fail(self, message: str, retry_in_s: float | None = None) -> None:
        """Record that the model cannot be had, and why (logged with what to set); with
        ``retry_in_s``, that it is tried again then (the server or network may come back)."""
        if retry_in_s is not None:
            message = f"{message} (trying again in {retry_in_s:.0f} s)"
        if self._log_failure:
            log.log(logging.WARNING if retry_in_s else logging.ERROR, "%s", _failed(message))
        self._set(ModelStatus(Phase.FAILED, message, retry_in_s=retry_in_s))

    async def run(self, store: Store) -> bool:
        """Choose, fetch, check and load the model; True once the engine answers with it.

        A model that cannot be had ends in `Phase.FAILED` with the reason, not an exception.
        What may mend by itself (an openai server not up yet, the hub or the network down, a
        download cut short) is tried again, less and less often, until it works.
        """
        delay = RETRY_FIRST_S
        downloaded_before = 0
        while True:
            try:
                spec = await self._chosen_model(store)
            except ModelUnobtainable as exc:
                problem: Problem | None = Problem(str(exc), exc.may_mend)
            except Exception as exc:  # the database, say: try again, as for a server down
                log.exception("choosing the model failed")
                problem = Problem(f"choosing the model failed ({type(exc).__name__})", True)
            else:
                self._model_path = spec.path
                problem = await self._start(spec)
            if problem is None:
                return True
            problem = self._about_a_trained_version(problem)
            if not problem.may_mend:
                self.fail(problem.words)
                self.engine.abandon_start()  # questions now hear it is unavailable
                return False
            # A download that got further before it broke starts the wait from the beginning:
            # a link that drops every few minutes must not end up idle for minutes between.
            got_further = await asyncio.to_thread(downloaded_bytes, self._model_path)
            delay = RETRY_FIRST_S if got_further > downloaded_before else delay
            downloaded_before = max(downloaded_before, got_further)
            self.fail(problem.words, retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def start(self, spec: ModelSpec) -> bool:
        """Fetch, check and load ``spec``; True once the engine answers with it, False (and
        `Phase.FAILED` with the reason) when it cannot be had."""
        problem = await self._start(spec)
        if problem is not None:
            self.fail(problem.words)
        return problem is None

    async def _start(self, spec: ModelSpec) -> Problem | None:
        openai = resolve_backend_name(self.settings.engine) == "openai"
        try:
            check_format(self.settings, spec.path)
            if not openai:
                # The format is known for sure once config.json is here: before the weights.
                download = functools.partial(
                    fetch,
                    spec.path,
                    self._downloading(spec),
                    check=lambda _folder: check_format(self.settings, spec.path),
                )
                directory = await on_own_thread("model-download", download)
                # Off the event loop too: telling the device may import torch (seconds).
                await on_own_thread(
                    "memory-check", functools.partial(self._check_memory, spec, directory)
                )
            shown = spec.name if is_local(spec.path) else spec.path  # no path on a public page
            self._set(ModelStatus(Phase.LOADING, f"loading the model {shown}"))
            log.info("loading the model %s", spec.path)
            await self.engine.start(spec)
        except ModelUnobtainable as exc:
            return Problem(str(exc), exc.may_mend)
        except ModelRefused as exc:
            return Problem(f"{exc}: {OPENAI_SETTINGS}")
        except EngineError as exc:
            words = str(exc)
            if "DISHBOT_" not in words:  # it does not say what to set yet
                words += f"; set {MODEL_VARIABLE} to another model, or see `dishbot doctor`"
            return Problem(words, may_mend=openai)  # a server that is down may come up
        except MemoryError:
            return Problem(
                f"the machine ran out of memory loading the model: set {MODEL_VARIABLE} to a "
                "smaller checkpoint, or free memory"
            )
        except Exception as exc:  # a library's own error (CUDA out of memory, say): say it
            log.exception("loading the model %s failed", spec.path)
            return Problem(
                f"loading the model failed ({type(exc).__name__}: {exc}); set "
                f"{MODEL_VARIABLE} to another model, or see `dishbot doctor`"
            )
        self._set(ModelStatus(Phase.READY, ready_message(self.engine)))
        log.info("the model %s is ready", spec.path)
        return None

    def _about_a_trained_version(self, problem: Problem) -> Problem:
        """When the active version is a trained one, setting engine.model changes nothing
        (the trained version wins): say what does."""
        active = self.active_version
        if active is None or not is_trained(active):
            return problem
        words = (
            f"the active model version {active.name} is a trained one, which wins over "
            f"{MODEL_VARIABLE}, and it cannot be served here: {problem.words}. To serve the "
            "base model instead: `dishbot models activate base` (or `dishbot models rollback`), "
            "then restart dishbot"
        )
        return replace(problem, words=words)

    async def _chosen_model(self, store: Store) -> ModelSpec:
        """The active version's model; on a fresh install, the configured one, which for the
        openai backend with none named is the server's first model."""
        engine = self.settings.engine
        backend = resolve_backend_name(engine)
        model = model_for(engine, backend)
        if model is None:  # openai, nothing named: ask the server what it serves
            model = await self._served_model()
        elif backend != "openai":
            check_name(model)  # before a malformed one is kept as a version
        # A model the operator named wins over an untrained one the database had; a default
        # does not, so hosts whose `auto` lands on different backends do not take turns.
        named = names_a_model(engine, backend)
        active = await ensure_base_version(store, self.settings, model, repoint=named)
        self.active_version = active
        return model_spec(active)

    async def _served_model(self) -> str | None:
        base_url = self.settings.engine.openai.base_url
        try:
            await self.engine.backend.load(ModelSpec(path="", name=""))
            served = getattr(self.engine.backend, "model_name", None)
        except ModelRefused as exc:
            raise ModelUnobtainable(f"{exc}: {OPENAI_SETTINGS}") from None
        except EngineError as exc:
            raise ModelUnobtainable(
                f"{exc}: start the server, or set DISHBOT_ENGINE__OPENAI__BASE_URL to where it "
                "listens",
                may_mend=True,
            ) from None
        finally:
            await self.engine.backend.close()
        log.info("the openai server at %s serves %s", base_url, served)
        return served if isinstance(served, str) else None

    def _downloading(self, spec: ModelSpec) -> Callable[[DownloadProgress], None]:
        loop = asyncio.get_running_loop()

        def report(progress: DownloadProgress) -> None:  # called from the download's thread
            status = ModelStatus(
                Phase.DOWNLOADING,
                downloading_message(spec.path, progress),
                progress.done_bytes,
                progress.total_bytes,
            )
            # After a stop the loop may be closed while an abandoned download still runs.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._set, status)

        return report

    def _check_memory(self, spec: ModelSpec, directory: Path) -> None:
        device = self._device()
        problem = memory_problem(directory, device, self._free_memory_of(device), name=spec.path)
        if problem is not None:
            raise ModelUnobtainable(problem)

    def _device(self) -> str:
        backend = resolve_backend_name(self.settings.engine)
        if backend == "lmdeploy":
            return "cuda"
        device = self.settings.engine.device
        if device == "auto":
            return "cuda" if cuda_available() else "cpu"
        return device


def current_status(startup: ModelStartup | None, engine: Engine) -> ModelStatus:
    """How the model stands now: ``startup``'s word until it is ready, then the engine's."""
    if startup is not None and not startup.status.ready:
        return startup.status
    if engine.serving:
        return ModelStatus(Phase.READY, ready_message(engine))
    return ModelStatus(Phase.STARTING, "not loaded")


class TerminalStatus:
    """A `StatusListener` for the terminal: a download bar redrawn in place on a tty, and
    one log line per `LOG_EVERY_PERCENT` of it anywhere else (a log file, a container)."""

    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.stream = stream or sys.stderr
        self.is_tty = self.stream.isatty()
        self._clock = clock
        self._last_draw = float("-inf")
        self._logged_step = -1
        self._drawn = False

    def __call__(self, status: ModelStatus) -> None:
        if status.phase is not Phase.DOWNLOADING:
            self._end_bar()
            return
        if self.is_tty:
            self._draw(status)
            return
        step = _percent(status) // LOG_EVERY_PERCENT
        if step > self._logged_step:
            self._logged_step = step
            log.info("%s", status.message)

    def _draw(self, status: ModelStatus) -> None:
        now = self._clock()
        if now - self._last_draw < REDRAW_INTERVAL_S and _percent(status) < 100:
            return
        self._last_draw = now
        filled = BAR_WIDTH * _percent(status) // 100
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        self.stream.write(f"\r[{bar}] {status.message}\x1b[K")
        self.stream.flush()
        self._drawn = True

    def _end_bar(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _percent(status: ModelStatus) -> int:
    if not status.total_bytes or status.done_bytes is None:
        return 0
    return min(100, status.done_bytes * 100 // status.total_bytes)
