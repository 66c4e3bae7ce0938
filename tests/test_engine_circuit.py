"""The engine in front of a failing backend: the circuit opens, refuses fast, probes, recovers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

import pytest

from engine.engine import Answer, Engine, EngineConfig, Request, RequestHandle
from engine.errors import (
    BadImage,
    Cancelled,
    DeadlineExceeded,
    GenerationFailed,
    GenerationStalled,
    ModelUnavailable,
    RequestRefused,
)
from engine.types import BackendEvent, GenerationJob, JobDelta, JobFinished, ModelSpec
from tests.factories import jpeg_bytes
from tests.scripted_backend import ScriptedBackend

BASE = ModelSpec(path="/models/base", name="base")
RESET_S = 30.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend(capacity=1)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def engine(backend: ScriptedBackend, clock: FakeClock) -> AsyncIterator[Engine]:
    config = EngineConfig(circuit_failures=2, circuit_reset_s=RESET_S, request_timeout_s=20.0)
    async with Engine(backend, BASE, config, clock=clock) as engine:
        yield engine


def ask(question: str = "这是什么菜？", key: str = "telegram:1", **kwargs: float) -> Request:
    return Request(key=key, question=question, images=(jpeg_bytes(),), **kwargs)  # type: ignore[arg-type]


async def outcome(handle: RequestHandle) -> Answer | Exception:
    try:
        return await handle.result()
    except Exception as exc:
        return exc


async def open_the_circuit(engine: Engine, backend: ScriptedBackend) -> None:
    backend.down = True
    for user in (1, 2):
        handle = await engine.submit(ask(key=f"telegram:{user}"))
        assert isinstance(await outcome(handle), GenerationFailed)


async def test_repeated_backend_failures_open_the_circuit_and_new_questions_are_refused_at_once(
    engine: Engine, backend: ScriptedBackend
) -> None:
    await open_the_circuit(engine, backend)
    jobs_seen = len(backend.jobs)

    with pytest.raises(ModelUnavailable) as refused:
        await engine.submit(ask(key="telegram:3"))

    assert refused.value.retry_after_s == pytest.approx(RESET_S)
    assert len(backend.jobs) == jobs_seen  # the refused question never reached the backend
    assert engine.stats().circuit == "open"


async def test_questions_waiting_when_the_circuit_opens_fail_at_once_instead_of_slowly(
    backend: ScriptedBackend,
) -> None:
    config = EngineConfig(circuit_failures=1)
    async with Engine(backend, BASE, config) as engine:
        hung = await engine.submit(ask("hang", timeout_s=0.3))
        waiting = [await engine.submit(ask(key=f"telegram:{user}")) for user in range(2, 5)]

        outcomes = [await outcome(handle) for handle in (hung, *waiting)]

    assert isinstance(outcomes[0], DeadlineExceeded)
    assert all(isinstance(result, ModelUnavailable) for result in outcomes[1:])
    assert len(backend.jobs) == 1  # the waiting ones were never tried


async def test_after_the_cool_down_one_probe_is_admitted_and_its_answer_closes_the_circuit(
    engine: Engine, backend: ScriptedBackend, clock: FakeClock
) -> None:
    await open_the_circuit(engine, backend)
    backend.down = False  # the backend is back
    clock.now += RESET_S

    probe = await engine.submit(ask("slow probe", key="telegram:3"))
    with pytest.raises(ModelUnavailable):
        await engine.submit(ask(key="telegram:4"))  # only one probe at a time
    assert engine.stats().circuit == "half_open"

    assert isinstance(await outcome(probe), Answer)
    assert engine.stats().circuit == "closed"
    answer = await outcome(await engine.submit(ask(key="telegram:4")))
    assert isinstance(answer, Answer)


async def test_a_failed_probe_keeps_the_circuit_open_for_another_cool_down(
    engine: Engine, backend: ScriptedBackend, clock: FakeClock
) -> None:
    await open_the_circuit(engine, backend)
    clock.now += RESET_S

    probe = await engine.submit(ask(key="telegram:3"))
    assert isinstance(await outcome(probe), GenerationFailed)

    with pytest.raises(ModelUnavailable) as refused:
        await engine.submit(ask(key="telegram:4"))
    assert refused.value.retry_after_s == pytest.approx(RESET_S)
    assert engine.stats().circuit == "open"


async def test_a_cancelled_probe_lets_the_next_question_probe(
    engine: Engine, backend: ScriptedBackend, clock: FakeClock
) -> None:
    await open_the_circuit(engine, backend)
    backend.down = False
    clock.now += RESET_S
    probe = await engine.submit(ask("slow probe", key="telegram:3"))

    probe.cancel()
    assert isinstance(await outcome(probe), Cancelled)

    answer = await outcome(await engine.submit(ask(key="telegram:4")))
    assert isinstance(answer, Answer)


async def test_cancels_bad_photos_refused_requests_and_queue_timeouts_never_open_the_circuit(
    backend: ScriptedBackend,
) -> None:
    config = EngineConfig(circuit_failures=1, max_pending_per_key=5)
    async with Engine(backend, BASE, config) as engine:
        with pytest.raises(BadImage):
            await engine.submit(Request(key="telegram:1", question="?", images=(b"not a photo",)))
        refused = await engine.submit(ask("refuse this", key="telegram:1"))
        assert isinstance(await outcome(refused), RequestRefused)
        running = await engine.submit(ask("slow", key="telegram:2"))
        waiting = await engine.submit(ask(key="telegram:3", timeout_s=0.05))
        assert isinstance(await outcome(waiting), DeadlineExceeded)
        running.cancel()
        assert isinstance(await outcome(running), Cancelled)

        answer = await outcome(await engine.submit(ask(key="telegram:4")))

        assert isinstance(answer, Answer)
        assert engine.stats().circuit == "closed"


async def test_a_backend_that_hangs_without_a_word_counts_as_down(
    backend: ScriptedBackend,
) -> None:
    config = EngineConfig(circuit_failures=1)
    async with Engine(backend, BASE, config) as engine:
        hung = await engine.submit(ask("hang", timeout_s=0.1))
        assert isinstance(await outcome(hung), DeadlineExceeded)

        with pytest.raises(ModelUnavailable):
            await engine.submit(ask(key="telegram:2"))


async def test_a_slow_answer_cut_by_its_deadline_does_not_count_as_a_backend_fault(
    backend: ScriptedBackend,
) -> None:
    backend.step_s = 0.02
    config = EngineConfig(circuit_failures=1)
    async with Engine(backend, BASE, config) as engine:
        slow = await engine.submit(ask("slow", timeout_s=0.3))
        assert isinstance(await outcome(slow), DeadlineExceeded)

        answer = await outcome(await engine.submit(ask(key="telegram:2")))
        assert isinstance(answer, Answer)


async def test_the_circuit_stays_closed_while_answers_keep_coming(
    engine: Engine, backend: ScriptedBackend
) -> None:
    for question in ("fail once", "这是什么菜？", "fail again", "这是什么菜？"):
        await outcome(await engine.submit(ask(question)))

    assert engine.stats().circuit == "closed"


class BusyBackend:
    """A healthy model that is simply busy: one question at a time, each answered in full after
    ``prefill_s`` of silence (deaf to cancellation meanwhile, as a prefill is)."""

    name = "busy"
    capacity = 1
    max_batches = 1

    def __init__(self, prefill_s: float) -> None:
        self.prefill_s = prefill_s

    async def load(self, model: ModelSpec) -> None:
        pass

    async def close(self) -> None:
        pass

    async def generate(self, jobs: Sequence[GenerationJob]) -> AsyncGenerator[BackendEvent, None]:
        await asyncio.sleep(self.prefill_s)
        for index in range(len(jobs)):
            yield JobDelta(index, "Char siu.")
            yield JobFinished(index, "Char siu.")


async def test_an_overloaded_but_healthy_model_never_opens_the_circuit() -> None:
    # Questions come three times faster than they are answered, so many start with only a
    # sliver of their time left and end before the model's first word: that is the queue's
    # doing, not a hung model, and nobody may be turned away as "model unavailable".
    config = EngineConfig(
        circuit_failures=3, circuit_reset_s=RESET_S, request_timeout_s=1.0, max_pending=50
    )
    async with Engine(BusyBackend(prefill_s=0.3), BASE, config) as engine:

        async def one_user(user: int) -> Answer | Exception:
            try:
                return await outcome(await engine.submit(ask(key=f"telegram:{user}")))
            except ModelUnavailable as refused:
                return refused

        users = []
        for user in range(25):
            users.append(asyncio.create_task(one_user(user)))
            await asyncio.sleep(0.1)
        outcomes = await asyncio.gather(*users)

        assert engine.stats().circuit == "closed"
    assert any(isinstance(result, Answer) for result in outcomes)
    late = [result for result in outcomes if not isinstance(result, Answer)]
    assert late  # the overload really happened
    assert all(type(result) is DeadlineExceeded for result in late), late


async def test_questions_queued_behind_a_stuck_backend_open_the_circuit(
    backend: ScriptedBackend,
) -> None:
    # A stuck in-process backend keeps its batch slot after its question stalled, so later
    # questions can only expire in the queue; they are casualties of the same fault.
    config = EngineConfig(circuit_failures=3, circuit_reset_s=RESET_S, request_timeout_s=0.2)
    async with Engine(backend, BASE, config) as engine:
        stuck = await engine.submit(ask("freeze"))
        assert isinstance(await outcome(stuck), GenerationStalled)
        behind = [await outcome(await engine.submit(ask(key=f"telegram:{u}"))) for u in (2, 3)]
        assert all(isinstance(result, DeadlineExceeded) for result in behind)

        with pytest.raises(ModelUnavailable):  # refused at once, not after another wait
            await engine.submit(ask(key="telegram:4"))
        assert engine.stats().circuit == "open"
