"""The real `Engine` against a simulated continuous-batching GPU: throughput and fairness.

Run by hand from the repository root: ``python bench/scheduler.py`` (about 30 s).

What is under test is the production `engine.engine.Engine` (its fair-queuing `Scheduler` and
its dispatcher); only the model is simulated, by `SimulatedBatchingBackend` below, which
behaves like lmdeploy does towards the engine:

* ``capacity`` jobs may generate at once and ``max_batches == capacity``: the engine hands jobs
  over as slots free up, each `generate` call carrying one or more of them.
* One shared "GPU loop" task runs decode steps. A step with ``n`` active jobs takes
  ``base_step_s * (1 + alpha * (n - 1))`` (a bigger batch costs a little more per step) and
  gives every active job one token. Jobs handed over during a step join the batch at the
  next step boundary; a job leaves once it has its ``params.max_new_tokens`` tokens
  (``finish_reason="length"``). `generate` yields a `JobDelta` per token and a `JobFinished`
  per job. Steps are timed with ``asyncio.sleep`` on an absolute schedule (a late wake-up
  does not push later steps back), as a GPU runs on regardless of the Python side.

Experiment 1, throughput: 400 requests from 40 keys are all submitted at once (queue limits
raised so all are admitted), with answers of 32 tokens each, then of seeded gamma-distributed
lengths (mean 32), then 32 tokens again but every request from its own key (400 keys).
Measured: answered tokens per second, end to end (first submit to last answer) and in the
steady state (while requests were still waiting in the engine: the drain at the end, when
too few requests are left to fill the batch, is no scheduler's doing). Both are compared
with the ideal, a batch always full: ``capacity / step_s(capacity)`` tokens/s. The same
engine over the same cost model with capacity 1 (one request at a time; fewer requests, as
it is slow) gives the serial baseline and the speedup. The simulated backend also measures
the dispatch latency: from a job's `JobFinished` (its slot free) to the engine's next
`generate` call, while requests were waiting; the slot-steps left empty while requests were
waiting; and how late the GPU loop woke up (it shares the event loop with the engine, so
this shows the engine blocking the loop). ``throughput_fraction`` in the last line is the
end-to-end figure of the varied-length 40-key workload.

Experiment 2, fairness under a flood: a heavy user submits 200 requests at t=0; 20 light
users submit one each at seeded random times during the first half of the flood. Every
request asks for 32 tokens, so one SERVICE TIME, a request's generation with the batch full,
is ``32 * step_s(capacity)``. Measured: each light request's queue wait (``Answer.queued_s``:
admission to dispatch) and its time to first token (submit to first `TextDelta`), reported
as the light users' p95 in service times. The FIFO baseline is the same engine and workload
with every request under ONE fairness key: fair queuing over a single key serves strictly in
admission order, which is FIFO with the same capacity and the same dispatcher.

The last line is ``name=value`` pairs for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from engine.engine import Answer, Engine, EngineConfig, Request, TextDelta
from engine.errors import Cancelled
from engine.types import (
    BackendEvent,
    GenerationJob,
    GenerationParams,
    JobDelta,
    JobFailed,
    JobFinished,
    ModelSpec,
)

MODEL = ModelSpec(path="simulated", name="simulated-internvl")


@dataclass(frozen=True, slots=True)
class CostModel:
    """How long one decode step takes with ``active`` jobs in the batch."""

    base_step_s: float
    alpha: float

    def step_s(self, active: int) -> float:
        return self.base_step_s * (1 + self.alpha * (active - 1))


@dataclass(eq=False, slots=True)
class _Slot:
    """One job in the simulated GPU's batch."""

    job: GenerationJob
    index: int
    tokens: int
    out: asyncio.Queue[BackendEvent]
    emitted: int = 0
    gone: bool = False  # its generate() stream was closed: drop it at the next boundary


@dataclass(slots=True)
class Trace:
    """What the simulated GPU saw, for the dispatch-latency figures."""

    offered: int = 0  # requests submitted to the engine (the bench counts them)
    handed: int = 0  # jobs the engine has handed to generate()
    steps: int = 0
    tokens: int = 0
    # Per step: (end time, tokens emitted); used for the steady-state throughput.
    step_log: list[tuple[float, int]] = field(default_factory=list)
    idle_slot_steps_waiting: int = 0  # empty slots in steps that began with requests waiting
    steps_waiting: int = 0  # steps that began with requests waiting
    last_handed_at: float = 0.0
    dispatch_latency_s: list[float] = field(default_factory=list)
    lag_s: list[float] = field(default_factory=list)  # GPU loop wake-up after a step's end
    _freed_at: deque[float] = field(default_factory=deque)

    @property
    def waiting(self) -> int:
        return self.offered - self.handed


