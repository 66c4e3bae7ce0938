"""A backend for engine tests: answers instantly-ish with scripted text, and records what it saw.

It stands in for the model only; the engine under test is the production code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from engine.errors import Cancelled, GenerationFailed, ModelLoadFailed, RequestRefused
from engine.types import BackendEvent, GenerationJob, JobDelta, JobFailed, JobFinished, ModelSpec

LONG_ANSWER = "\n\n".join(
    f"Paragraph {n}: char siu is Cantonese barbecued pork, glazed with honey and five-spice, "
    "roasted until the edges caramelise. " * 3
    for n in range(1, 31)
)


class ScriptedBackend:
    """Streams "<model name> says: <question>" word by word, ``step_s`` apart.

    Questions starting with "fail" fail that job; "crash" raises out of the batch;
    "slow" takes 100 steps; "long" answers with `LONG_ANSWER` (over 9000 characters,
    in paragraphs); "refuse" fails with `RequestRefused` (the request's fault); "hang"
    never says a word until cancelled; "freeze" never says a word and ignores cancellation, as
    an in-process backend whose worker thread is stuck (its batch ends only when the engine
    stops). Set ``down`` to make every batch raise, as an
    in-process backend whose GPU has failed does.
    """

    name = "scripted"

    def __init__(
        self,
        capacity: int = 4,
        max_batches: int | None = None,
        step_s: float = 0.005,
        load_s: float = 0.0,
    ):
        self._capacity = capacity
        self._max_batches = capacity if max_batches is None else max_batches
        self.step_s = step_s
        self.load_s = load_s
        self.model: ModelSpec | None = None
        self.loads: list[str] = []
        self.closed = False
        self.in_flight = 0
        self.max_in_flight = 0
        self.jobs: list[GenerationJob] = []
        self.answered_by: dict[str, str] = {}
        self.down = False

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_batches(self) -> int:
        return self._max_batches

    async def load(self, model: ModelSpec) -> None:
        await asyncio.sleep(self.load_s)
        if model.path == "missing":
            raise ModelLoadFailed(f"{model.path} does not exist")
        self.model = model
        self.loads.append(model.name)

    async def close(self) -> None:
        self.closed = True
        self.model = None

    async def generate(self, jobs: Sequence[GenerationJob]) -> AsyncGenerator[BackendEvent, None]:
        assert self.model is not None, "generate before load"
        model_name = self.model.name
        queue: asyncio.Queue[BackendEvent | None] = asyncio.Queue()
        self.in_flight += len(jobs)
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.jobs.extend(jobs)
        if self.down:
            self.in_flight -= len(jobs)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        async def run(index: int, job: GenerationJob) -> None:
            try:
                await self._run_one(index, job, model_name, queue)
            finally:
                self.in_flight -= 1

        tasks = [asyncio.create_task(run(i, job)) for i, job in enumerate(jobs)]
        done = asyncio.gather(*tasks)
        done.add_done_callback(lambda _: queue.put_nowait(None))
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved below
        try:
            while (event := await queue.get()) is not None:
                yield event
            await done  # re-raise a crash
        finally:
            for task in tasks:
                task.cancel()

    async def _run_one(
        self,
        index: int,
        job: GenerationJob,
        model_name: str,
        queue: asyncio.Queue[BackendEvent | None],
    ) -> None:
        if job.question.startswith("crash"):
            raise RuntimeError("the GPU caught fire")
        if job.question.startswith("refuse"):
            queue.put_nowait(JobFailed(index, RequestRefused("the prompt is too long")))
            return
        if job.question.startswith("freeze"):
            await asyncio.Event().wait()  # only task cancellation (engine stop) gets it out
        if job.question.startswith("hang"):
            await job.cancelled.wait()
            queue.put_nowait(JobFailed(index, Cancelled("cancelled")))
            return
        if job.question.startswith("fail"):
            queue.put_nowait(JobFailed(index, GenerationFailed("out of memory")))
            return
        answer = (
            LONG_ANSWER if job.question.startswith("long") else f"{model_name} says: {job.question}"
        )
        words = answer.split(" ")
        if job.question.startswith("long"):  # in bigger pieces, or it streams for seconds
            words = [" ".join(words[i : i + 100]) for i in range(0, len(words), 100)]
        steps = 100 if job.question.startswith("slow") else len(words)
        text = ""
        for step in range(steps):
            await asyncio.sleep(self.step_s)
            if job.cancelled.is_set():
                queue.put_nowait(JobFailed(index, Cancelled("cancelled")))
                return
            if step < len(words):
                delta = (" " if step else "") + words[step]
                text += delta
                queue.put_nowait(JobDelta(index, delta))
        self.answered_by[job.question] = model_name
        queue.put_nowait(JobFinished(index, text))
