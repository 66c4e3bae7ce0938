"""Plain data that crosses the engine's boundaries: requests, generation jobs, events."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.images import DecodedImage


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """How to generate: length, and greedy or sampled decoding."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9


@dataclass(frozen=True, slots=True)
class Turn:
    """One earlier question and answer of the same conversation."""

    question: str
    answer: str


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model to serve: where it is, what to call it, and the prompt it was trained with.

    ``system_prompt`` None means dishbot's default prompt (see `engine.prompts`); a model
    fine-tuned with XTuner must be served with the prompt it was trained with. ``template``
    is how the prompt is laid out: None or ``"chatml"``, the tokenizer's own chat template;
    ``"xtuner-internlm2"``, XTuner's InternLM2 layout (no newline between one turn's
    ``<|im_end|>`` and the next ``<|im_start|>``), which only the lmdeploy backend serves.
    """

    path: str
    name: str
    system_prompt: str | None = None
    template: str | None = None


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What decoding learned about a submitted photo: its format and upright size."""

    format: str  # "JPEG", "PNG", "WEBP" or "HEIF"
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class GenerationJob:
    """One request as a backend sees it: decoded images, the conversation, how to answer.

    The backend should stop working on a job once ``cancelled`` is set; the engine has
    already told the user by then, so any further output for it is ignored.
    """

    images: tuple[DecodedImage, ...]
    history: tuple[Turn, ...]
    question: str
    system_prompt: str
    params: GenerationParams
    max_tiles: int
    cancelled: asyncio.Event = field(default_factory=asyncio.Event, compare=False)


# What a backend yields from `generate`, each tagged with the job's index in the batch.
# Every job gets exactly one `JobFinished` or `JobFailed`, after any number of `JobDelta`.


@dataclass(frozen=True, slots=True)
class JobDelta:
    index: int
    text: str


@dataclass(frozen=True, slots=True)
class JobFinished:
    index: int
    text: str
    finish_reason: str = "stop"  # "stop" (the model ended) or "length" (max_new_tokens)


@dataclass(frozen=True, slots=True)
class JobFailed:
    index: int
    error: Exception


BackendEvent = JobDelta | JobFinished | JobFailed