class SimulatedBatchingBackend:
    """The Backend protocol over a simulated continuous-batching GPU (see the module doc)."""

    name = "simulated"

    def __init__(self, capacity: int, cost: CostModel) -> None:
        self._capacity = capacity
        self.cost = cost
        self.trace = Trace()
        self._active: list[_Slot] = []
        self._joining: list[_Slot] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_batches(self) -> int:
        return self._capacity

    async def load(self, model: ModelSpec) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._gpu_loop(), name="simulated-gpu")

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None

    async def generate(self, jobs: Sequence[GenerationJob]) -> AsyncGenerator[BackendEvent, None]:
        out: asyncio.Queue[BackendEvent] = asyncio.Queue()
        slots = [_Slot(job, i, job.params.max_new_tokens, out) for i, job in enumerate(jobs)]
        now = time.monotonic()
        trace = self.trace
        for _ in slots:
            if trace._freed_at:
                trace.dispatch_latency_s.append(now - trace._freed_at.popleft())
        trace.handed += len(slots)
        trace.last_handed_at = now
        if trace.waiting == 0:
            trace._freed_at.clear()  # a slot freed with nothing waiting is not a delay
        self._joining.extend(slots)
        self._wake.set()
        remaining = len(slots)
        try:
            while remaining:
                event = await out.get()
                if not isinstance(event, JobDelta):
                    remaining -= 1
                yield event
        finally:
            for slot in slots:
                slot.gone = True

    async def _gpu_loop(self) -> None:
        trace = self.trace
        step_end = time.monotonic()
        while True:
            if not self._active and not self._joining:
                self._wake.clear()
                await self._wake.wait()
                step_end = time.monotonic()
            # A step boundary: jobs handed over during the last step join the batch now.
            self._active.extend(self._joining)
            self._joining.clear()
            self._active = [slot for slot in self._active if not self._drop(slot)]
            if not self._active:
                continue
            active = len(self._active)
            if trace.waiting > 0:
                trace.steps_waiting += 1
                trace.idle_slot_steps_waiting += min(self._capacity - active, trace.waiting)
            step_end += self.cost.step_s(active)
            await asyncio.sleep(max(0.0, step_end - time.monotonic()))
            now = time.monotonic()
            trace.lag_s.append(now - step_end)
            trace.steps += 1
            trace.tokens += active
            trace.step_log.append((now, active))
            still: list[_Slot] = []
            for slot in self._active:
                slot.emitted += 1
                slot.out.put_nowait(JobDelta(slot.index, " tok"))
                if slot.emitted < slot.tokens:
                    still.append(slot)
                    continue
                slot.out.put_nowait(JobFinished(slot.index, " tok" * slot.tokens, "length"))
                if trace.waiting > 0:
                    trace._freed_at.append(now)
            self._active = still

    @staticmethod
    def _drop(slot: _Slot) -> bool:
        if slot.gone:
            return True
        if slot.job.cancelled.is_set():
            slot.out.put_nowait(JobFailed(slot.index, Cancelled("cancelled")))
            return True
        return False


# -- running a workload through the real engine ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of a workload: who, when (seconds after the start), how many tokens."""

    key: str
    at_s: float
    tokens: int
    light: bool = False


@dataclass(slots=True)
class Outcome:
    arrival: Arrival
    submitted_at: float = 0.0
    first_token_at: float | None = None
    done_at: float = 0.0
    tokens: int = 0
    answer: Answer | None = None


@dataclass(slots=True)
class RunResult:
    outcomes: list[Outcome]
    started_at: float
    ended_at: float
    trace: Trace

    @property
    def tokens(self) -> int:
        return sum(outcome.tokens for outcome in self.outcomes)

    @property
    def elapsed_s(self) -> float:
        return self.ended_at - self.started_at


