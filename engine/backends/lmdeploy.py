"""The `lmdeploy` backend: InternVL2 served in this process on the GPU by lmdeploy.

lmdeploy batches continuously: every job is its own lmdeploy session, started as soon as the
scheduler hands it over, so ``max_batches`` equals ``capacity`` (lmdeploy's max_batch_size).

What it promises:

* The model is loaded with lmdeploy's own chat template for it (no template name is passed;
  the old ``internvl2-internlm2`` name no longer exists) and the job's system prompt is sent
  as a system message, so dishbot's prompt is what the model sees instead of lmdeploy's
  default.
* A model fine-tuned with XTuner (``ModelSpec.template == "xtuner-internlm2"``) is served in
  exactly the layout XTuner trained it in (``xtuner/dataset/internvl_dataset.py``): its
  system prompt, no newline between one turn's ``<|im_end|>`` and the next
  ``<|im_start|>``, the photos' ``<img>...</img>`` and a newline before the first question,
  questions and answers stripped. lmdeploy would apply the tokenizer's own template (and
  ignores ``ChatTemplateConfig(model_name='hf', meta_instruction=...)``), so dishbot renders
  this prompt itself and sends it with ``do_preprocess=False``, which lmdeploy copies as it
  is, putting each image where its item stands (`xtuner_internlm2_messages`).
* Photos go in as PIL images, not re-encoded, each limited to ``job.max_tiles`` tiles.
* User text reaches lmdeploy with its control tokens broken (`engine.prompts`): lmdeploy
  copies message text into the prompt verbatim, cuts the prompt at every ``<IMG_CONTEXT>``
  to splice the images in (failing the request if the count is off), and its tokenizer
  reads any special token in the text as that token. The tokens are the generic ones and
  those the model's tokenizer files declare, read at load.
* Greedy or sampled decoding is always said explicitly (lmdeploy decodes greedily unless
  ``do_sample=True``).
* A job whose ``cancelled`` event is set ends at once with ``JobFailed(index, Cancelled(...))``
  and its lmdeploy session is aborted; closing the `generate` stream early aborts all of its
  sessions.
* Loading a model closes the previous one first and frees its GPU memory; so does `close`.

lmdeploy API relied on -- read from the InternLM/lmdeploy sources, NOT run here (lmdeploy
needs CUDA; tests/test_lmdeploy_backend.py checks this module against a stand-in that keeps
the same contract). No v0.18.0 tag or source was reachable when this was written (its
version bump was still an open pull request); the newest source read was the main branch
just after v0.16.0 (commit 1263d5cd8, 2026-08-21), whose APIs below date from the
AsyncEngine refactor of early 2026. Recheck them against 0.18 on a GPU host.

* ``lmdeploy/__init__.py``: ``pipeline``, ``GenerationConfig``, ``TurbomindEngineConfig``,
  ``PytorchEngineConfig`` are exported at the top level.
* ``lmdeploy/api.py``: ``pipeline(model_path, backend_config=None, chat_template_config=None,
  log_level='WARNING', max_log_len=None, trust_remote_code=False, speculative_config=None,
  allowed_media_domains=None, **kwargs) -> Pipeline``; blocking (loads weights).
* ``lmdeploy/messages.py``: ``TurbomindEngineConfig`` and ``PytorchEngineConfig`` both take
  ``dtype``, ``tp``, ``session_len``, ``max_batch_size``, ``cache_max_entry_count``.
  ``GenerationConfig(max_new_tokens=512, do_sample=False, top_p=1.0, top_k=50,
  temperature=0.8, ...)`` asserts 0 <= top_p <= 1 and 0 <= temperature <= 2. ``Response``
  has ``text``, ``finish_reason`` ('stop' | 'length' | 'error' | 'abort' | None), ``index``,
  ``error_code`` and ``error_message``.
* ``lmdeploy/serve/core/async_engine.py``: ``_determine_gen_config`` forces greedy decoding
  (top_k=1) unless ``do_sample`` is true; ``update_from_hf_gen_cfg`` (messages.py) takes only
  stop tokens from the model's generation_config.json, not do_sample. ``generate`` streams
  the text detokenized since the previous output (a delta) with ``finish_reason=None``,
  then one last output carrying the finish reason and usually empty text.
* ``lmdeploy/pipeline.py``: ``Pipeline.session() -> Session``;
  ``Pipeline.stream_infer(prompts, sessions=None, gen_config=None, do_preprocess=True,
  adapter_name=None, stream_response=True)`` takes a list of conversations (each a list of
  OpenAI-style messages) with one session and one GenerationConfig each, runs them on
  the pipeline's own event loop thread and returns a blocking iterator of ``Response``
  where ``index`` is the conversation's position; each conversation ends with one Response
  with a finish reason ('error' ones carry ``error_code``/``error_message``), and the
  iterator ends when all have. ``Pipeline.close()`` stops that thread and the engine.
  ``AsyncEngine.generate`` itself is bound to that thread's loop (``start_loop``), so it is
  not called from dishbot's loop.
* ``lmdeploy/serve/managers/session_manager.py``: ``Session.session_id`` (unique, from a
  counter); ``Session.abort()`` (blocking) cancels the session's running request in the
  engine, which then ends it with ``finish_reason='abort'``; it does nothing before the
  request holds an engine instance, hence the repeated abort below.
* ``lmdeploy/serve/processors/multimodal.py``: a content item ``{'type': 'image_data',
  'image_data': {'data': <PIL image>, **params}}`` is an image; ``params`` reach the vision
  model. ``lmdeploy/vl/model/internvl.py`` reads ``params['max_dynamic_patch']`` as the
  image's tile limit and puts ``<img>...</img>\\n`` where the image item is, so images
  before the text give InternVL's training layout.
* ``lmdeploy/model.py``: with no ``chat_template_config`` the template is matched from the
  model path; no built-in template matches InternVL2, so the ``hf`` template (the model's
  own tokenizer chat template, ChatML with no default system prompt) is used.
  ``BaseChatTemplate()`` (every part empty) ``messages2prompt`` concatenates the messages'
  contents and nothing else.
* ``lmdeploy/serve/processors/multimodal.py`` ``get_prompt_input``: with
  ``do_preprocess=False`` both the text-only path (``_get_text_prompt_input``, which joins a
  message's text items with ``\\n``) and the multimodal path
  (``_get_multimodal_prompt_input``, then the vision model's ``to_pytorch`` /
  ``to_turbomind``) render with ``BaseChatTemplate()`` instead of the model's template.
* ``lmdeploy/vl/model/internvl.py`` ``proc_messages`` writes each image item as
  ``<img><IMG_CONTEXT></img>\\n`` and copies text verbatim (``<IMAGE_TOKEN>`` in a user's
  text selects an older layout); ``vl/model/base.py`` ``to_pytorch_aux`` /
  ``to_turbomind_aux`` split the prompt at ``<IMG_CONTEXT>``, assert one split per image,
  and tokenize each piece with the HF tokenizer, special tokens included;
  ``lmdeploy/pipeline.py`` ``_infer`` turns a failed request into its own 'error' Response.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from engine.backends.worker_thread import WorkerThread
from engine.errors import Cancelled, GenerationFailed, ModelLoadFailed
from engine.prompts import ChatMessage, build_messages
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

INSTALL_HINT = "lmdeploy is not installed; pip install 'dishbot[gpu]' on a CUDA machine"

# How long `close` lets aborted requests wind down before the engine under them is stopped.
CLOSE_GRACE_S = 10.0

# ModelSpec.template values: the tokenizer's own chat template, or XTuner's InternLM2 layout.
CHATML_TEMPLATES = (None, "chatml")
XTUNER_INTERNLM2 = "xtuner-internlm2"


@dataclass(frozen=True, slots=True)
class LMDeployConfig:
    """How lmdeploy runs the model: which engine, how many requests at once, how much memory.

    ``max_batch_size`` is the number of jobs generating at once (the backend's capacity);
    ``session_len`` bounds prompt plus answer in tokens (image tokens included: 256 per
    tile); ``cache_max_entry_count`` is the share of free GPU memory given to the KV cache
    (TurboMind also reads a whole number above 1 as a count of cache blocks).
    """

    engine: Literal["turbomind", "pytorch"] = "turbomind"
    max_batch_size: int = 16
    tp: int = 1
    session_len: int = 8192
    cache_max_entry_count: float = 0.8
    dtype: str = "auto"
    log_level: str = "WARNING"

    def __post_init__(self) -> None:
        if self.engine not in ("turbomind", "pytorch"):
            raise ValueError(f"engine must be 'turbomind' or 'pytorch', not {self.engine!r}")
        if min(self.max_batch_size, self.tp, self.session_len) < 1:
            raise ValueError("max_batch_size, tp and session_len must be at least 1")
        if self.cache_max_entry_count <= 0:
            raise ValueError("cache_max_entry_count must be positive")


def lmdeploy_messages(
    job: GenerationJob, model_tokens: Sequence[str] = ()
) -> list[dict[str, object]]:
    """The job's conversation in the GPT4V-style message format lmdeploy's pipeline takes.

    The system prompt is the first message; photos are PIL images in the first user turn,
    before its text, each with ``max_dynamic_patch`` set to the job's tile limit. Control
    tokens in the questions and answers (``model_tokens`` and the generic ones) are broken.
    """
    messages: list[dict[str, object]] = []
    images = iter(job.images)
    conversation = build_messages(
        job.system_prompt, job.history, job.question, len(job.images), model_tokens
    )
    for message in conversation:
        if not message.images:
            messages.append({"role": message.role, "content": message.text})
            continue
        content: list[dict[str, object]] = [
            {
                "type": "image_data",
                "image_data": {"data": next(images).image, "max_dynamic_patch": job.max_tiles},
            }
            for _ in range(message.images)
        ]
        content.append({"type": "text", "text": message.text})
        messages.append({"role": message.role, "content": content})
    return messages


def xtuner_internlm2_messages(
    job: GenerationJob, model_tokens: Sequence[str] = ()
) -> list[dict[str, object]]:
    """The job as one prompt in XTuner's InternLM2 layout, for ``do_preprocess=False``.

    One user message holds the whole rendered prompt as text items, with the photos' image
    items where lmdeploy must put them (it writes ``<img><IMG_CONTEXT></img>\\n`` for each,
    as XTuner's dataset does before the first question). Control tokens in the questions and
    answers are broken, as for `lmdeploy_messages`.
    """
    conversation = build_messages(
        job.system_prompt, job.history, job.question, len(job.images), model_tokens
    )
    content: list[dict[str, object]] = []
    text = ""
    for message in conversation:
        if message.role != "user":
            text += _xtuner_turn_end(message)
            continue
        text += "<|im_start|>user\n"
        if message.images:
            content.append({"type": "text", "text": text})
            content += [
                {
                    "type": "image_data",
                    "image_data": {"data": image.image, "max_dynamic_patch": job.max_tiles},
                }
                for image in job.images[: message.images]
            ]
            text = ""
        text += message.text.strip() + "<|im_end|><|im_start|>assistant\n"
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def _xtuner_turn_end(message: ChatMessage) -> str:
    if message.role == "system":
        return f"<|im_start|>system\n{message.text}<|im_end|>"
    return message.text.strip() + "<|im_end|>"  # an answer, after its question's assistant tag


def generation_config_kwargs(params: GenerationParams) -> dict[str, object]:
    """Keyword arguments for lmdeploy's ``GenerationConfig``; ``do_sample`` always explicit."""
    return {
        "max_new_tokens": params.max_new_tokens,
        "do_sample": params.do_sample,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }


class LMDeployBackend:
    """The Backend protocol over an in-process lmdeploy pipeline (TurboMind or PyTorch)."""

    name = "lmdeploy"

    def __init__(self, config: LMDeployConfig | None = None) -> None:
        self.config = config or LMDeployConfig()
        self._lmdeploy: ModuleType | None = None
        self._pipeline: Any = None
        self._model: ModelSpec | None = None
        self._model_tokens: tuple[str, ...] = ()
        # Streams whose lmdeploy requests may still run, even after their generate() ended.
        self._streams: set[_Stream] = set()

    @property
    def capacity(self) -> int:
        """Jobs generating at once: lmdeploy's ``max_batch_size``."""
        return self.config.max_batch_size

    @property
    def max_batches(self) -> int:
        """Equal to capacity: lmdeploy takes each job as its own session as slots free up."""
        return self.config.max_batch_size

    @property
    def model(self) -> ModelSpec | None:
        """The model loaded now, if any."""
        return self._model

    async def load(self, model: ModelSpec) -> None:
        """Load ``model`` with lmdeploy, closing (and freeing) any model loaded before.

        Raises `ModelLoadFailed` when lmdeploy is not installed or cannot load the model.
        """
        lmdeploy = _import_lmdeploy()
        if model.template not in (*CHATML_TEMPLATES, XTUNER_INTERNLM2):
            raise ModelLoadFailed(
                f"{model.name!r} needs the prompt template {model.template!r}, which the "
                "lmdeploy backend does not know"
            )
        await self.close()
        model_tokens = await asyncio.to_thread(tokenizer_control_tokens, model.path)
        backend_config = self._backend_config(lmdeploy)
        build = _pipeline_builder(lmdeploy, model.path, backend_config, self.config.log_level)
        # On a daemon thread of its own: a build still running when dishbot is told to stop
        # is abandoned at exit instead of holding the process until it ends.
        loader = WorkerThread("lmdeploy-load")
        future = asyncio.get_running_loop().run_in_executor(loader, build)
        loader.shutdown(wait=False)  # the thread ends after this one call
        try:
            # Shielded: a thread cannot be stopped, so a load abandoned (say, by a timeout)
            # still finishes, and the pipeline it makes must then be closed, not leaked.
            pipeline = await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_release_abandoned)
            raise
        except Exception as error:
            raise ModelLoadFailed(
                f"lmdeploy could not load {model.name!r} from {model.path}: {error}"
            ) from error
        self._lmdeploy = lmdeploy
        self._pipeline = pipeline
        self._model = model
        self._model_tokens = model_tokens
        logger.info("lmdeploy loaded %s from %s (%s)", model.name, model.path, self.config)

    async def generate(self, jobs: Sequence[GenerationJob]) -> AsyncGenerator[BackendEvent, None]:
        """Generate answers for ``jobs`` concurrently, one lmdeploy session each, streaming.

        Yields `JobDelta` events and one `JobFinished` or `JobFailed` per job. A cancelled
        job fails with `Cancelled` at once and its session is aborted; closing this stream
        early aborts every session it started.
        """
        pipeline, lmdeploy = self._pipeline, self._lmdeploy
        if pipeline is None or lmdeploy is None:
            for index in range(len(jobs)):
                yield JobFailed(index, GenerationFailed("no model is loaded"))
            return
        stream = _Stream(jobs, asyncio.get_running_loop())
        # A model XTuner trained gets its prompt rendered here, for lmdeploy to take as it is.
        rendered = self._model is not None and self._model.template == XTUNER_INTERNLM2
        to_messages = xtuner_internlm2_messages if rendered else lmdeploy_messages
        requests = []
        for index, job in enumerate(jobs):
            try:
                gen_config = lmdeploy.GenerationConfig(**generation_config_kwargs(job.params))
                requests.append((index, to_messages(job, self._model_tokens), gen_config))
            except Exception as error:  # bad parameters fail this job, not its neighbours
                yield stream.fail(index, GenerationFailed(f"lmdeploy refused the job: {error}"))
        if not requests:
            return
        watchers = [
            asyncio.create_task(_watch_cancelled(job, index, stream.inbox))
            for index, job in enumerate(jobs)
            if not stream.ended(index)
        ]
        self._streams.add(stream)
        try:
            stream.start(
                pipeline, requests, do_preprocess=not rendered, on_done=self._streams.discard
            )
            while not stream.over:
                for event in stream.take(await stream.inbox.get()):
                    yield event
        finally:
            for watcher in watchers:
                watcher.cancel()
            stream.abort_unfinished()

    async def close(self) -> None:
        """Abort what is still generating, close the pipeline and free its GPU memory."""
        pipeline = self._pipeline
        self._pipeline = None
        self._model = None
        streams = list(self._streams)
        for stream in streams:
            stream.abort_unfinished()
        if pipeline is None:
            return
        await asyncio.to_thread(_join_pumps, streams, CLOSE_GRACE_S)
        await asyncio.to_thread(_release, pipeline)
        logger.info("lmdeploy pipeline closed")

    def _backend_config(self, lmdeploy: ModuleType) -> Any:
        config_class = (
            lmdeploy.TurbomindEngineConfig
            if self.config.engine == "turbomind"
            else lmdeploy.PytorchEngineConfig
        )
        return config_class(
            dtype=self.config.dtype,
            tp=self.config.tp,
            session_len=self.config.session_len,
            max_batch_size=self.config.max_batch_size,
            cache_max_entry_count=self.config.cache_max_entry_count,
        )


# -- one generate() call's requests ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CancelAsked:
    index: int


@dataclass(frozen=True, slots=True)
class _StreamOver:
    error: BaseException | None = None


@dataclass(eq=False)
class _Stream:
    """The lmdeploy requests of one `generate` call and what dishbot has told about each.

    lmdeploy's blocking iterator is read by a thread of its own (the pump), which posts
    every Response into ``inbox``; cancellations are posted there too, so one coroutine
    turns them into events in order.
    """

    jobs: Sequence[GenerationJob]
    loop: asyncio.AbstractEventLoop
    inbox: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    over: bool = False
    pump: threading.Thread | None = None
    # Submitted position (lmdeploy's Response.index) -> job index, and each job's session.
    _positions: list[int] = field(default_factory=list)
    _sessions: dict[int, Any] = field(default_factory=dict)
    _texts: dict[int, list[str]] = field(default_factory=dict)
    _ended: set[int] = field(default_factory=set)  # got its JobFinished / JobFailed
    _done_in_lmdeploy: set[int] = field(default_factory=set)  # lmdeploy ended the request
    _aborts: dict[int, asyncio.Future[None]] = field(default_factory=dict)

    def ended(self, index: int) -> bool:
        return index in self._ended

    def fail(self, index: int, error: Exception) -> JobFailed:
        self._ended.add(index)
        return JobFailed(index, error)

    def start(
        self,
        pipeline: Any,
        requests: list[tuple[int, list[dict[str, object]], Any]],
        *,
        do_preprocess: bool,
        on_done: Callable[[_Stream], None],
    ) -> None:
        loop = self.loop
        for index, _, _ in requests:
            self._positions.append(index)
            self._sessions[index] = pipeline.session()
            self._texts[index] = []
        prompts = [messages for _, messages, _ in requests]
        gen_configs = [gen_config for _, _, gen_config in requests]
        sessions = [self._sessions[index] for index in self._positions]

        def post(item: object) -> None:
            # The loop may be gone (shutdown); the items are then of no use to anyone.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.inbox.put_nowait, item)

        def pump() -> None:
            error: BaseException | None = None
            try:
                for response in pipeline.stream_infer(
                    prompts=prompts,
                    sessions=sessions,
                    gen_config=gen_configs,
                    do_preprocess=do_preprocess,
                ):
                    post(response)
            except BaseException as exc:
                error = exc
            finally:
                post(_StreamOver(error))
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(on_done, self)

        self.pump = threading.Thread(target=pump, name="lmdeploy-stream", daemon=True)
        self.pump.start()

    def take(self, item: object) -> list[BackendEvent]:
        """The events ``item`` (a Response, a cancellation, the end) means for dishbot."""
        if isinstance(item, _CancelAsked):
            return self._cancel(item.index)
        if isinstance(item, _StreamOver):
            return self._end_stream(item.error)
        return self._response(item)

    def abort_unfinished(self) -> None:
        """Abort every request lmdeploy has not ended yet (without waiting)."""
        for index in self._sessions:
            if index not in self._done_in_lmdeploy:
                self._abort(index)

    def _cancel(self, index: int) -> list[BackendEvent]:
        if index in self._ended:
            return []
        if index in self._sessions and index not in self._done_in_lmdeploy:
            self._abort(index)
        return [self.fail(index, Cancelled("the request was cancelled"))]

    def _response(self, response: Any) -> list[BackendEvent]:
        index = self._positions[response.index]
        text: str = response.text or ""
        reason: str | None = response.finish_reason
        if reason is not None:
            self._done_in_lmdeploy.add(index)
        if index in self._ended:
            if reason is None and self.jobs[index].cancelled.is_set():
                # The abort came before lmdeploy had started the request; say it again.
                self._abort(index)
            return []
        events: list[BackendEvent] = []
        if text:
            self._texts[index].append(text)
            events.append(JobDelta(index, text))
        if reason is None:
            return events
        answer = "".join(self._texts[index])
        if reason in ("stop", "length"):
            self._ended.add(index)
            events.append(JobFinished(index, answer, reason))
        else:
            events.append(self.fail(index, _failure(response)))
        return events

    def _end_stream(self, error: BaseException | None) -> list[BackendEvent]:
        self.over = True
        if error is not None:
            logger.error("the lmdeploy stream failed", exc_info=error)
        message = f"lmdeploy failed: {error}" if error else "lmdeploy ended without an answer"
        return [
            self.fail(index, GenerationFailed(message))
            for index in self._sessions
            if index not in self._ended
        ]

    def _abort(self, index: int) -> None:
        pending = self._aborts.get(index)
        if pending is not None and not pending.done():
            return
        # Session.abort blocks until lmdeploy's own loop ran it: do it in a worker thread.
        future = self.loop.run_in_executor(None, self._sessions[index].abort)
        future.add_done_callback(_log_abort_failure)
        self._aborts[index] = future


async def _watch_cancelled(job: GenerationJob, index: int, inbox: asyncio.Queue[object]) -> None:
    await job.cancelled.wait()
    inbox.put_nowait(_CancelAsked(index))


def _failure(response: Any) -> Exception:
    reason = response.finish_reason
    if reason == "abort":
        return GenerationFailed("lmdeploy aborted the request")
    code = getattr(response, "error_code", None) or "error"
    detail = getattr(response, "error_message", None) or "no details"
    return GenerationFailed(f"lmdeploy failed the request ({code}): {detail}")


def _log_abort_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("aborting an lmdeploy session failed", exc_info=future.exception())


# -- loading and freeing --------------------------------------------------------------------

# The files in which an HF tokenizer declares its special and added tokens.
_TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
)


