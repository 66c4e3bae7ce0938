"""The Engine: one shared model behind a fair queue, serving many users at once.

Use it as an async context manager::

    async with Engine(backend, ModelSpec(path, name), EngineConfig()) as engine:
        handle = await engine.submit(Request(key="telegram:42", images=(photo,), question=q))
        async for event in handle:      # Queued(ahead), TextDelta(text), then Answer
            ...

Errors reach the caller as typed exceptions: `BadImage`, `QueueFull`, `TooManyPending`,
`PromptTooLong` and `ModelUnavailable` from `submit`; `DeadlineExceeded`, `Cancelled`,
`GenerationFailed`, `ModelUnavailable` or `EngineClosed` from iterating the handle. Every
accepted request ends exactly once.

A circuit breaker (`engine.circuit`) watches the backend: after ``circuit_failures`` backend
faults in a row, new questions are refused with `ModelUnavailable` and those waiting in the
queue end with it at once; after ``circuit_reset_s`` one question probes the backend, and its
answer reopens the service. A backend fault is a failed generation, a request the model had
a fair share of its time for (`STALL_SHARE`) without saying a word, or a request that expired
in the queue because stalled requests still hold every batch (a stuck in-process backend).

A conversation longer than the model's context (``context_tokens``) is trimmed oldest turns
first (`engine.context`); the handle's ``turns_left_out`` says how many were left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import statistics
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from engine.backends.base import Backend
from engine.circuit import CircuitBreaker, CircuitState
from engine.context import fit_history
from engine.errors import (
    BadImage,
    Cancelled,
    DeadlineExceeded,
    EngineClosed,
    EngineError,
    GenerationFailed,
    GenerationStalled,
    ModelLoadFailed,
    ModelNotReady,
    ModelUnavailable,
    RequestRefused,
)
from engine.images import DECODE_TIME_BUDGET_S, DecodedImage, keep_image_memory, load_image
from engine.prompts import system_prompt_for
from engine.scheduler import Scheduler, Ticket, TicketState
from engine.types import (
    GenerationJob,
    GenerationParams,
    ImageInfo,
    JobDelta,
    JobFailed,
    JobFinished,
    ModelSpec,
    Turn,
)

log = logging.getLogger(__name__)

STATS_WINDOW = 1000  # recent requests the wait and service figures are computed over
# A request that ends at its deadline without a word is a stalled backend (a fault the circuit
# counts) only if the model had at least this share of the request's time for it; one that
# was started late, after a long queue, just ran out of time.
STALL_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Queue limits and defaults of an engine (the bot fills it from its settings)."""

    max_pending: int = 256
    max_pending_per_key: int = 3
    max_tiles: int = 6
    max_new_tokens: int = 512
    request_timeout_s: float = 120.0
    load_timeout_s: float = 600.0
    max_images_per_request: int = 4
    max_concurrent_decodes: int = 2
    decode_time_budget_s: float = DECODE_TIME_BUDGET_S
    circuit_failures: int = 5  # backend faults in a row that open the circuit
    circuit_reset_s: float = 30.0  # how long it stays open before a probe may pass
    # Prompt plus answer, in tokens: the conversation is trimmed to fit (`engine.context`).
    # lmdeploy's session_len; a remote server's --session-len or --max-model-len.
    context_tokens: int = 8192


@dataclass(frozen=True, slots=True)
class Request:
    """A question about one or more photos, from one fairness ``key`` (e.g. "telegram:42").

    ``images`` are the encoded files as received. ``timeout_s`` bounds queueing plus
    generation (default: the engine's). ``params.max_new_tokens`` is capped by the engine.
    """

    key: str
    question: str
    images: tuple[bytes, ...] = ()
    history: tuple[Turn, ...] = ()
    params: GenerationParams = field(default_factory=GenerationParams)
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class Queued:
    """The request is waiting; ``ahead`` requests will be served before it."""

    ahead: int


@dataclass(frozen=True, slots=True)
class Started:
    """The model has started on the request."""