async def run_workload(
    arrivals: Sequence[Arrival], capacity: int, cost: CostModel, *, fifo: bool = False
) -> RunResult:
    """Serve ``arrivals`` with a real Engine over the simulated backend; all must succeed.

    ``fifo`` puts every request under one fairness key, so fair queuing degenerates to FIFO.
    """
    backend = SimulatedBatchingBackend(capacity, cost)
    config = EngineConfig(
        max_pending=len(arrivals) + 1,
        max_pending_per_key=len(arrivals) + 1,
        max_new_tokens=max(arrival.tokens for arrival in arrivals),
        request_timeout_s=3600.0,
    )
    outcomes = [Outcome(arrival) for arrival in arrivals]
    async with Engine(backend, MODEL, config) as engine:

        async def one(outcome: Outcome, start: float) -> None:
            arrival = outcome.arrival
            delay = start + arrival.at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            request = Request(
                key="everyone" if fifo else arrival.key,
                question=f"what is this dish? ({arrival.key})",
                params=GenerationParams(max_new_tokens=arrival.tokens),
            )
            outcome.submitted_at = time.monotonic()
            handle = await engine.submit(request)
            backend.trace.offered += 1
            async for event in handle:
                if isinstance(event, TextDelta):
                    if outcome.first_token_at is None:
                        outcome.first_token_at = time.monotonic()
                    outcome.tokens += 1
                elif isinstance(event, Answer):
                    outcome.answer = event
            outcome.done_at = time.monotonic()

        start = time.monotonic()
        # Requests due at t=0 are submitted in order before any other task runs, so the
        # queue holds all of them before the first dispatch.
        tasks = []
        for outcome in outcomes:
            tasks.append(asyncio.create_task(one(outcome, start)))
            if outcome.arrival.at_s <= 0:
                await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        ended = time.monotonic()
    for outcome in outcomes:
        assert outcome.answer is not None, outcome
        assert outcome.tokens == outcome.arrival.tokens, outcome
    return RunResult(outcomes, start, ended, backend.trace)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile, interpolated (like the engine's own stats)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(fraction * 100) - 1]


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


# -- experiment 1: throughput -------------------------------------------------------------------


@dataclass(slots=True)
class ThroughputRow:
    label: str
    capacity: int
    requests: int
    tokens: int
    elapsed_s: float
    tokens_per_s: float
    steady_tokens_per_s: float
    ideal_tokens_per_s: float
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_max_s: float | None
    idle_share: float
    lag_p95_s: float


def throughput_row(label: str, result: RunResult, capacity: int, cost: CostModel) -> ThroughputRow:
    trace = result.trace
    # Steady state: from the first submit to the moment the engine handed over its last
    # waiting request; tokens the GPU emitted by then over that window.
    window = trace.last_handed_at - result.started_at
    steady_tokens = sum(n for at, n in trace.step_log if at <= trace.last_handed_at)
    latencies = trace.dispatch_latency_s
    slot_steps_waiting = trace.steps_waiting * capacity
    return ThroughputRow(
        label=label,
        capacity=capacity,
        requests=len(result.outcomes),
        tokens=result.tokens,
        elapsed_s=result.elapsed_s,
        tokens_per_s=result.tokens / result.elapsed_s,
        steady_tokens_per_s=steady_tokens / window if window > 0 else float("nan"),
        ideal_tokens_per_s=capacity / cost.step_s(capacity),
        latency_p50_s=percentile(latencies, 0.5) if latencies else None,
        latency_p95_s=percentile(latencies, 0.95) if latencies else None,
        latency_max_s=max(latencies) if latencies else None,
        idle_share=trace.idle_slot_steps_waiting / slot_steps_waiting if slot_steps_waiting else 0,
        lag_p95_s=percentile(trace.lag_s, 0.95),
    )


def gamma_tokens(rng: random.Random, count: int) -> list[int]:
    """Answer lengths: gamma(4, 8) tokens (mean 32), clipped to 8..128."""
    return [max(8, min(128, round(rng.gammavariate(4.0, 8.0)))) for _ in range(count)]


async def experiment_throughput(args: argparse.Namespace, cost: CostModel) -> list[ThroughputRow]:
    """Rows: fixed lengths, varied lengths, fixed lengths one request per key, serial."""
    rng = random.Random(args.seed)
    count, keys = args.requests, args.keys
    varied = gamma_tokens(rng, count)
    fixed = [args.tokens] * count
    workloads = {
        f"fixed {args.tokens}": fixed,
        "varied (gamma, mean 32)": varied,
    }
    rows: list[ThroughputRow] = []
    for label, lengths in workloads.items():
        arrivals = [Arrival(f"user-{i % keys}", 0.0, n) for i, n in enumerate(lengths)]
        result = await run_workload(arrivals, args.capacity, cost)
        rows.append(throughput_row(f"batched, {label}", result, args.capacity, cost))
    # The same fixed-length workload with every request from its own key: the engine's
    # per-pass work grows with waiting requests x waiting keys (see the report).
    arrivals = [Arrival(f"user-{i}", 0.0, n) for i, n in enumerate(fixed)]
    result = await run_workload(arrivals, args.capacity, cost)
    rows.append(throughput_row(f"batched, fixed, {count} keys", result, args.capacity, cost))
    # One at a time: the same cost model with one slot; fewer requests (it is slow), the
    # first ones of the varied workload.
    serial_lengths = varied[: args.serial_requests]
    arrivals = [Arrival(f"user-{i % keys}", 0.0, n) for i, n in enumerate(serial_lengths)]
    serial = throughput_row(
        "serial, varied (subset)", await run_workload(arrivals, 1, cost), 1, cost
    )
    rows.append(serial)
    return rows


def print_throughput(rows: Sequence[ThroughputRow]) -> None:
    print("Experiment 1: throughput (tokens/s; ideal = capacity / step_s(capacity))")
    header = (
        f"{'workload':<32}{'cap':>4}{'reqs':>6}{'tokens':>8}{'time s':>8}"
        f"{'tok/s':>9}{'/ideal':>8}{'steady':>9}{'/ideal':>8}"
        f"{'disp p50/p95/max ms':>22}{'idle':>7}{'lag95':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if row.latency_p50_s is None:
            latency = "-"
        else:
            assert row.latency_p95_s is not None
            assert row.latency_max_s is not None
            latency = "/".join(
                fmt_ms(v) for v in (row.latency_p50_s, row.latency_p95_s, row.latency_max_s)
            )
        print(
            f"{row.label:<32}{row.capacity:>4}{row.requests:>6}{row.tokens:>8}"
            f"{row.elapsed_s:>8.2f}{row.tokens_per_s:>9.0f}"
            f"{row.tokens_per_s / row.ideal_tokens_per_s:>8.3f}"
            f"{row.steady_tokens_per_s:>9.0f}"
            f"{row.steady_tokens_per_s / row.ideal_tokens_per_s:>8.3f}"
            f"{latency:>22}{row.idle_share:>7.1%}{fmt_ms(row.lag_p95_s):>7}"
        )
    print(
        "  disp = dispatch latency, a slot freeing (JobFinished) to the engine's next generate()"
        " call, while requests waited;\n  idle = share of slot-steps left empty while requests"
        " waited (a slot freed by step k can be refilled at step k+2 at the earliest, as\n"
        "  the new job reaches the GPU during step k+1); lag95 = p95 late wake-up of the"
        " simulated GPU loop, ms."
    )


# -- experiment 2: fairness under a flood ------------------------------------------------------


@dataclass(slots=True)
class FloodRow:
    label: str
    light_wait_p50: float
    light_wait_p95: float
    light_wait_max: float
    light_ttft_p95: float
    heavy_done_s: float
    service_measured_s: float


def flood_arrivals(args: argparse.Namespace, cost: CostModel) -> list[Arrival]:
    rng = random.Random(args.seed + 1)
    service_s = args.tokens * cost.step_s(args.capacity)
    flood_s = args.heavy / args.capacity * service_s
    heavy = [Arrival("heavy", 0.0, args.tokens) for _ in range(args.heavy)]
    times = sorted(rng.uniform(0.0, flood_s / 2) for _ in range(args.light))
    light = [Arrival(f"light-{i}", t, args.tokens, light=True) for i, t in enumerate(times)]
    return heavy + light


def flood_row(label: str, result: RunResult, service_s: float) -> FloodRow:
    light = [outcome for outcome in result.outcomes if outcome.arrival.light]
    heavy = [outcome for outcome in result.outcomes if not outcome.arrival.light]
    waits = [outcome.answer.queued_s / service_s for outcome in light if outcome.answer]
    ttfts = [
        (outcome.first_token_at - outcome.submitted_at) / service_s
        for outcome in light
        if outcome.first_token_at is not None
    ]
    services = [outcome.answer.service_s for outcome in result.outcomes if outcome.answer]
    return FloodRow(
        label=label,
        light_wait_p50=percentile(waits, 0.5),
        light_wait_p95=percentile(waits, 0.95),
        light_wait_max=max(waits),
        light_ttft_p95=percentile(ttfts, 0.95),
        heavy_done_s=max(outcome.done_at for outcome in heavy) - result.started_at,
        service_measured_s=statistics.median(services),
    )


async def experiment_flood(args: argparse.Namespace, cost: CostModel) -> tuple[FloodRow, FloodRow]:
    arrivals = flood_arrivals(args, cost)
    service_s = args.tokens * cost.step_s(args.capacity)
    fair = flood_row(
        "dishbot (fair queuing)", await run_workload(arrivals, args.capacity, cost), service_s
    )
    # FIFO: the same engine and workload, every request under one key (see the module doc).
    fifo = flood_row(
        "FIFO (one key)",
        await run_workload(arrivals, args.capacity, cost, fifo=True),
        service_s,
    )
    return fair, fifo


def print_flood(
    rows: Sequence[FloodRow], args: argparse.Namespace, cost: CostModel, service_s: float
) -> None:
    print(
        f"Experiment 2: fairness, {args.heavy} requests from one heavy user at t=0, "
        f"{args.light} light users arriving during the first half of the flood"
    )
    print(
        f"  service time = {args.tokens} tokens x {fmt_ms(cost.step_s(args.capacity))} ms"
        f" = {fmt_ms(service_s)} ms (batch full); light waits in service times"
    )
    header = (
        f"{'queue':<24}{'wait p50':>10}{'wait p95':>10}{'wait max':>10}{'1st tok p95':>13}"
        f"{'heavy done s':>14}{'service p50 ms':>16}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.label:<24}{row.light_wait_p50:>10.2f}{row.light_wait_p95:>10.2f}"
            f"{row.light_wait_max:>10.2f}{row.light_ttft_p95:>13.2f}{row.heavy_done_s:>14.2f}"
            f"{fmt_ms(row.service_measured_s):>16}"
        )
    print(
        "  wait = Answer.queued_s (admission to dispatch); 1st tok = submit to first TextDelta;"
        " service p50 = median Answer.service_s."
    )


# -- main ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--capacity", type=int, default=16)
    parser.add_argument("--base-step-ms", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.03)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per fixed-length answer")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--keys", type=int, default=40)
    parser.add_argument("--serial-requests", type=int, default=48)
    parser.add_argument("--heavy", type=int, default=200)
    parser.add_argument("--light", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    return parser.parse_args()


async def main() -> None:
    args = parse_args()
    cost = CostModel(args.base_step_ms / 1000, args.alpha)
    print(
        f"capacity={args.capacity} step_s(n) = {args.base_step_ms} ms x (1 + {args.alpha}"
        f" x (n - 1)); full-batch step {fmt_ms(cost.step_s(args.capacity))} ms"
    )
    print()
    rows = await experiment_throughput(args, cost)
    fixed, batched, many_keys, serial = rows
    print_throughput(rows)
    speedup = batched.tokens_per_s / serial.tokens_per_s
    ideal_speedup = batched.ideal_tokens_per_s / serial.ideal_tokens_per_s
    print(f"  speedup over one at a time: {speedup:.1f}x (ideal {ideal_speedup:.1f}x)")
    print()
    service_s = args.tokens * cost.step_s(args.capacity)
    fair, fifo = await experiment_flood(args, cost)
    print_flood([fair, fifo], args, cost, service_s)
    print()
    print(
        f"throughput_fraction={batched.tokens_per_s / batched.ideal_tokens_per_s:.3f}"
        f" steady_throughput_fraction="
        f"{batched.steady_tokens_per_s / batched.ideal_tokens_per_s:.3f}"
        f" fixed_throughput_fraction={fixed.tokens_per_s / fixed.ideal_tokens_per_s:.3f}"
        f" many_keys_throughput_fraction="
        f"{many_keys.tokens_per_s / many_keys.ideal_tokens_per_s:.3f}"
        f" speedup_vs_serial={speedup:.1f}"
        f" light_p95_wait_service_times={fair.light_wait_p95:.2f}"
        f" fifo_light_p95_wait_service_times={fifo.light_wait_p95:.2f}"
        f" light_p95_first_token_service_times={fair.light_ttft_p95:.2f}"
        f" fifo_light_p95_first_token_service_times={fifo.light_ttft_p95:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
