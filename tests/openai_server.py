"""A local OpenAI-compatible chat-completions server for tests and benchmarks.

It listens on 127.0.0.1 on a random port, lists its models at GET /v1/models and answers
POST /v1/chat/completions as a streamed ``text/event-stream``, like lmdeploy's api_server
and vLLM. Each request is recorded (body and headers) and answered as scripted:

    async with FakeOpenAIServer() as server:
        server.script(Reply(status=503), Reply(chunks=["Char ", "siu"]))
        ...  # point a client at server.url

Scripted replies are used in order, then ``default_reply``; set ``respond`` to choose a
reply from the request instead (for example to answer each question differently).

Faults: a reply with ``stall_before_headers`` or ``stall_after_chunks`` is a server that
hangs; `go_down` stops listening (connections are refused) and `come_back` listens again on
the same port, as a restarted server would.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

# How long a reply waiting for other requests to arrive waits before answering anyway; a
# guard against a hung test, never a measurement.
IN_FLIGHT_GUARD_S = 10.0

DATA_URL_PREFIX = "data:image/jpeg;base64,"


@dataclass(frozen=True)
class Reply:
    """How the server answers one chat-completions request.

    * ``chunks``: the answer's text pieces, one stream chunk each.
    * ``finish_reason``: sent in the last chunk ("stop" or "length").
    * ``status``: anything but 200 answers with an OpenAI-style error body carrying ``error``.
    * ``retry_after``: a Retry-After header for an error answer.
    * ``drop_connection``: hang up without answering at all.
    * ``drop_after_chunks``: stream this many chunks, then hang up mid-answer.
    * ``stall_before_headers``: never answer (until the client gives up or the server stops).
    * ``stall_after_chunks``: stream this many chunks, then send nothing more.
    * ``wait_for_in_flight``: start answering only once this many requests are in flight.
    * ``chunk_delay_s``: a pause before each chunk (for benchmarks that want a slow model).
    """

    chunks: Sequence[str] = ("This is char siu ", "(叉烧), ", "Cantonese barbecued pork.")
    finish_reason: str = "stop"
    status: int = 200
    error: str = "something went wrong"
    retry_after: str | None = None
    drop_connection: bool = False
    drop_after_chunks: int | None = None
    stall_before_headers: bool = False
    stall_after_chunks: int | None = None
    wait_for_in_flight: int = 0
    chunk_delay_s: float = 0.0

    @property
    def text(self) -> str:
        """The whole answer."""
        return "".join(self.chunks)


@dataclass
class RecordedRequest:
    """One chat-completions request as the server received it."""

    body: dict[str, Any]
    headers: dict[str, str]
    hung_up: bool = False  # the client went away before the answer was complete

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The conversation sent."""
        messages: list[dict[str, Any]] = self.body["messages"]
        return messages

    @property
    def question(self) -> str:
        """The text of the last user message."""
        return _text_of(self.messages[-1])

    @property
    def image_urls(self) -> list[str]:
        """Every image URL in the conversation, in order."""
        return [
            part["image_url"]["url"]
            for message in self.messages
            if isinstance(message["content"], list)
            for part in message["content"]
            if part.get("type") == "image_url"
        ]

    @property
    def prompt(self) -> str:
        """The text an lmdeploy api_server serving InternVL would tokenize for this request.

        Its ChatML template copies each message's text verbatim and writes an image as
        ``<img><IMG_CONTEXT></img>``; its tokenizer then reads any special token in the text
        as that token.
        """
        parts = []
        for message in self.messages:
            content = message["content"]
            if isinstance(content, str):
                text = content
            else:
                text = "".join(
                    part["text"] if part.get("type") == "text" else "<img><IMG_CONTEXT></img>\n"
                    for part in content
                )
            parts.append(f"<|im_start|>{message['role']}\n{text}<|im_end|>\n")
        return "".join(parts) + "<|im_start|>assistant\n"

    @property
    def images(self) -> list[bytes]:
        """The images, decoded from their ``data:image/jpeg;base64,`` URLs."""
        return [
            base64.b64decode(url.removeprefix(DATA_URL_PREFIX), validate=True)
            for url in self.image_urls
        ]