def tokenizer_control_tokens(model_path: str) -> tuple[str, ...]:
    """The special and added tokens the tokenizer files in ``model_path`` declare.

    Nothing when ``model_path`` is not a local directory (a hub id): user text is then guarded
    by the generic control tokens only. A file that cannot be read adds nothing.
    """
    directory = Path(model_path).expanduser()
    tokens: set[str] = set()
    for name in _TOKENIZER_FILES:
        try:
            data = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        if name == "added_tokens.json":  # {token: id}
            tokens.update(key for key in data if isinstance(key, str))
            continue
        if name == "tokenizer.json":  # the fast tokenizer: only its added tokens
            data = {"added_tokens": data.get("added_tokens")}
        tokens.update(_declared_tokens(data))
    return tuple(sorted(tokens))


_TOKEN_LISTS = ("added_tokens", "additional_special_tokens", "extra_special_tokens")


def _declared_tokens(config: dict[str, Any]) -> set[str]:
    """Token strings in a tokenizer config: added tokens, ``*_token`` and special lists."""
    tokens: set[str] = set()
    for key, value in config.items():
        if key == "added_tokens_decoder" and isinstance(value, dict):
            tokens |= _token_strings(list(value.values()))
        elif key.endswith("_token") or key in _TOKEN_LISTS:
            tokens |= _token_strings(value)
    return tokens


