"""Long conversations are trimmed to the model's context, oldest turns first, and say so."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from engine.engine import Engine, EngineConfig, Request
from engine.errors import PromptTooLong
from engine.types import ModelSpec, Turn
from tests.factories import jpeg_bytes
from tests.scripted_backend import ScriptedBackend

BASE = ModelSpec(path="/models/base", name="base")
CONTEXT_TOKENS = 8192


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend(capacity=2)


@pytest.fixture
async def engine(backend: ScriptedBackend) -> AsyncIterator[Engine]:
    config = EngineConfig(context_tokens=CONTEXT_TOKENS, max_new_tokens=512)
    async with Engine(backend, BASE, config) as engine:
        yield engine


def long_chain(turns: int = 50, characters: int = 4096) -> tuple[Turn, ...]:
    return tuple(
        Turn(question=f"question {n}: " + "叉" * characters, answer=f"answer {n}: char siu")
        for n in range(turns)
    )


async def test_a_fifty_turn_chain_reaches_the_backend_trimmed_newest_turns_kept_in_order(
    engine: Engine, backend: ScriptedBackend
) -> None:
    history = long_chain()

    handle = await engine.submit(
        Request(key="telegram:1", question="还有呢？", images=(jpeg_bytes(),), history=history)
    )
    await handle.result()

    (job,) = backend.jobs
    kept = len(job.history)
    assert 0 < kept < len(history)
    assert job.history == history[-kept:]
    assert handle.turns_left_out == len(history) - kept
    sent = sum(len(turn.question) + len(turn.answer) for turn in job.history)
    assert sent + len(job.question) + 512 < CONTEXT_TOKENS


async def test_a_conversation_that_fits_is_sent_whole(
    engine: Engine, backend: ScriptedBackend
) -> None:
    history = long_chain(turns=3, characters=200)

    handle = await engine.submit(
        Request(key="telegram:1", question="还有呢？", images=(jpeg_bytes(),), history=history)
    )
    await handle.result()

    assert backend.jobs[0].history == history
    assert handle.turns_left_out == 0


async def test_a_photo_and_question_that_cannot_fit_even_alone_are_refused(
    backend: ScriptedBackend,
) -> None:
    config = EngineConfig(context_tokens=1024, max_new_tokens=512, max_tiles=6)
    wide_photo = jpeg_bytes(size=(1344, 896))  # six tiles and a thumbnail: 1792 tokens
    async with Engine(backend, BASE, config) as engine:
        request = Request(key="telegram:1", question="这是什么？", images=(wide_photo,))
        with pytest.raises(PromptTooLong):
            await engine.submit(request)

    assert backend.jobs == []
