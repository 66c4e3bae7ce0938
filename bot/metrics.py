"""Prometheus metrics: the engine's load, the dialog's answers and feedback, the training runs.

Names follow vLLM's and LMDeploy's (``vllm:time_to_first_token_seconds`` becomes
``dishbot_time_to_first_token_seconds``), so dashboards made for them read dishbot's too.
Each `Metrics` has its own registry: there is no global state, and tests build several apps.

The engine is read when scraped (`Engine.stats`); the dialog reports as it goes (`Metrics`
is its `DialogObserver`); what lives in the database (runs, the active version) is read by
`Metrics.refresh` just before a scrape, since a collector cannot wait on the database.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bot.core.observer import AnswerTiming, Outcome
from bot.store import Store
from bot.store.models import RunStage
from engine.engine import Engine

log = logging.getLogger(__name__)

PREFIX = "dishbot_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: from a cached answer's instant to a long CPU answer behind a queue.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
RUNS_COUNTED = 1000  # the latest runs counted by state (older ones are history, not state)
# The engine counts no tokens: generated tokens are estimated from the answer's length. A
# token of InternLM2's tokenizer is about 4 bytes of English or 1-2 Chinese characters.
BYTES_PER_TOKEN = 4


def estimated_tokens(text: str) -> int:
    """About how many tokens the model generated for ``text`` (see `BYTES_PER_TOKEN`)."""
    if not text:
        return 0
    return max(1, round(len(text.encode("utf-8")) / BYTES_PER_TOKEN))


class Metrics:
    """One app's metrics: observe the dialog with it, point it at the engine and the store."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._queue_time = _histogram(
            self.registry, "request_queue_time_seconds", "Time questions waited in the queue"
        )
        self._first_text = _histogram(
            self.registry, "time_to_first_token_seconds", "Time until an answer's first words"
        )
        self._e2e = _histogram(
            self.registry, "e2e_request_latency_seconds", "Time until the whole answer"
        )
        self._tokens = Counter(
            PREFIX + "generation_tokens",
            "Generated tokens (estimated from the answers' length: the engine counts none)",
            registry=self.registry,
        )
        self._answers = Counter(
            PREFIX + "answers",
            "Questions by how they ended: answered, refused, cancelled, timed_out, "
            "unavailable, failed",
            ["outcome"],
            registry=self.registry,
        )
        self._ratings = Counter(
            PREFIX + "ratings", "Ratings stored", ["rating"], registry=self.registry
        )
        self._corrections = Counter(
            PREFIX + "corrections", "Corrections stored", registry=self.registry
        )
        self._state = _StateCollector()
        self.registry.register(self._state)
        self._store: Store | None = None

    # -- the dialog's observer --------------------------------------------------------------

    def answered(self, timing: AnswerTiming) -> None:
        """Count an answer and its timings."""
        self._answers.labels(outcome="answered").inc()
        self._queue_time.observe(timing.queued_s)
        if timing.first_text_s is not None:
            self._first_text.observe(timing.first_text_s)
        self._e2e.observe(timing.total_s)
        self._tokens.inc(estimated_tokens(timing.text))

    def not_answered(self, outcome: Outcome) -> None:
        """Count a question that ended without an answer."""
        self._answers.labels(outcome=outcome).inc()

    def rated(self, value: int) -> None:
        """Count a stored rating."""
        self._ratings.labels(rating="up" if value > 0 else "down").inc()

    def corrected(self) -> None:
        """Count a stored correction."""
        self._corrections.inc()

    # -- what is read, not counted ----------------------------------------------------------

    def watch(self, engine: Engine, store: Store) -> None:
        """Read the engine's queue, and the store's runs and active version, when scraped."""
        self._state.engine = engine
        self._store = store

    async def refresh(self) -> None:
        """Read the figures that live in the database; a failure keeps the last ones."""
        store = self._store
        if store is None:
            return
        try:
            runs = await store.training_runs(limit=RUNS_COUNTED)
            active = await store.active_model_version()
        except Exception:
            log.warning("metrics: could not read runs and versions from the database")
            return
        self._state.runs = Tally(run.stage.value for run in runs)
        self._state.active_version = active.name if active is not None else None

    async def scrape(self) -> bytes:
        """The metrics in Prometheus's text format, fresh from the database."""
        await self.refresh()
        return generate_latest(self.registry)


def _histogram(registry: CollectorRegistry, name: str, help_text: str) -> Histogram:
    return Histogram(PREFIX + name, help_text, buckets=LATENCY_BUCKETS, registry=registry)


class _StateCollector(Collector):
    """Gauges read at scrape time: the engine's queue and circuit, runs, the active version."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.runs: Tally[str] = Tally()
        self.active_version: str | None = None

    def collect(self) -> Iterator[Metric]:
        yield from self._engine_gauges()
        runs = GaugeMetricFamily(
            PREFIX + "training_runs",
            f"Training runs by state (of the latest {RUNS_COUNTED})",
            labels=["state"],
        )
        for stage in RunStage:
            runs.add_metric([stage.value], self.runs.get(stage.value, 0))
        yield runs
        version = GaugeMetricFamily(
            PREFIX + "model_version_info",
            "The active model version (1) and, if different, the one this process serves",
            labels=["version", "role"],
        )
        if self.active_version is not None:
            version.add_metric([self.active_version, "active"], 1)
        if self.engine is not None and self.engine.model.name != self.active_version:
            version.add_metric([self.engine.model.name, "served"], 1)
        yield version

    def _engine_gauges(self) -> Iterator[Metric]:
        if self.engine is None:
            return
        stats = self.engine.stats()
        yield GaugeMetricFamily(
            PREFIX + "num_requests_waiting", "Questions waiting in the queue", value=stats.waiting
        )
        yield GaugeMetricFamily(
            PREFIX + "num_requests_running",
            "Questions being answered now",
            value=stats.in_flight,
        )
        circuit = GaugeMetricFamily(
            PREFIX + "circuit_state",
            "The model's circuit breaker: 1 for its state (open: questions refused)",
            labels=["state"],
        )
        for state in ("closed", "open", "half_open"):
            circuit.add_metric([state], 1 if stats.circuit == state else 0)
        yield circuit
