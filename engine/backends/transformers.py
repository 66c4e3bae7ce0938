"""The transformers backend: an HF-native InternVL checkpoint on CPU or any torch device.

It serves checkpoints in transformers' own InternVL format (``model_type`` "internvl", like
``OpenGVLab/InternVL3-1B-hf``) with static batching: one ``model.generate`` call at a time,
all of its jobs left-padded into one batch. Images are tiled by dishbot itself
(`engine.backends.torch_pixels`) and each tile stands in the prompt as the model's image
context tokens, so the prompt is the exact ChatML text that training export writes.

User text never becomes a control token: its control-token strings are broken by the shared
template (`engine.prompts.neutralise_control_tokens`, with this tokenizer's special and added
tokens), and the template's markup and the messages' texts are tokenized apart, the texts
with special tokens split into plain characters. Jobs share one ``model.generate`` call, so
when a batch fails, its jobs that had shown nothing yet are run again each alone: one job's
inputs cannot cost the others their answers.

Generation runs on one worker thread owned by the backend, so the event loop stays free and a
model swap never overlaps a batch. Text streams back per job while the batch runs; each job
stops on its own (end of answer, its own ``max_new_tokens``, or cancellation).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoTokenizer, InternVLForConditionalGeneration
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from engine.backends import torch_pixels
from engine.backends.worker_thread import WorkerThread
from engine.errors import Cancelled, EngineError, GenerationFailed, ModelLoadFailed
from engine.prompts import PromptPart, build_messages, render_chatml_parts
from engine.types import (
    BackendEvent,
    GenerationJob,
    GenerationParams,
    JobDelta,
    JobFailed,
    JobFinished,
    ModelSpec,
)

logger = logging.getLogger(__name__)

# InternVL's markers around one image's context tokens; the context token itself is the one
# whose id the checkpoint's config names (`image_token_id`).
START_IMAGE_TOKEN = "<img>"
END_IMAGE_TOKEN = "</img>"
# Where a ChatML answer ends; Qwen2's end-of-text (the pad token) ends it too.
END_OF_TURN_TOKEN = "<|im_end|>"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

FinishReason = Literal["stop", "length", "cancelled"]
Emit = Callable[[BackendEvent | None], None]


@dataclass(frozen=True, slots=True)
class TransformersConfig:
    """How the transformers backend runs a model.

    ``device``: "auto" (CUDA when available, else CPU) or a torch device ("cpu", "cuda:1").
    ``max_batch_size``: the most jobs generated together in one batch.
    ``dtype``: "auto" (bfloat16 on CUDA, float32 elsewhere), "float32", "bfloat16", "float16".
    """

    device: str = "auto"
    max_batch_size: int = 8
    dtype: str = "auto"


@dataclass(frozen=True, slots=True)
class _LoadedModel:
    """A model ready to serve and what generation needs to know about it."""

    path: str
    model: Any  # InternVLForConditionalGeneration; transformers' stubs are too loose to use
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    image_tokens_per_tile: int
    tile_size: int
    image_context_token: str
    pad_token_id: int
    stop_token_ids: frozenset[int]
    control_tokens: tuple[str, ...]  # the tokenizer's special and added tokens


@dataclass(slots=True)
class _PreparedJob:
    """A job turned into model inputs: its prompt's parts and its images' tiles."""

    index: int
    job: GenerationJob
    prompt: list[PromptPart]
    pixel_values: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class _BatchFailed:
    """``model.generate`` raised; the rows not finished by then are left to the caller."""

    error: Exception


@dataclass(slots=True)
class _Row:
    """One job's place in a running batch. Touched only by the worker thread until it ends."""

    index: int
    max_new_tokens: int
    cancelled: asyncio.Event
    tokens: list[int] = field(default_factory=list)
    received: int = 0
    stop_after: int | None = None  # tokens the row keeps, once something decided it stops
    reason: FinishReason | None = None
    emitted: str = ""
    done: bool = False  # its JobFinished or JobFailed has been sent