@dataclass(frozen=True, slots=True)
class TextDelta:
    """More of the answer."""

    text: str


@dataclass(frozen=True, slots=True)
class Answer:
    """The whole answer; the last event of a request that succeeded."""

    text: str
    model: str
    finish_reason: str
    queued_s: float
    service_s: float


Event = Queued | Started | TextDelta | Answer


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's load and recent performance."""

    model: str
    waiting: int
    in_flight: int
    capacity: int
    completed: int
    failed: int
    timed_out: int
    cancelled: int
    wait_p50_s: float | None
    wait_p95_s: float | None
    service_p50_s: float | None
    service_p95_s: float | None
    circuit: str  # "closed", "open" (questions refused) or "half_open" (probing)


class RequestHandle:
    """What `Engine.submit` returns: iterate it for events; `cancel` to give up."""

    def __init__(self, cancel: Callable[[int], bool]) -> None:
        self.id = 0  # set when the engine admits the request
        self.images: tuple[ImageInfo, ...] = ()  # the submitted photos, as decoded
        # The oldest turns of the history left out so the conversation fits the context.
        self.turns_left_out = 0
        self._events: asyncio.Queue[Event | EngineError] = asyncio.Queue()
        self._cancel = cancel
        self._done = False

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while not self._done:
            item = await self._events.get()
            if isinstance(item, EngineError):
                self._done = True
                raise item
            if isinstance(item, Answer):
                self._done = True
            yield item

    async def result(self) -> Answer:
        """Wait for the answer, ignoring progress events; raises the request's error."""
        async for event in self:
            if isinstance(event, Answer):
                return event
        raise EngineClosed("the request ended without an answer")  # pragma: no cover

    def cancel(self) -> None:
        """Give up on the request; its iterator then raises `Cancelled`."""
        self._cancel(self.id)

    def _put(self, item: Event | EngineError) -> None:
        self._events.put_nowait(item)


@dataclass(eq=False)
class _Work:
    """The engine's bookkeeping for one admitted request."""

    handle: RequestHandle
    images: tuple[DecodedImage, ...]
    request: Request
    job: GenerationJob | None = None
    text: list[str] = field(default_factory=list)
    last_position: int | None = None
    deadline_timer: asyncio.TimerHandle | None = None
    probe: bool = False  # admitted as the half-open circuit's probe
    stalled: bool = False  # ended at its deadline as `GenerationStalled`


def _percentile(values: Sequence[float], fraction: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(fraction * 100) - 1]


