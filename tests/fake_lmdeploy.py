"""A stand-in for the parts of lmdeploy (0.16+ main branch, the 0.18 line) dishbot uses.

It keeps lmdeploy's contract as read from its sources, and records every call:

* ``pipeline(model_path, backend_config=None, chat_template_config=None, log_level=...,
  trust_remote_code=False, ...)`` returns a `FakePipeline`.
* ``TurbomindEngineConfig`` / ``PytorchEngineConfig`` / ``GenerationConfig`` are dataclasses
  with lmdeploy's field names and defaults (a subset), so an unknown keyword is a TypeError;
  GenerationConfig asserts the ranges lmdeploy asserts.
* ``Pipeline.stream_infer(prompts, sessions, gen_config)`` runs each conversation in a thread
  (lmdeploy runs them on its own event loop thread) and returns a blocking iterator of
  ``Response`` multiplexed by ``index``: text deltas with ``finish_reason=None``, then one
  Response with the finish reason and empty text; the iterator ends after all of them.
* ``Session.abort()`` cancels the session's request, which then ends with 'abort'; like
  lmdeploy's, it does nothing while the request has not started yet.
* Each conversation is first made into a prompt as lmdeploy does for InternVL
  (``lmdeploy/vl/model/internvl.py`` ``proc_messages``, then the model's ChatML template): an
  image item becomes ``<img><IMG_CONTEXT></img>\\n`` and text is copied verbatim. The prompt
  is then cut at every ``<IMG_CONTEXT>`` to splice the image features in
  (``vl/model/base.py`` ``to_pytorch_aux`` / ``to_turbomind_aux``), and the request fails
  with ``preprocess_failed`` unless there is one cut per image; ``<IMAGE_TOKEN>`` in a user's
  text switches to the old placeholder layout, which drops the image items. The prompts
  are recorded (``stream_calls[n]["rendered"]``): lmdeploy's tokenizer reads any special
  token in them as that token.
* ``stream_infer(..., do_preprocess=False)`` renders with lmdeploy's ``BaseChatTemplate()``
  instead (``serve/processors/multimodal.py``): the messages' contents concatenated and
  nothing added, each image item still written as ``<img><IMG_CONTEXT></img>\\n`` where it
  stands; a conversation with no image takes the text-only path, which joins a message's
  text items with a newline.

Replies are scripted per question (the text of the last user message) with `Reply`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from queue import Queue
from types import ModuleType
from typing import Any

ABORT_WAIT_S = 5.0

# InternVL's image context token, where lmdeploy splices an image's features into the prompt.
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
# lmdeploy's old image placeholder (lmdeploy/vl/constants.py).
IMAGE_TOKEN = "<IMAGE_TOKEN>"


def render_prompt(messages: list[dict[str, Any]]) -> str:
    """The prompt lmdeploy makes of an InternVL conversation, before tokenizing it."""
    placeholder_layout = any(
        IMAGE_TOKEN in _texts(message) for message in messages if message["role"] == "user"
    )
    parts = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str) or message["role"] != "user":
            text = content if isinstance(content, str) else _texts(message)
        elif placeholder_layout:
            text = _texts(message).replace(IMAGE_TOKEN, f"<img>{IMAGE_CONTEXT_TOKEN}</img>")
        else:
            text = "".join(
                item["text"] if item["type"] == "text" else f"<img>{IMAGE_CONTEXT_TOKEN}</img>\n"
                for item in content
            )
        parts.append(f"<|im_start|>{message['role']}\n{text}<|im_end|>\n")
    return "".join(parts) + "<|im_start|>assistant\n"


def render_raw_prompt(messages: list[dict[str, Any]]) -> str:
    """The prompt lmdeploy makes with ``do_preprocess=False``: no template, contents as they are."""
    if not count_images(messages):  # _get_text_prompt_input: merge_message_content
        return "".join(
            content if isinstance(content, str) else "\n".join(_text_items(content))
            for content in (message["content"] for message in messages)
        )
    # InternVL's proc_messages, then BaseChatTemplate().messages2prompt
    return "".join(
        message["content"]
        if isinstance(message["content"], str) or message["role"] != "user"
        else "".join(
            item["text"] if item["type"] == "text" else f"<img>{IMAGE_CONTEXT_TOKEN}</img>\n"
            for item in message["content"]
        )
        for message in messages
    )


def _text_items(content: list[dict[str, Any]]) -> list[str]:
    return [item.get("text", "") for item in content if item.get("type") == "text"]


def count_images(messages: list[dict[str, Any]]) -> int:
    return sum(
        item["type"] != "text"
        for message in messages
        if isinstance(message["content"], list)
        for item in message["content"]
    )


def _texts(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(item["text"] for item in content if item["type"] == "text")


@dataclass
class TurbomindEngineConfig:
    dtype: str = "auto"
    model_format: str | None = None
    tp: int = 1
    session_len: int | None = None
    max_batch_size: int | None = None
    cache_max_entry_count: float = 0.8
    quant_policy: int = 0


@dataclass
class PytorchEngineConfig:
    dtype: str = "auto"
    tp: int = 1
    session_len: int | None = None
    max_batch_size: int | None = None
    cache_max_entry_count: float = 0.8
    device_type: str = "cuda"


@dataclass
class GenerationConfig:
    n: int = 1
    max_new_tokens: int = 512
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 50
    min_p: float = 0.0
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    random_seed: int | None = None

    def __post_init__(self) -> None:
        assert 0 <= self.top_p <= 1
        assert 0 <= self.temperature <= 2


@dataclass
class Response:
    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    index: int = 0
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class Reply:
    """What the fake model answers: text pieces, then how it ends.

    ``hang`` keeps the request running after the pieces until its session is aborted.
    ``error`` ends it with finish_reason 'error' and that message.
    """

    pieces: tuple[str, ...] = ("Char siu ", "(叉烧) is Cantonese ", "roast pork.")
    finish_reason: str = "stop"
    hang: bool = False
    error: str | None = None


class FakeSession:
    """lmdeploy's Session: ``abort`` only reaches a request that holds an engine instance."""

    def __init__(self, session_id: int, abort_tried: threading.Event) -> None:
        self.session_id = session_id
        self.abort_tried = abort_tried
        self.aborts = 0
        self.aborted = threading.Event()
        self.started = threading.Event()

    def abort(self) -> None:
        self.aborts += 1
        self.abort_tried.set()
        if self.started.is_set():
            self.aborted.set()