class TransformersBackend:
    """Static-batching backend over transformers' `InternVLForConditionalGeneration`."""

    name = "transformers"

    def __init__(self, config: TransformersConfig | None = None) -> None:
        self._config = config or TransformersConfig()
        if self._config.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._loaded: _LoadedModel | None = None
        self._executor: WorkerThread | None = None

    @property
    def capacity(self) -> int:
        """How many jobs may generate at once: the batch size."""
        return self._config.max_batch_size

    @property
    def max_batches(self) -> int:
        """One: a batch runs to its end before the next starts."""
        return 1

    async def load(self, model: ModelSpec) -> None:
        """Load ``model``, releasing any loaded one first; raise `ModelLoadFailed` if it cannot.

        The old model is released before the new one loads, so that two never need memory at
        once; after a failed load no model is loaded. Waits for a running batch to end.
        """
        if model.template not in (None, "chatml"):
            # XTuner's layout is served by the lmdeploy backend only (see engine/prompts.py).
            raise ModelLoadFailed(
                f"{model.name} was trained for the {model.template} prompt layout, which the "
                "transformers backend does not serve: serve it with the lmdeploy backend"
            )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._worker(), self._load_blocking, model.path)

    async def close(self) -> None:
        """Release the model and its memory, after any running batch ends."""
        if self._executor is None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._release)
        self._executor.shutdown(wait=False)
        self._executor = None

    async def generate(self, jobs: Sequence[GenerationJob]) -> AsyncGenerator[BackendEvent, None]:
        """Generate answers for ``jobs``, streaming each job's text as it comes.

        Jobs whose sampling settings differ cannot share a ``model.generate`` call; they run
        as consecutive batches. Yields `JobDelta` events and one `JobFinished` or `JobFailed`
        per job. Closing the iterator early stops the running batch.
        """
        loaded = self._loaded
        if loaded is None:
            for index in range(len(jobs)):
                yield JobFailed(index, GenerationFailed("no model is loaded"))
            return
        prepared: list[_PreparedJob] = []
        for index, job in enumerate(jobs):
            if job.cancelled.is_set():
                yield JobFailed(index, Cancelled("the request was cancelled"))
                continue
            try:
                # Tiling resizes and normalises whole images: CPU work, off the event loop.
                prepared.append(await asyncio.to_thread(_prepare_job, loaded, index, job))
            except Exception as error:
                yield JobFailed(index, _as_engine_error(error, "could not prepare the images"))
        for batch in _batches(prepared, self.capacity):
            async with aclosing(self._run_batch(loaded, batch)) as events:
                async for event in events:
                    yield event

    async def _run_batch(
        self, loaded: _LoadedModel, batch: list[_PreparedJob]
    ) -> AsyncGenerator[BackendEvent, None]:
        """Generate ``batch`` together; if that fails, each job that had shown nothing alone.

        One job's inputs can fail the whole ``model.generate`` call; run alone, the others
        get their answers and only that job fails. A job that had already streamed text
        fails with the batch, since starting it again would show its beginning twice.
        """
        rows = [
            _Row(prepared.index, prepared.job.params.max_new_tokens, prepared.job.cancelled)
            for prepared in batch
        ]
        failure: Exception | None = None
        async with aclosing(self._generate_batch(loaded, batch, rows)) as events:
            async for event in events:
                if isinstance(event, _BatchFailed):
                    failure = event.error
                else:
                    yield event
        if failure is None:
            return
        unfinished = [
            (prepared, row) for prepared, row in zip(batch, rows, strict=True) if not row.done
        ]
        if len(batch) > 1:
            logger.warning(
                "a batch of %d jobs failed (%s); running the %d unfinished ones alone",
                len(batch),
                _first_line(failure),
                len(unfinished),
            )
        for prepared, row in unfinished:
            if len(batch) > 1 and not row.emitted and not row.cancelled.is_set():
                async with aclosing(self._run_batch(loaded, [prepared])) as events:
                    async for event in events:
                        yield event
            else:
                yield JobFailed(row.index, _failure(row, failure))

    async def _generate_batch(
        self, loaded: _LoadedModel, batch: list[_PreparedJob], rows: list[_Row]
    ) -> AsyncGenerator[BackendEvent | _BatchFailed, None]:
        """Run one ``model.generate`` on the worker thread and relay what it streams."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[BackendEvent | None] = asyncio.Queue()
        stop = threading.Event()

        def emit(event: BackendEvent | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                stop.set()

        work = _BatchRun(loaded, batch, rows, stop, emit)
        future = loop.run_in_executor(self._worker(), work.run)
        try:
            while (event := await queue.get()) is not None:
                yield event
            try:
                await future
            except Exception as error:
                yield _BatchFailed(error)
        finally:
            # Reached early when the consumer stops listening: the batch must not run on.
            stop.set()
            await asyncio.wait([future])

    def _worker(self) -> WorkerThread:
        # One thread: batches, loads and releases never overlap. A daemon thread, so a load
        # still running when the process is told to stop does not keep it alive.
        if self._executor is None:
            self._executor = WorkerThread("transformers")
        return self._executor

    def _load_blocking(self, path: str) -> None:
        self._release()
        self._loaded = _load_model(path, self._config)

    def _release(self) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is None:
            return
        on_cuda = loaded.device.type == "cuda"
        del loaded
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()


class _BatchRun:
    """One ``model.generate`` call: its inputs, its streamer and its per-row stopping rule."""

    def __init__(
        self,
        loaded: _LoadedModel,
        batch: list[_PreparedJob],
        rows: list[_Row],
        stop: threading.Event,
        emit: Emit,
    ) -> None:
        self._loaded = loaded
        self._batch = batch
        self._rows = rows
        self._stop = stop
        self._emit = emit

    def run(self) -> None:
        """Generate the batch (on the worker thread); always ends by emitting None."""
        try:
            self._generate()
        finally:
            self._emit(None)

    def _generate(self) -> None:
        loaded = self._loaded
        prompts = [_prompt_ids(loaded.tokenizer, prepared.prompt) for prepared in self._batch]
        input_ids, attention_mask = _left_padded(prompts, loaded.pad_token_id)
        input_ids = input_ids.to(loaded.device)
        tiles = [p.pixel_values for p in self._batch if p.pixel_values is not None]
        pixel_values = _joined(tiles).to(loaded.device, loaded.dtype) if tiles else None
        stop_ids = sorted(loaded.stop_token_ids)
        with torch.inference_mode():
            loaded.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask.to(loaded.device),
                pixel_values=pixel_values,
                max_new_tokens=max(row.max_new_tokens for row in self._rows),
                pad_token_id=loaded.pad_token_id,
                eos_token_id=stop_ids,
                streamer=_BatchStreamer(loaded, self._rows, self._emit),
                stopping_criteria=StoppingCriteriaList(
                    [_RowStopper(self._rows, input_ids.shape[1], loaded.stop_token_ids, self._stop)]
                ),
                **_sampling(self._batch[0].job.params),
            )


class _RowStopper(StoppingCriteria):
    """Stops each row on its own: end of answer, its own length limit, or cancellation."""

    def __init__(
        self,
        rows: list[_Row],
        prompt_length: int,
        stop_token_ids: frozenset[int],
        stop: threading.Event,
    ) -> None:
        self._rows = rows
        self._prompt_length = prompt_length
        self._stop_token_ids = stop_token_ids
        self._stop = stop

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs: Any
    ) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self._prompt_length
        last_tokens = input_ids[:, -1].tolist()
        for row, token in zip(self._rows, last_tokens, strict=True):
            if row.reason is not None:
                continue
            if token in self._stop_token_ids:
                row.reason = "stop"
            elif self._stop.is_set() or row.cancelled.is_set():
                row.reason = "cancelled"
            elif generated >= row.max_new_tokens:
                row.reason = "length"
            else:
                continue
            row.stop_after = generated
        stopped = [row.reason is not None for row in self._rows]
        return torch.tensor(stopped, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class _BatchStreamer(BaseStreamer):
    """Turns each step's new token ids (one per row) into per-job text deltas.

    A row's text is its whole answer decoded anew each step, and only what has settled is
    sent: a character split over several byte-level tokens decodes as a trailing U+FFFD until
    its last byte arrives, so trailing U+FFFD is held back.
    """

    def __init__(self, loaded: _LoadedModel, rows: list[_Row], emit: Emit) -> None:
        self._tokenizer = loaded.tokenizer
        self._stop_token_ids = loaded.stop_token_ids
        self._rows = rows
        self._emit = emit
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """Take the prompt (ignored) or one step's tokens, shape (batch,) or (batch, 1)."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for row, token in zip(self._rows, value.reshape(-1).tolist(), strict=True):
            if row.done:
                continue
            # Stopped by a rule that ran before this step: the token is padding.
            if row.stop_after is not None and row.received >= row.stop_after:
                self._finish(row)
                continue
            row.received += 1
            if token in self._stop_token_ids:
                row.reason = "stop"
                self._finish(row)
                continue
            row.tokens.append(token)
            if not row.cancelled.is_set():
                self._send_settled_text(row)
            if row.stop_after is not None and row.received >= row.stop_after:
                self._finish(row)

    def end(self) -> None:
        """Finish every row still open when generation ends."""
        for row in self._rows:
            if not row.done:
                self._finish(row)

    def _decode(self, row: _Row) -> str:
        text: str = self._tokenizer.decode(
            row.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return text

    def _send_settled_text(self, row: _Row) -> None:
        settled = self._decode(row).rstrip("\ufffd")
        if len(settled) > len(row.emitted) and settled.startswith(row.emitted):
            self._emit(JobDelta(row.index, settled[len(row.emitted) :]))
            row.emitted = settled

    def _finish(self, row: _Row) -> None:
        row.done = True
        if row.reason == "cancelled" or (row.reason is None and row.cancelled.is_set()):
            self._emit(JobFailed(row.index, Cancelled("the request was cancelled")))
            return
        text = self._decode(row)
        if len(text) > len(row.emitted) and text.startswith(row.emitted):
            self._emit(JobDelta(row.index, text[len(row.emitted) :]))
        self._emit(JobFinished(row.index, text, "stop" if row.reason == "stop" else "length"))


def _load_model(path: str, config: TransformersConfig) -> _LoadedModel:
    """Load the checkpoint at ``path`` (blocking); raise `ModelLoadFailed` with the reason."""
    # A hub id ("OpenGVLab/InternVL3-1B-hf") is left to from_pretrained and its cache.
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().is_dir():
        raise ModelLoadFailed(f"model directory {path} does not exist")
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # not in a server log
    device = _device(config.device)
    dtype = _dtype(config.dtype, device)
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except Exception as error:
        raise ModelLoadFailed(
            f"cannot read the model config in {path}: {_first_line(error)}"
        ) from error
    if hf_config.model_type != "internvl":
        raise ModelLoadFailed(
            f"{path} holds a {hf_config.model_type!r} model, not an HF-native InternVL checkpoint"
            " (model_type 'internvl', like OpenGVLab/InternVL3-1B-hf)"
        )
    tokens_per_tile = image_tokens_per_tile(hf_config)
    # Any from here on: transformers' stubs type token ids as "int | list[int]" and the like.
    model: Any
    tokenizer: Any
    try:
        model = InternVLForConditionalGeneration.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    except Exception as error:
        raise ModelLoadFailed(f"cannot load the model in {path}: {_first_line(error)}") from error
    model.to(device).eval()
    image_context_token = tokenizer.convert_ids_to_tokens(hf_config.image_token_id)
    if not isinstance(image_context_token, str) or (
        tokenizer.unk_token_id is not None and hf_config.image_token_id == tokenizer.unk_token_id
    ):
        raise ModelLoadFailed(
            f"the tokenizer in {path} has no image token (id {hf_config.image_token_id})"
        )
    end_of_turn = _end_of_turn_id(tokenizer)
    if end_of_turn is None:
        raise ModelLoadFailed(
            f"the tokenizer in {path} has neither {END_OF_TURN_TOKEN} nor an end-of-text token"
        )
    pad_token_id = (
        int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else end_of_turn
    )
    return _LoadedModel(
        path=path,
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        image_tokens_per_tile=tokens_per_tile,
        tile_size=int(hf_config.vision_config.image_size[0]),
        image_context_token=image_context_token,
        pad_token_id=pad_token_id,
        stop_token_ids=frozenset({end_of_turn, pad_token_id}),
        control_tokens=control_tokens(tokenizer),
    )


def _end_of_turn_id(tokenizer: Any) -> int | None:
    """ChatML's <|im_end|> if the tokenizer has it, else its end-of-text token."""
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
        return token_id
    eos = tokenizer.eos_token_id
    return int(eos) if isinstance(eos, int) else None


def image_tokens_per_tile(hf_config: Any) -> int:
    """How many image context tokens one 448-pixel tile becomes in ``hf_config``'s model.

    The vision tower cuts a tile into (image_size / patch_size)² patches and the pixel
    shuffle merges them by ``downsample_ratio`` in each direction: 256 for InternVL3.
    """
    vision = hf_config.vision_config
    height, width = vision.image_size
    patch_height, patch_width = vision.patch_size
    if height != width:
        raise ModelLoadFailed(
            f"the model's vision tower takes {height}x{width} tiles; InternVL tiles are square"
        )
    patches: int = (height // patch_height) * (width // patch_width)
    downsample_ratio: float = hf_config.downsample_ratio
    return round(patches * downsample_ratio**2)


def _prepare_job(loaded: _LoadedModel, index: int, job: GenerationJob) -> _PreparedJob:
    """Tile the job's images and render its prompt with one context token per tile token."""
    tiles = [
        torch_pixels.pixel_values(image.image, job.max_tiles, loaded.tile_size)
        for image in job.images
    ]

    def image_text(image_index: int) -> str:
        tokens = loaded.image_tokens_per_tile * len(tiles[image_index])
        return image_prompt_text(loaded.image_context_token, tokens)

    messages = build_messages(
        job.system_prompt, job.history, job.question, len(job.images), loaded.control_tokens
    )
    prompt = render_chatml_parts(messages, image_text=image_text)
    return _PreparedJob(index, job, prompt, _joined(tiles) if tiles else None)


def control_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's special and added tokens, which user text must never spell."""
    return tuple({*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()})


def image_prompt_text(image_context_token: str, tokens: int) -> str:
    """The text standing for one image in a prompt: ``tokens`` context tokens in <img>...</img>.

    dishbot's trainer builds its prompts with this too, so what is trained is what is served.
    """
    # <img> and </img> frame the image as in training; a tokenizer without them as special
    # tokens just reads them as text, which only the context tokens matter for.
    return START_IMAGE_TOKEN + image_context_token * tokens + END_IMAGE_TOKEN


def prompt_part_ids(tokenizer: Any, prompt: Sequence[PromptPart]) -> list[list[int]]:
    """Each part's token ids: the template's markup with its control tokens, the messages'
    texts as plain text, in which no string can become a special token.

    dishbot's trainer tokenizes with this too, so what is trained is what is served.
    """
    # Two tokenizer calls per prompt, not one per part; the parts keep their order.
    markup_texts = [part.text for part in prompt if part.markup]
    plain_texts = [part.text for part in prompt if not part.markup]
    markup = iter(tokenizer(markup_texts, add_special_tokens=False)["input_ids"])
    plain = iter(
        tokenizer(plain_texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    )
    return [list(next(markup if part.markup else plain)) for part in prompt]


def _prompt_ids(tokenizer: Any, prompt: list[PromptPart]) -> list[int]:
    """The prompt's token ids (see `prompt_part_ids`), one list."""
    return [token for ids in prompt_part_ids(tokenizer, prompt) for token in ids]


def _left_padded(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one batch, padded on the left, and its attention mask."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def _joined(tiles: list[torch.Tensor]) -> torch.Tensor:
    """Tile tensors one after another; one alone as it is (a six-tile photo is 17 MB to copy)."""
    return tiles[0] if len(tiles) == 1 else torch.cat(tiles)


def _batches(prepared: list[_PreparedJob], size: int) -> list[list[_PreparedJob]]:
    """Jobs that can share a ``model.generate`` call, at most ``size`` together."""
    groups: dict[tuple[bool, float, float], list[_PreparedJob]] = {}
    for job in prepared:
        params = job.job.params
        # Greedy decoding ignores temperature and top_p, so all greedy jobs can share.
        key = (True, params.temperature, params.top_p) if params.do_sample else (False, 0.0, 0.0)
        groups.setdefault(key, []).append(job)
    return [
        group[start : start + size]
        for group in groups.values()
        for start in range(0, len(group), size)
    ]


def _sampling(params: GenerationParams) -> dict[str, Any]:
    if not params.do_sample:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ModelLoadFailed(f"unknown torch device {name!r}") from error


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ModelLoadFailed(f"unknown dtype {name!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _failure(row: _Row, error: Exception) -> EngineError:
    if row.cancelled.is_set():
        return Cancelled("the request was cancelled")
    failure = GenerationFailed(f"generation failed: {_first_line(error)}")
    failure.__cause__ = error
    return failure


def _as_engine_error(error: Exception, doing: str) -> EngineError:
    if isinstance(error, EngineError):
        return error
    failure = GenerationFailed(f"{doing}: {_first_line(error)}")
    failure.__cause__ = error
    return failure


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