def _token_strings(value: object) -> set[str]:
    """A token given as a string, an AddedToken dict, or a list or map of them."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        if isinstance(value.get("content"), str):
            return {value["content"]}
        return set().union(*(_token_strings(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(_token_strings(item) for item in value))
    return set()


def _import_lmdeploy() -> ModuleType:
    try:
        return importlib.import_module("lmdeploy")
    except ImportError as error:
        raise ModelLoadFailed(INSTALL_HINT) from error


def _pipeline_builder(
    lmdeploy: ModuleType, model_path: str, backend_config: Any, log_level: str
) -> Callable[[], Any]:
    def build() -> Any:
        # No chat_template_config: lmdeploy picks the template from the model itself.
        return lmdeploy.pipeline(
            model_path,
            backend_config=backend_config,
            trust_remote_code=True,
            log_level=log_level,
        )

    return build


def _join_pumps(streams: list[_Stream], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for stream in streams:
        if stream.pump is not None:
            stream.pump.join(max(0.0, deadline - time.monotonic()))


def _release(pipeline: Any) -> None:
    """Close ``pipeline`` and hand its GPU memory back (blocking)."""
    close = getattr(pipeline, "close", None)
    try:
        if callable(close):
            close()
    except Exception:
        # Dropping the last reference below still frees most of it; the next load must go on.
        logger.exception("closing the lmdeploy pipeline failed")
    del pipeline
    gc.collect()
    _empty_cuda_cache()


def _release_abandoned(future: asyncio.Future[Any]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    logger.warning("a model load was abandoned; closing the pipeline it made")
    threading.Thread(target=_release, args=(future.result(),), daemon=True).start()


def _empty_cuda_cache() -> None:
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