def _text_of(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


@dataclass
class FakeOpenAIServer:
    """A scriptable OpenAI-compatible server on 127.0.0.1; use it as an async context manager."""

    models: list[str] = field(default_factory=lambda: ["internvl2-2b"])
    default_reply: Reply = field(default_factory=Reply)
    respond: Callable[[RecordedRequest], Reply] | None = None
    models_status: int = 200

    requests: list[RecordedRequest] = field(default_factory=list, init=False)
    model_list_headers: list[dict[str, str]] = field(default_factory=list, init=False)
    in_flight: int = field(default=0, init=False)
    max_in_flight: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._scripted: deque[Reply] = deque()
        self._changed = asyncio.Condition()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port = 0

    @property
    def url(self) -> str:
        """The API root to configure a client with, ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self._port}/v1"

    @property
    def attempts(self) -> int:
        """How many chat-completions requests arrived."""
        return len(self.requests)

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, in order."""
        self._scripted.extend(replies)

    async def wait_for_hang_up(self, count: int = 1) -> None:
        """Wait until ``count`` requests were abandoned by the client mid-answer."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(
                    lambda: sum(request.hung_up for request in self.requests) >= count
                ),
                IN_FLIGHT_GUARD_S,
            )

    async def start(self) -> None:
        """Listen on a random port of 127.0.0.1 (the same one again after `go_down`)."""
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_post("/v1/chat/completions", self._chat)
        # handler_cancellation: a handler learns at once when its client hangs up, as
        # lmdeploy's and vLLM's servers do; a short shutdown keeps stalled handlers brief.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def go_down(self) -> None:
        """Stop listening, as a crashed server: new connections are refused."""
        await self.stop()
        self._runner = None

    async def come_back(self) -> None:
        """Listen again on the same port, as the server restarted."""
        await self.start()

    async def stop(self) -> None:
        """Release stalled answers and stop listening."""
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeOpenAIServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _list_models(self, request: web.Request) -> web.StreamResponse:
        self.model_list_headers.append(dict(request.headers))
        if self.models_status != 200:
            return _error_response(self.models_status, "models are unavailable", None)
        data = [
            {"id": name, "object": "model", "owned_by": "dishbot-tests"} for name in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    def _next_reply(self, recorded: RecordedRequest) -> Reply:
        if self._scripted:
            return self._scripted.popleft()
        if self.respond is not None:
            return self.respond(recorded)
        return self.default_reply

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        recorded = RecordedRequest(await request.json(), dict(request.headers))
        self.requests.append(recorded)
        reply = self._next_reply(recorded)
        await self._count_in_flight(+1)
        try:
            return await self._answer(request, reply)
        except (asyncio.CancelledError, ConnectionResetError):
            recorded.hung_up = True
            raise
        finally:
            await self._count_in_flight(-1)

    async def _count_in_flight(self, change: int) -> None:
        # Shielded: a handler cancelled by its client's hang-up must still be counted out.
        async def count() -> None:
            async with self._changed:
                self.in_flight += change
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                self._changed.notify_all()

        await asyncio.shield(count())

    async def _answer(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        if reply.wait_for_in_flight:
            await self._wait_for_in_flight(reply.wait_for_in_flight)
        if reply.drop_connection:
            return _hang_up(request)
        if reply.stall_before_headers:
            await self._stopping.wait()
        if reply.status != 200:
            return _error_response(reply.status, reply.error, reply.retry_after)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_event(_chunk({"role": "assistant", "content": ""}, None)))
        for sent, piece in enumerate(reply.chunks):
            if sent == reply.drop_after_chunks:
                return _hang_up(request, response)
            if sent == reply.stall_after_chunks:
                await self._stopping.wait()
            if reply.chunk_delay_s:
                await asyncio.sleep(reply.chunk_delay_s)
            await response.write(_event(_chunk({"content": piece}, None)))
        await response.write(_event(_chunk({}, reply.finish_reason)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _wait_for_in_flight(self, count: int) -> None:
        async with self._changed:
            # On timeout answer anyway; the test's max_in_flight assertion will tell.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.in_flight >= count), IN_FLIGHT_GUARD_S
                )


def _hang_up(
    request: web.Request, response: web.StreamResponse | None = None
) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.close()
    return response if response is not None else web.Response()


def _chunk(delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "internvl2-2b",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def _event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def _error_response(status: int, message: str, retry_after: str | None) -> web.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    error = {"message": message, "type": "invalid_request_error", "code": status}
    return web.json_response({"error": error}, status=status, headers=headers)


# -- a simulated model for load benchmarks ------------------------------------------------


@dataclass
class BatchingOpenAIServer(FakeOpenAIServer):
    """An OpenAI-compatible server that behaves like a continuously batching model server.

    Up to ``capacity`` answers generate at once; more wait for a free slot, in arrival order,
    as lmdeploy's and vLLM's schedulers make them. An answer takes ``prefill_s``, then
    ``token_s`` per token for ``answer_tokens`` tokens, one stream chunk each, whatever the
    batch size: a full batch costs no more per step (the GPU has room), so throughput is
    ``capacity / (prefill_s + answer_tokens * token_s)`` answers a second.

    ``instant()`` answers at once (no slot limit, no delays, the whole answer in one write):
    the model is then never the bottleneck, so what limits throughput is the bot.

    Requests are counted, not recorded (a load run sends thousands of photos); every answer
    starts with `ANSWER_MARK`, so a reader can tell a partial answer from the bot's own words.
    """

    capacity: int = 16
    prefill_s: float = 0.0
    token_s: float = 0.0
    answer_tokens: int = 24
    answered: int = field(default=0, init=False)
    hung_up: int = field(default=0, init=False)

    ANSWER_MARK = "[model]"

    @classmethod
    def instant(cls, answer_tokens: int = 24) -> BatchingOpenAIServer:
        """A model that answers at once: the bot's own cost is all that is left to measure."""
        return cls(capacity=1_000_000, answer_tokens=answer_tokens)

    @property
    def is_instant(self) -> bool:
        """Whether answers come at once (no prefill, no per-token delay)."""
        return self.prefill_s == 0 and self.token_s == 0

    async def start(self) -> None:
        """Listen on a random port of 127.0.0.1, with ``capacity`` generation slots."""
        self._slots = asyncio.Semaphore(self.capacity)
        await super().start()

    async def __aenter__(self) -> BatchingOpenAIServer:
        await self.start()
        return self

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()  # the photo and history: the simulated model reads nothing
        await self._count_in_flight(+1)
        try:
            async with self._slots:
                response = await self._generate(request)
            self.answered += 1
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            self.hung_up += 1
            raise
        finally:
            await self._count_in_flight(-1)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        pieces = [f"{self.ANSWER_MARK} "] + [f"dish{i} " for i in range(self.answer_tokens)]
        if self.is_instant:
            events = [_chunk({"role": "assistant", "content": ""}, None)]
            events += [_chunk({"content": piece}, None) for piece in pieces]
            events.append(_chunk({}, "stop"))
            await response.write(b"".join(_event(e) for e in events) + b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        await response.write(_event(_chunk({"role": "assistant", "content": ""}, None)))
        await asyncio.sleep(self.prefill_s)
        for piece in pieces:
            await asyncio.sleep(self.token_s)
            await response.write(_event(_chunk({"content": piece}, None)))
        await response.write(_event(_chunk({}, "stop")))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