class FakePipeline:
    def __init__(self, lmdeploy: FakeLMDeploy, model_path: str, kwargs: dict[str, Any]) -> None:
        self.lmdeploy = lmdeploy
        self.model_path = model_path
        self.kwargs = kwargs
        self.closed = False
        self.sessions: list[FakeSession] = []
        self.stream_calls: list[dict[str, Any]] = []

    def session(self) -> FakeSession:
        session = FakeSession(next(self.lmdeploy.session_ids), self.lmdeploy.abort_tried)
        self.sessions.append(session)
        return session

    def stream_infer(
        self,
        prompts: Any,
        sessions: Any = None,
        gen_config: Any = None,
        do_preprocess: bool = True,
        adapter_name: str | None = None,
        stream_response: bool = True,
        **kwargs: Any,
    ) -> Iterator[Response]:
        assert not self.closed, "stream_infer on a closed pipeline"
        if self.lmdeploy.stream_error is not None:
            raise self.lmdeploy.stream_error
        assert all(isinstance(prompt, list) for prompt in prompts)
        assert len(sessions) == len(prompts) == len(gen_config)
        # What lmdeploy tokenizes for each conversation; its tokenizer reads special tokens.
        render = render_prompt if do_preprocess else render_raw_prompt
        rendered = [render(prompt) for prompt in prompts]
        self.stream_calls.append(
            {
                "prompts": prompts,
                "sessions": sessions,
                "gen_config": gen_config,
                "do_preprocess": do_preprocess,
                "rendered": rendered,
                **kwargs,
            }
        )
        queue: Queue[Response | None] = Queue()
        threads = [
            threading.Thread(target=self._run, args=(index, prompt, text, session, queue))
            for index, (prompt, text, session) in enumerate(
                zip(prompts, rendered, sessions, strict=True)
            )
        ]
        for thread in threads:
            thread.start()

        def end_when_all_done() -> None:
            for thread in threads:
                thread.join()
            queue.put(None)

        threading.Thread(target=end_when_all_done, daemon=True).start()
        return iter(queue.get, None)

    def _run(
        self,
        index: int,
        prompt: list[dict[str, Any]],
        rendered: str,
        session: FakeSession,
        queue: Queue[Any],
    ) -> None:
        generated = 0

        def out(text: str, reason: str | None = None, **extra: Any) -> None:
            queue.put(Response(text, generated, 100, reason, index=index, **extra))

        cuts, images = rendered.count(IMAGE_CONTEXT_TOKEN), count_images(prompt)
        if cuts != images:
            message = f"the number of {IMAGE_CONTEXT_TOKEN} is not equal to input images"
            detail = f"{message}, {cuts} vs {images}"
            out("", "error", error_code="preprocess_failed", error_message=detail)
            return
        reply = self.lmdeploy.reply_for(prompt)
        if self.lmdeploy.start_gate is not None:
            self.lmdeploy.start_gate.wait(ABORT_WAIT_S)
        session.started.set()

        for piece in reply.pieces:
            if session.aborted.is_set():
                out("", "abort")
                return
            generated += 1
            out(piece)
        if reply.hang:
            session.aborted.wait(ABORT_WAIT_S)
        if session.aborted.is_set():
            out("", "abort")
        elif reply.error is not None:
            out("", "error", error_code="CONTEXT_LENGTH_EXCEEDED", error_message=reply.error)
        else:
            out("", reply.finish_reason)

    def close(self) -> None:
        self.closed = True
        self.lmdeploy.log.append(f"close {self.model_path}")