class Engine:
    """Serves questions about photos with one backend, fairly, within limits."""

    def __init__(
        self,
        backend: Backend,
        model: ModelSpec,
        config: EngineConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.config = config or EngineConfig()
        self._model = model
        self._clock = clock
        self._scheduler: Scheduler[_Work] = Scheduler(
            max_pending=self.config.max_pending,
            max_pending_per_key=self.config.max_pending_per_key,
            capacity=backend.capacity,
            clock=clock,
        )
        self._tickets: dict[int, Ticket[_Work]] = {}
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        # Each batch in flight and its tickets (which may end before the batch does).
        self._batches: dict[asyncio.Task[None], list[Ticket[_Work]]] = {}
        self._batch_done = asyncio.Event()
        self._paused = False
        self._closed = True
        self._started = False  # once true, a closed engine is stopped, not yet to start
        self._swap_lock = asyncio.Lock()
        self._announced_at = -1
        self._decoding: Counter[str] = Counter()
        self._decode_slots = asyncio.Semaphore(self.config.max_concurrent_decodes)
        self._decode_turns: dict[str, asyncio.Lock] = {}  # per key, while it has decodes
        self._counts = {"completed": 0, "failed": 0, "timed_out": 0, "cancelled": 0}
        self._waits: deque[float] = deque(maxlen=STATS_WINDOW)
        self._services: deque[float] = deque(maxlen=STATS_WINDOW)
        self._circuit = CircuitBreaker(
            failures_to_open=self.config.circuit_failures,
            reset_s=self.config.circuit_reset_s,
            clock=clock,
        )

    # -- life cycle -----------------------------------------------------------------------

    @property
    def model(self) -> ModelSpec:
        """The model being served."""
        return self._model

    @property
    def serving(self) -> bool:
        """Whether the model is loaded and questions are taken (between start and stop)."""
        return not self._closed

    async def start(self, model: ModelSpec | None = None) -> None:
        """Load the model (``model``, when given, instead of the one it was made with) and
        start serving. Until then `submit` raises `ModelNotReady`."""
        keep_image_memory()
        model = model or self._model
        await self._load(model)
        self._model = model
        self._closed = False
        self._started = True
        self._dispatcher = asyncio.create_task(self._dispatch_forever(), name="engine-dispatch")

    def abandon_start(self) -> None:
        """The model will not be loaded (it cannot be had): from now on questions are refused
        with `EngineClosed` ("not running"), no longer with `ModelNotReady` ("not yet")."""
        if self._closed:
            self._started = True

    async def stop(self) -> None:
        """Stop serving: end every open request with `EngineClosed`, then free the model."""
        self._closed = True
        self._started = True  # a stopped engine is closed for good, not "not ready"
        for ticket in list(self._tickets.values()):
            if ticket.payload.job is not None:
                ticket.payload.job.cancelled.set()
            self._end(ticket, EngineClosed("the engine is shutting down"))
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        tasks = [t for t in (self._dispatcher, *self._batches) if t is not None]
        for task in tasks:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, Exception):
                log.error("an engine task had failed: %r", outcome)
        self._batch_done.set()  # a swap waiting for batches sees the engine closed
        async with self._swap_lock:  # and a swap that is loading finishes before the close
            await self.backend.close()

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _load(self, model: ModelSpec) -> None:
        try:
            await asyncio.wait_for(self.backend.load(model), self.config.load_timeout_s)
        except TimeoutError:
            raise ModelLoadFailed(
                f"loading {model.name} took longer than {self.config.load_timeout_s:.0f} s"
            ) from None

    async def swap_model(self, model: ModelSpec) -> None:
        """Serve ``model`` from now on, without dropping any request.

        Dispatch pauses, requests already generating finish on the old model, the backend
        loads the new one (freeing the old), and the queue resumes. If the new model fails
        to load, the old one is loaded again and `ModelLoadFailed` is raised.
        """
        async with self._swap_lock:
            self._paused = True
            try:
                while self._batches and not self._closed:
                    self._batch_done.clear()
                    await self._batch_done.wait()
                if self._closed:
                    raise EngineClosed("the engine stopped before the model could be swapped")
                previous = self._model
                try:
                    await self._load(model)
                except BaseException as exc:
                    # Backends free the old model before loading a new one, so whatever
                    # went wrong (cancellation included), put the old one back.
                    log.exception("loading %s failed; going back to %s", model.name, previous.name)
                    await self._load(previous)
                    if isinstance(exc, ModelLoadFailed | asyncio.CancelledError):
                        raise
                    raise ModelLoadFailed(f"could not load {model.name}: {exc}") from exc
                self._model = model
                log.info("now serving %s", model.name)
            finally:
                self._paused = False
                self._wakeup.set()

    # -- requests -------------------------------------------------------------------------

    async def submit(self, request: Request) -> RequestHandle:
        """Admit a request and return its handle.

        Raises `ModelNotReady` before `start`; `EngineClosed` after `stop`, `QueueFull` or
        `TooManyPending` when it is refused,
        `ModelUnavailable` while the backend is failing (the circuit is open), `BadImage`
        when a photo cannot be used (decoded off the event loop), and `PromptTooLong` when
        the question and photos alone do not fit the model's context.
        The history is trimmed to fit, oldest turns first (see ``handle.turns_left_out``).
        """
        if not self._started:
            raise ModelNotReady("the model is not loaded yet")
        if self._closed:
            raise EngineClosed("the engine is not running")
        if self._circuit.refusing():
            raise ModelUnavailable(self._circuit.retry_after_s())
        if len(request.images) > self.config.max_images_per_request:
            raise BadImage(f"at most {self.config.max_images_per_request} photos per question")
        # Refuse before the costly decode, counting requests still decoding as pending.
        self._scheduler.check_admission(
            request.key,
            also_pending=self._decoding[request.key],
            also_waiting=sum(self._decoding.values()),
        )
        self._decoding[request.key] += 1
        try:
            images = tuple([await self._decode(request.key, data) for data in request.images])
        finally:
            self._decoding[request.key] -= 1
            if not self._decoding[request.key]:
                del self._decoding[request.key]
                self._decode_turns.pop(request.key, None)  # nobody holds or awaits it now
        if self._closed:
            raise EngineClosed("the engine is not running")
        history = self._fit_history(request, images)
        # Asked again: the circuit may have opened, or a probe left, while photos decoded.
        if not self._circuit.allow():
            raise ModelUnavailable(self._circuit.retry_after_s())
        handle = RequestHandle(self.cancel)
        handle.images = tuple(
            ImageInfo(image.source_format, *image.source_size) for image in images
        )
        handle.turns_left_out = len(request.history) - len(history)
        request = dataclasses.replace(request, history=history)
        work = _Work(handle=handle, images=images, request=request, probe=self._circuit.probing)
        timeout = self.config.request_timeout_s if request.timeout_s is None else request.timeout_s
        ticket = self._scheduler.admit(request.key, work, timeout_s=timeout)
        handle.id = ticket.id
        self._tickets[ticket.id] = ticket
        self._wakeup.set()
        return handle

    def _fit_history(self, request: Request, images: Sequence[DecodedImage]) -> tuple[Turn, ...]:
        """The newest turns of the request's history that fit the model's context."""
        history = fit_history(
            request.history,
            context_tokens=self.config.context_tokens,
            system_prompt=system_prompt_for(self._model),
            question=request.question,
            images=images,
            max_tiles=self.config.max_tiles,
            max_new_tokens=min(request.params.max_new_tokens, self.config.max_new_tokens),
        )
        if len(history) < len(request.history):
            log.info(
                "left out the %d oldest of %d turns to fit %d tokens",
                len(request.history) - len(history),
                len(request.history),
                self.config.context_tokens,
            )
        return history

    async def _decode(self, key: str, data: bytes) -> DecodedImage:
        # Decoding runs in worker threads; a bound keeps a burst of photos from taking
        # every thread and a lot of memory at once. A key's photos take turns, so one user's
        # slow photos hold one slot at most and everyone else's keep being decoded.
        turn = self._decode_turns.setdefault(key, asyncio.Lock())
        async with turn, self._decode_slots:
            return await load_image(
                data,
                max_tiles=self.config.max_tiles,
                time_budget_s=self.config.decode_time_budget_s,
            )

    def cancel(self, request_id: int) -> bool:
        """Cancel a request; False if it had already ended."""
        ticket = self._tickets.get(request_id)
        if ticket is None:
            return False
        if ticket.payload.job is not None:
            ticket.payload.job.cancelled.set()
        ended = self._end(ticket, Cancelled("the question was cancelled"))
        self._wakeup.set()
        return ended

    def stats(self) -> EngineStats:
        """Queue depth, requests in flight, outcomes and recent wait and service times."""
        waits, services = list(self._waits), list(self._services)
        return EngineStats(
            model=self._model.name,
            waiting=self._scheduler.waiting,
            in_flight=self._scheduler.in_flight,
            capacity=self._scheduler.capacity,
            completed=self._counts["completed"],
            failed=self._counts["failed"],
            timed_out=self._counts["timed_out"],
            cancelled=self._counts["cancelled"],
            wait_p50_s=_percentile(waits, 0.5),
            wait_p95_s=_percentile(waits, 0.95),
            service_p50_s=_percentile(services, 0.5),
            service_p95_s=_percentile(services, 0.95),
            circuit=self._circuit.state.value,
        )

    # -- ending ---------------------------------------------------------------------------

    def _end(self, ticket: Ticket[_Work], outcome: Answer | EngineError) -> bool:
        if not self._scheduler.end(ticket):
            return False
        self._tickets.pop(ticket.id, None)
        work = ticket.payload
        if work.deadline_timer is not None:
            work.deadline_timer.cancel()
        work.handle._put(outcome)
        if isinstance(outcome, Answer):
            self._counts["completed"] += 1
            self._services.append(outcome.service_s)
        elif isinstance(outcome, DeadlineExceeded):
            self._counts["timed_out"] += 1
        elif isinstance(outcome, Cancelled):
            self._counts["cancelled"] += 1
        else:
            self._counts["failed"] += 1
        self._watch_backend(work, outcome)
        return True

    def _watch_backend(self, work: _Work, outcome: Answer | EngineError) -> None:
        """Tell the circuit what this ending says about the backend's health."""
        if isinstance(outcome, Answer):
            if self._circuit.state is not CircuitState.CLOSED:
                log.warning("the %s backend answers again: taking questions", self.backend.name)
            self._circuit.succeeded()
        elif _is_backend_fault(outcome):
            if self._circuit.failed():
                log.error(
                    "the %s backend keeps failing (last: %s): refusing questions for %.0f s",
                    self.backend.name,
                    outcome,
                    self._circuit.reset_s,
                )
                self._fail_waiting()
        elif work.probe:
            self._circuit.probe_abandoned()

    def _fail_waiting(self) -> None:
        # They would only reach a failing backend, and fail slowly.
        retry_after_s = self._circuit.retry_after_s()
        for ticket in list(self._scheduler.waiting_tickets()):
            self._end(ticket, ModelUnavailable(retry_after_s))

    # -- dispatch -------------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        while not self._closed:
            self._expire_waiting()
            self._dispatch()
            self._announce_positions()
            next_deadline = self._scheduler.next_deadline()
            timeout = None if next_deadline is None else max(0.0, next_deadline - self._clock())
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives just as the event is set, and the loop would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            self._wakeup.clear()

    def _expire_waiting(self) -> None:
        for ticket in self._scheduler.expired():
            if self._backend_stuck():
                # It could not start only because stalled requests still hold the backend:
                # the same fault, so it counts towards opening the circuit.
                self._end(ticket, GenerationStalled("no answer in time: the model is stuck"))
            else:
                self._end(ticket, DeadlineExceeded("no answer in time: the queue was too long"))

    def _backend_stuck(self) -> bool:
        """Whether every batch in flight has stalled: all its requests have ended, one of them
        at its deadline without a word, and the backend still has not let go of it."""
        return bool(self._batches) and all(
            all(t.state is TicketState.ENDED for t in batch)
            and any(t.payload.stalled for t in batch)
            for batch in self._batches.values()
        )

    def _dispatch(self) -> None:
        while (
            not self._paused
            and len(self._batches) < self.backend.max_batches
            and self._scheduler.free_slots > 0
            and self._scheduler.waiting > 0
        ):
            batch = self._scheduler.next_batch()
            for ticket in batch:
                self._start(ticket)
            task = asyncio.create_task(self._run_batch(batch), name=f"engine-batch-{batch[0].id}")
            self._batches[task] = batch
            task.add_done_callback(self._batch_finished)

    def _start(self, ticket: Ticket[_Work]) -> None:
        work = ticket.payload
        request = work.request
        params = request.params
        if params.max_new_tokens > self.config.max_new_tokens:
            params = dataclasses.replace(params, max_new_tokens=self.config.max_new_tokens)
        work.job = GenerationJob(
            images=work.images,
            history=request.history,
            question=request.question,
            system_prompt=system_prompt_for(self._model),
            params=params,
            max_tiles=self.config.max_tiles,
        )
        assert ticket.started_at is not None
        self._waits.append(ticket.started_at - ticket.admitted_at)
        loop = asyncio.get_running_loop()
        delay = max(0.0, ticket.deadline - self._clock())
        work.deadline_timer = loop.call_later(delay, self._deadline_passed, ticket)
        work.handle._put(Started())

    def _deadline_passed(self, ticket: Ticket[_Work]) -> None:
        work = ticket.payload
        if work.job is not None:
            work.job.cancelled.set()
        if work.text:
            self._end(ticket, DeadlineExceeded("no answer in time: generating took too long"))
        elif _had_time_to_speak(ticket):
            work.stalled = self._end(
                ticket, GenerationStalled("no answer in time: the model said nothing")
            )
        else:
            self._end(ticket, DeadlineExceeded("no answer in time: it started too late"))

    def _batch_finished(self, task: asyncio.Task[None]) -> None:
        self._batches.pop(task, None)
        self._batch_done.set()
        self._wakeup.set()

    async def _run_batch(self, batch: list[Ticket[_Work]]) -> None:
        jobs = [ticket.payload.job for ticket in batch]
        assert all(job is not None for job in jobs)
        model_name = self._model.name
        try:
            events = self.backend.generate([job for job in jobs if job is not None])
            async with contextlib.aclosing(events):
                async for event in events:
                    ticket = batch[event.index]
                    if isinstance(event, JobDelta):
                        self._deliver_delta(ticket, event.text)
                        continue
                    self._scheduler.release(ticket)
                    self._wakeup.set()
                    if isinstance(event, JobFinished):
                        self._finish(ticket, event, model_name)
                    elif isinstance(event, JobFailed):
                        self._fail(ticket, event.error)
        except Exception as exc:  # a backend bug must not take the engine down
            log.exception("the %s backend failed a batch", self.backend.name)
            for ticket in batch:
                self._fail(ticket, exc)
        finally:
            for ticket in batch:
                self._scheduler.release(ticket)
                self._end(ticket, GenerationFailed("the model stopped without an answer"))

    def _deliver_delta(self, ticket: Ticket[_Work], text: str) -> None:
        if ticket.state is not TicketState.RUNNING or not text:
            return
        ticket.payload.text.append(text)
        ticket.payload.handle._put(TextDelta(text))

    def _finish(self, ticket: Ticket[_Work], event: JobFinished, model_name: str) -> None:
        now = self._clock()
        assert ticket.started_at is not None
        answer = Answer(
            text=event.text,
            model=model_name,
            finish_reason=event.finish_reason,
            queued_s=ticket.started_at - ticket.admitted_at,
            service_s=now - ticket.started_at,
        )
        self._end(ticket, answer)

    def _fail(self, ticket: Ticket[_Work], error: BaseException) -> None:
        if isinstance(error, EngineError):
            self._end(ticket, error)
            return
        if ticket.state is not TicketState.ENDED:
            log.error("generation failed for request %s: %r", ticket.id, error)
        failure = GenerationFailed("the model failed to answer")
        failure.__cause__ = error
        self._end(ticket, failure)

    def _announce_positions(self) -> None:
        if self._scheduler.changes == self._announced_at:
            return  # nothing moved in the queue since the last announcement
        self._announced_at = self._scheduler.changes
        for ticket_id, ahead in self._scheduler.positions().items():
            work = self._tickets[ticket_id].payload
            if work.last_position != ahead:
                work.last_position = ahead
                work.handle._put(Queued(ahead))


def _had_time_to_speak(ticket: Ticket[_Work]) -> bool:
    """Whether the model had a fair share of the request's time (`STALL_SHARE`) by its
    deadline: silence that long is a stall, a shorter one only a late start."""
    assert ticket.started_at is not None
    allowed = ticket.deadline - ticket.admitted_at
    return ticket.deadline - ticket.started_at >= STALL_SHARE * allowed


def _is_backend_fault(outcome: EngineError) -> bool:
    """Whether an ending says the backend is failing, not the user, the photo or the queue."""
    if isinstance(outcome, GenerationStalled):
        return True
    return isinstance(outcome, GenerationFailed) and not isinstance(outcome, RequestRefused)
