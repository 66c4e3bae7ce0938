"""The `openai` backend: answers through a remote OpenAI-compatible chat-completions server.

It speaks to `lmdeploy serve api_server`, `lmdeploy serve proxy` (which spreads requests over
many GPU hosts) or vLLM over HTTP with aiohttp. Every job is one streamed request; the server
does the batching, so jobs run independently and concurrently.

What it promises:

* Photos travel inline as ``data:image/jpeg;base64,...`` URLs, never as links: lmdeploy's
  server refuses URLs that resolve to private addresses, and the photo lives here anyway.
* User text is sent with its control tokens broken (`engine.prompts`): the server copies it
  into its template verbatim and its tokenizer would read ``<|im_end|>`` or
  ``<IMG_CONTEXT>`` there as the real token. The server's tokenizer is unknown here, so the
  generic ChatML and InternVL tokens are the ones broken.
* A request that fails before the user saw any text (connection dropped, HTTP 5xx, 429) is
  retried with exponential backoff; once text has been streamed a failure fails the job,
  because retrying would show the user a second, different beginning. Other 4xx answers are
  never retried. 400, 413 and 422 (this request is malformed or too large) fail the job with
  `RequestRefused` and the server's own message: the request's fault, so the engine's circuit
  breaker does not count it. Any other (401/403: the API key is refused; 404/405: base_url
  has no chat-completions endpoint) would refuse every question alike, so it fails the job
  with `GenerationFailed`, a backend fault, in words an operator can act on.
* A server that is down fails the job at once, without retries: a refused connection, or
  one that cannot be opened within ``connect_timeout_s``. Waiting to retry would only make
  the user wait for the same failure; the engine's circuit breaker decides when to try again.
* A server that hangs fails the job after ``stall_timeout_s`` without a byte (no response
  headers, or no further token), well before ``request_timeout_s``, the longest a whole
  attempt may take. Neither is retried, since another attempt would only double the wait.
* A job whose ``cancelled`` event is set has its response closed at once (the server sees
  the hang-up and stops generating), yields no more text and ends with
  ``JobFailed(index, Cancelled(...))``.
* Closing the `generate` stream early cancels and closes every request still in flight.
* The API key is sent as a bearer token and is never logged (nor shown by the config's repr).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from engine.errors import (
    Cancelled,
    GenerationFailed,
    ModelLoadFailed,
    ModelRefused,
    RequestRefused,
)
from engine.images import DecodedImage, encode_jpeg
from engine.prompts import build_messages, to_openai_messages
from engine.types import (
    BackendEvent,
    GenerationJob,
    JobDelta,
    JobFailed,
    JobFinished,
    ModelSpec,
)

logger = logging.getLogger(__name__)

# A server may ask for a longer pause with Retry-After; past this the user would rather get
# an apology than wait.
MAX_RETRY_DELAY_S = 30.0

# How much of a server's error body goes into an error message or a log line.
ERROR_EXCERPT_CHARS = 500
# 4xx answers about the request itself (malformed, too large, a prompt over the context);
# any other 4xx (a refused API key, a wrong base_url) would refuse every question alike.
REQUEST_FAULT_STATUSES = frozenset({400, 413, 422})

Emit = Callable[[BackendEvent], None]


@dataclass(frozen=True, slots=True)
class OpenAIConfig:
    """Where the OpenAI-compatible server is and how to talk to it.

    * ``base_url``: the API root, version included, e.g. ``http://gpu1:23333/v1``.
    * ``api_key``: sent as ``Authorization: Bearer ...`` when set; hidden from ``repr``.
    * ``model``: the server-side model name; None resolves it at `OpenAIBackend.load`.
    * ``max_concurrency``: requests in flight at once (the backend's capacity).
    * ``request_timeout_s``: the longest one attempt may take, streaming included.
    * ``connect_timeout_s``: the longest opening a connection may take.
    * ``stall_timeout_s``: the longest the server may send nothing (before its answer
      starts, or between two pieces of it) before the job fails as stalled.
    * ``max_retries``: further attempts after a retryable failure (0: never retry).
    * ``retry_backoff_s``: the first pause before a retry; it doubles on each further one.
    """

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    model: str | None = None
    max_concurrency: int = 16
    request_timeout_s: float = 120.0
    connect_timeout_s: float = 10.0
    stall_timeout_s: float = 30.0
    max_retries: int = 3
    retry_backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if not self.base_url:
            raise ValueError("base_url must name the server, e.g. http://localhost:23333/v1")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if min(self.request_timeout_s, self.connect_timeout_s, self.stall_timeout_s) <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_retries < 0 or self.retry_backoff_s < 0:
            raise ValueError("max_retries and retry_backoff_s must not be negative")


class _RetryableError(Exception):
    """A failure worth another attempt, as long as the user has seen no text yet."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class _AnswerText:
    """One job's answer so far; hands each piece on unless the job has been cancelled."""

    def __init__(self, index: int, job: GenerationJob, emit: Emit) -> None:
        self._index = index
        self._job = job
        self._emit = emit
        self._parts: list[str] = []

    @property
    def started(self) -> bool:
        """Whether the user may already have seen some of this answer."""
        return bool(self._parts)

    @property
    def text(self) -> str:
        """Everything streamed so far."""
        return "".join(self._parts)

    def add(self, piece: str) -> None:
        """Record ``piece`` and stream it on."""
        # The cancel watcher may not have run yet; the engine has already told the user.
        if self._job.cancelled.is_set():
            return
        self._parts.append(piece)
        self._emit(JobDelta(self._index, piece))


class OpenAIBackend:
    """A `Backend` that forwards every job to an OpenAI-compatible chat-completions server."""

    name = "openai"

    def __init__(self, config: OpenAIConfig) -> None:
        self._config = config
        self._base_url = config.base_url.rstrip("/")
        # For log lines and messages: credentials in the URL must not leak either.
        self._shown_url = str(URL(self._base_url).with_user(None))
        self._session: aiohttp.ClientSession | None = None
        self._model_name: str | None = None
        # Requests in flight, so that close() can stop them rather than wait out a timeout.
        self._answering: set[asyncio.Task[JobFinished | JobFailed]] = set()

    @property
    def capacity(self) -> int:
        """How many requests may be in flight at once."""
        return self._config.max_concurrency

    @property
    def max_batches(self) -> int:
        """Every request is independent (the server batches), so as many as ``capacity``."""
        return self._config.max_concurrency

    @property
    def model_name(self) -> str | None:
        """The server-side model name requests use; None until a model is loaded."""
        return self._model_name

    async def load(self, model: ModelSpec) -> None:
        """Check the server is reachable and choose the model name to request.

        The name is `OpenAIConfig.model` if set, else ``model.path`` (or ``model.name``) if
        the server lists it, else the first model the server lists. Raises
        `ModelLoadFailed` if the server cannot be reached or lists no models.
        """
        session = self._session or self._open_session()
        try:
            available = await self._list_models(session)
        except ModelLoadFailed:
            if self._model_name is None:
                # Nothing was ever served through this session: leave nothing open.
                await session.close()
                self._session = None
            raise
        self._session = session
        self._model_name = self._choose_model(model, available)
        logger.debug("openai backend at %s serves model %r", self._shown_url, self._model_name)

    async def generate(self, jobs: Sequence[GenerationJob]) -> AsyncGenerator[BackendEvent, None]:
        """Answer every job concurrently, streaming events tagged with each job's index.

        Each job ends with exactly one `JobFinished` or `JobFailed`. Closing this stream early
        cancels every request still in flight and closes its connection.
        """
        session, model_name = self._session, self._model_name
        if session is None or model_name is None:
            for index in range(len(jobs)):
                yield JobFailed(index, GenerationFailed("the openai backend has no model loaded"))
            return
        events: asyncio.Queue[BackendEvent] = asyncio.Queue()
        tasks = [
            asyncio.create_task(
                self._run_job(session, model_name, index, job, events.put_nowait),
                name=f"openai-job-{index}",
            )
            for index, job in enumerate(jobs)
        ]
        unfinished = len(tasks)
        try:
            while unfinished:
                event = await events.get()
                if not isinstance(event, JobDelta):
                    unfinished -= 1
                yield event
        finally:
            # Reached early when the consumer closes the stream: no request may outlive it.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stop the requests in flight (their jobs fail) and close the HTTP session."""
        session, self._session, self._model_name = self._session, None, None
        answering = list(self._answering)
        for task in answering:
            task.cancel()
        await asyncio.gather(*answering, return_exceptions=True)
        if session is not None:
            await session.close()

    def _open_session(self) -> aiohttp.ClientSession:
        headers = {}
        if self._config.api_key:
            headers["Authorization"] = f"Bearer {self._config.api_key}"
        # sock_read restarts with every byte received: it catches a server that hangs.
        timeout = aiohttp.ClientTimeout(
            total=self._config.request_timeout_s,
            connect=self._config.connect_timeout_s,
            sock_read=self._config.stall_timeout_s,
        )
        # No pool limit: the scheduler already keeps requests within `capacity`, and a
        # limit here would make a model swap's GET /models queue behind long answers.
        connector = aiohttp.TCPConnector(limit=0)
        return aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector)

    async def _list_models(self, session: aiohttp.ClientSession) -> list[str]:
        where = f"the OpenAI-compatible server at {self._shown_url}"
        try:
            async with session.get(f"{self._base_url}/models") as response:
                if response.status != 200:
                    message = await _error_message(response)
                    refused = (
                        ModelRefused if response.status in (401, 403, 404) else ModelLoadFailed
                    )
                    raise refused(f"{where} answered {response.status} to GET /models: {message}")
                payload = await response.json(content_type=None)
        except TimeoutError as error:
            raise ModelLoadFailed(f"{where} timed out listing its models") from error
        except aiohttp.ClientError as error:
            raise ModelLoadFailed(f"cannot reach {where}: {error}") from error
        except ValueError as error:
            raise ModelLoadFailed(f"{where} sent a model list that is not JSON") from error
        models = _model_ids(payload)
        if not models:
            raise ModelLoadFailed(f"{where} lists no models")
        return models

    def _choose_model(self, model: ModelSpec, available: list[str]) -> str:
        configured = self._config.model
        if configured is not None:
            if configured not in available:
                # A proxy may route names it does not list; trust the operator, but say so.
                logger.warning(
                    "the server at %s does not list the configured model %r (it lists %s)",
                    self._shown_url,
                    configured,
                    available,
                )
            return configured
        for candidate in (model.path, model.name):
            if candidate in available:
                return candidate
        logger.warning(
            "the server at %s does not list %r; using its first model %r",
            self._shown_url,
            model.path,
            available[0],
        )
        return available[0]

    async def _run_job(
        self,
        session: aiohttp.ClientSession,
        model_name: str,
        index: int,
        job: GenerationJob,
        emit: Emit,
    ) -> None:
        """Answer one job and emit its final event, whatever happens short of cancellation."""
        try:
            final = await self._answer_unless_cancelled(session, model_name, index, job, emit)
        except Exception:
            # A bug, not a server failure: the user still gets an apology, the operator a trace.
            logger.exception("job %d: the openai backend failed unexpectedly", index)
            final = JobFailed(index, GenerationFailed("the openai backend failed unexpectedly"))
        emit(final)

    async def _answer_unless_cancelled(
        self,
        session: aiohttp.ClientSession,
        model_name: str,
        index: int,
        job: GenerationJob,
        emit: Emit,
    ) -> JobFinished | JobFailed:
        if job.cancelled.is_set():
            return JobFailed(index, Cancelled("the question was cancelled before it was sent"))
        answer = _AnswerText(index, job, emit)
        # The event is watched beside the request, so a stalled stream is dropped at once
        # instead of at its next chunk.
        answering = asyncio.create_task(
            self._answer(session, model_name, index, job, answer), name=f"openai-request-{index}"
        )
        self._answering.add(answering)
        answering.add_done_callback(self._answering.discard)
        watching = asyncio.create_task(job.cancelled.wait())
        try:
            await asyncio.wait((answering, watching), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (answering, watching):
                task.cancel()
            # Waiting for the loser makes sure its response is closed before we report.
            await asyncio.gather(answering, watching, return_exceptions=True)
        if job.cancelled.is_set():
            logger.debug("job %d: cancelled after %d characters", index, len(answer.text))
            return JobFailed(index, Cancelled("the question was cancelled"))
        if answering.cancelled():
            return JobFailed(index, GenerationFailed("the openai backend was closed"))
        return answering.result()

    async def _answer(
        self,
        session: aiohttp.ClientSession,
        model_name: str,
        index: int,
        job: GenerationJob,
        answer: _AnswerText,
    ) -> JobFinished | JobFailed:
        body = await _request_body(job, model_name)
        url = f"{self._base_url}/chat/completions"
        attempts = self._config.max_retries + 1
        for attempt in range(1, attempts + 1):
            if session.closed:
                # close() while this job waited to retry: an ordinary end, not a bug.
                return JobFailed(index, GenerationFailed("the openai backend was closed"))
            logger.debug(
                "job %d: attempt %d of %d to %s/chat/completions",
                index,
                attempt,
                attempts,
                self._shown_url,
            )
            try:
                finish_reason = await self._stream_once(session, url, body, answer)
                return JobFinished(index, answer.text, finish_reason)
            except GenerationFailed as error:
                logger.warning("job %d failed: %s", index, error)
                return JobFailed(index, error)
            except _RetryableError as error:
                if answer.started:
                    logger.warning(
                        "job %d failed mid-answer after %d characters, not retried: %s",
                        index,
                        len(answer.text),
                        error,
                    )
                    return JobFailed(index, GenerationFailed(str(error)))
                if attempt == attempts:
                    logger.warning("job %d failed after %d attempt(s): %s", index, attempt, error)
                    return JobFailed(index, GenerationFailed(str(error)))
                delay = self._retry_delay(attempt, error.retry_after_s)
                logger.warning("job %d: %s; retrying in %.2f s", index, error, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt always returns")

    def _retry_delay(self, attempt: int, retry_after_s: float | None) -> float:
        backoff = self._config.retry_backoff_s * 2.0 ** (attempt - 1)
        if retry_after_s is not None:
            backoff = max(backoff, retry_after_s)
        return min(backoff, MAX_RETRY_DELAY_S)

    async def _stream_once(
        self,
        session: aiohttp.ClientSession,
        url: str,
        body: dict[str, object],
        answer: _AnswerText,
    ) -> str:
        """One attempt: stream the answer into ``answer`` and return the finish reason."""
        try:
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    raise await _status_error(response, self._shown_url)
                try:
                    return await _read_stream(response, answer)
                except BaseException:
                    # A half-read stream cannot be reused; dropping the connection tells the
                    # server to stop generating for it (this is also how cancellation lands).
                    response.close()
                    raise
        except aiohttp.ConnectionTimeoutError as error:
            raise GenerationFailed(
                f"cannot reach {self._shown_url}: connecting timed out after "
                f"{self._config.connect_timeout_s:g} s"
            ) from error
        except aiohttp.SocketTimeoutError as error:
            raise GenerationFailed(
                f"the server at {self._shown_url} stopped responding: nothing for "
                f"{self._config.stall_timeout_s:g} s"
            ) from error
        except TimeoutError as error:
            # The attempt's whole time budget is spent; another one would only double the wait.
            raise GenerationFailed(
                f"the server at {self._shown_url} timed out: no complete answer within "
                f"{self._config.request_timeout_s:g} s"
            ) from error
        except aiohttp.ClientConnectorError as error:
            raise GenerationFailed(f"cannot reach {self._shown_url}: {error.os_error}") from error
        except aiohttp.ClientError as error:
            raise _RetryableError(
                f"lost the connection to {self._shown_url}: {error or type(error).__name__}"
            ) from error


async def _request_body(job: GenerationJob, model_name: str) -> dict[str, object]:
    """The chat-completions request for ``job``; JPEG encoding runs off the event loop."""
    image_urls = await asyncio.to_thread(_data_urls, job.images)
    messages = build_messages(job.system_prompt, job.history, job.question, len(job.images))
    params = job.params
    body: dict[str, object] = {
        "model": model_name,
        "messages": to_openai_messages(messages, image_urls),
        "stream": True,
        "max_tokens": params.max_new_tokens,
    }
    if params.do_sample:
        body.update(temperature=params.temperature, top_p=params.top_p)
    else:
        # temperature 0 means greedy to vLLM; lmdeploy samples from its top_k (default 40)
        # unless told top_k=1. Both servers accept both fields.
        body.update(temperature=0.0, top_p=1.0, top_k=1)
    return body


def _data_urls(images: Sequence[DecodedImage]) -> list[str]:
    return [
        "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(image.image)).decode("ascii")
        for image in images
    ]


async def _status_error(response: aiohttp.ClientResponse, shown_url: str) -> Exception:
    """The error for a non-200 answer: retryable for 429 and 5xx; `RequestRefused` (the
    request's fault) when the server cannot take this one request; otherwise a backend fault,
    since every other question would be turned away the same way."""
    message = await _error_message(response)
    status = response.status
    if status == 429 or status >= 500:
        return _RetryableError(f"the server answered {status}: {message}", _retry_after_s(response))
    if status in REQUEST_FAULT_STATUSES:
        return RequestRefused(f"the server refused the request ({status}): {message}")
    if status in (401, 403):
        return GenerationFailed(
            f"the model server at {shown_url} refused the API key ({status}): {message}"
        )
    if status in (404, 405):
        return GenerationFailed(
            f"the model server at {shown_url} has no chat-completions endpoint ({status}): "
            f"check base_url: {message}"
        )
    return GenerationFailed(f"the model server at {shown_url} answered {status}: {message}")


async def _error_message(response: aiohttp.ClientResponse) -> str:
    """The server's own words: OpenAI's error.message, lmdeploy's message, FastAPI's detail."""
    text = (await response.text(errors="replace")).strip()
    try:
        payload = json.loads(text)
    except ValueError:
        return text[:ERROR_EXCERPT_CHARS] or response.reason or "no details"
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:ERROR_EXCERPT_CHARS]
        for key in ("message", "detail", "error"):
            if isinstance(payload.get(key), str):
                return str(payload[key])[:ERROR_EXCERPT_CHARS]
    return text[:ERROR_EXCERPT_CHARS]


def _retry_after_s(response: aiohttp.ClientResponse) -> float | None:
    # Only the delta-seconds form; an HTTP date is rare enough to fall back to backoff.
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None


async def _read_stream(response: aiohttp.ClientResponse, answer: _AnswerText) -> str:
    """Read the server-sent events into ``answer``; return "stop" or "length"."""
    finish_reason: str | None = None
    async with aclosing(_event_data(response.content)) as events:
        async for data in events:
            if data == "[DONE]":
                return finish_reason or "stop"
            choice = _first_choice(_parse_chunk(data))
            if choice is None:
                continue  # e.g. a usage-only chunk
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                answer.add(content)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                finish_reason = _finish_reason(reason)
    if finish_reason is not None:
        return finish_reason  # some servers end the stream without [DONE]
    raise _RetryableError("the server's stream ended before the answer was complete")


async def _event_data(stream: aiohttp.StreamReader) -> AsyncGenerator[str, None]:
    """The data of each server-sent event, in order (comments and other fields skipped)."""
    data_lines: list[str] = []
    async for raw_line in stream:
        # Lines split on b"\n", which never occurs inside a UTF-8 multibyte character.
        line = raw_line.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data_lines:
                yield "\n".join(data_lines)
                data_lines = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data_lines.append(value.removeprefix(" "))
    if data_lines:
        yield "\n".join(data_lines)


def _parse_chunk(data: str) -> dict[str, object]:
    try:
        chunk = json.loads(data)
    except ValueError as error:
        raise GenerationFailed(
            f"the server sent a malformed stream chunk: {data[:ERROR_EXCERPT_CHARS]!r}"
        ) from error
    if not isinstance(chunk, dict):
        raise GenerationFailed(f"the server sent an unexpected stream chunk: {data[:100]!r}")
    reported = chunk.get("error")
    if reported is not None or chunk.get("object") == "error":
        # Servers report failures that happen after the 200 header inside the stream.
        message = reported.get("message") if isinstance(reported, dict) else chunk.get("message")
        raise GenerationFailed(f"the server failed while answering: {message or reported}")
    return chunk


def _first_choice(chunk: dict[str, object]) -> dict[str, object] | None:
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    return choices[0]


def _finish_reason(reason: str) -> str:
    if reason == "length":
        return "length"
    if reason in ("error", "abort"):
        raise GenerationFailed(f"the server ended the answer with finish_reason {reason!r}")
    return "stop"


def _model_ids(payload: object) -> list[str]:
    """The model ids of a GET /models answer, in the server's order."""
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        return []
    return [
        entry["id"]
        for entry in payload["data"]
        if isinstance(entry, dict) and isinstance(entry.get("id"), str)
    ]