class FakeLMDeploy:
    """Builds the stand-in ``lmdeploy`` module and keeps what was done with it."""

    def __init__(self) -> None:
        self.pipeline_calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.pipelines: list[FakePipeline] = []
        self.generation_config_calls: list[dict[str, Any]] = []
        self.log: list[str] = []
        self.replies: dict[str, Reply] = {}
        self.load_error: Exception | None = None
        self.load_gate: threading.Event | None = None  # when set, pipeline() waits for it
        self.stream_error: Exception | None = None
        self.start_gate: threading.Event | None = None  # when set, requests wait for it
        self.session_ids = itertools.count(1)
        self.abort_tried = threading.Event()  # set by the first Session.abort() call

    def reply_for(self, prompt: list[dict[str, Any]]) -> Reply:
        content = prompt[-1]["content"]
        question = content if isinstance(content, str) else content[-1]["text"]
        return self.replies.get(question, Reply())

    def module(self) -> ModuleType:
        module = ModuleType("lmdeploy")
        module.pipeline = self._pipeline  # type: ignore[attr-defined]
        module.TurbomindEngineConfig = TurbomindEngineConfig  # type: ignore[attr-defined]
        module.PytorchEngineConfig = PytorchEngineConfig  # type: ignore[attr-defined]
        module.GenerationConfig = self._generation_config  # type: ignore[attr-defined]
        module.Response = Response  # type: ignore[attr-defined]
        return module

    def _pipeline(self, model_path: str, *args: Any, **kwargs: Any) -> FakePipeline:
        self.pipeline_calls.append(((model_path, *args), kwargs))
        self.log.append(f"pipeline {model_path}")
        if self.load_gate is not None:
            self.load_gate.wait(ABORT_WAIT_S)
        if self.load_error is not None:
            raise self.load_error
        pipeline = FakePipeline(self, model_path, kwargs)
        self.pipelines.append(pipeline)
        return pipeline

    def _generation_config(self, **kwargs: Any) -> GenerationConfig:
        self.generation_config_calls.append(kwargs)
        return GenerationConfig(**kwargs)
