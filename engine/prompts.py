"""The one chat template and system prompt, shared by every backend and by training export.

A conversation is always: the system prompt, then the first user turn carrying the photo(s)
before its text, then alternating answers and follow-up questions. Backends that take raw
text render it with `render_chatml` (InternVL2's InternLM2 template and the HF InternVL
models' Qwen2 template are both ChatML); backends that take messages use `to_openai_messages`.

The system prompt belongs to the model version: dishbot's own prompt for a base model, and
for a model fine-tuned with XTuner the fixed prompt XTuner trained it with (XTuner's
InternVL dataset ignores any other), so that what is trained is what is served.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from engine.types import ModelSpec, Turn

DISHBOT_SYSTEM_PROMPT = (
    "You are a food connoisseur who knows the dishes of every cuisine, Cantonese and the rest "
    "of China above all. Looking at the photo, first name the dish (in the user's language, "
    "with its Chinese name when it has one), then answer the question briefly: ingredients, "
    "taste, how it is made or eaten. Answer in the language the user writes in. If you are "
    "not sure what the dish is, say so and name the likeliest candidates; never invent."
)

# XTuner's InternVL dataset (xtuner/dataset/internvl_dataset.py) trains InternLM2-based
# models with this system prompt whatever the data says; serve such a model with it.
XTUNER_INTERNLM2_SYSTEM_PROMPT = "You are an AI assistant whose name is InternLM (书生·浦语)."

# Where an image goes in the text of a turn, as InternVL and XTuner data write it.
IMAGE_PLACEHOLDER = "<image>"

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message; ``images`` photos come before ``text`` (only in the first user turn)."""

    role: Role
    text: str
    images: int = 0


def system_prompt_for(model: ModelSpec) -> str:
    """The system prompt to serve ``model`` with."""
    return model.system_prompt if model.system_prompt is not None else DISHBOT_SYSTEM_PROMPT


def build_messages(
    system_prompt: str, history: Sequence[Turn], question: str, num_images: int
) -> list[ChatMessage]:
    """The conversation to send: system, then turns, the photos in the first user turn."""
    messages = [ChatMessage("system", system_prompt)]
    turns = [*((turn.question, turn.answer) for turn in history), (question, None)]
    for position, (asked, answered) in enumerate(turns):
        messages.append(ChatMessage("user", asked, images=num_images if position == 0 else 0))
        if answered is not None:
            messages.append(ChatMessage("assistant", answered))
    return messages


def render_chatml(
    messages: Sequence[ChatMessage], image_text: Callable[[int], str] = lambda _: IMAGE_PLACEHOLDER
) -> str:
    """The prompt as ChatML text, ending with the open assistant turn.

    ``image_text(i)`` gives the text standing for image ``i`` (for InternVL, ``<img>``, the
    image context tokens, ``</img>``); each image is followed by a newline, as in training.
    """
    parts = []
    image_index = 0
    for message in messages:
        images = ""
        for _ in range(message.images):
            images += image_text(image_index) + "\n"
            image_index += 1
        parts.append(f"<|im_start|>{message.role}\n{images}{message.text}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def to_openai_messages(
    messages: Sequence[ChatMessage], image_urls: Sequence[str]
) -> list[dict[str, object]]:
    """The conversation in the OpenAI chat format (also what lmdeploy's pipeline takes).

    ``image_urls`` are the images as URLs, normally ``data:image/jpeg;base64,...``.
    """
    result: list[dict[str, object]] = []
    remaining = list(image_urls)
    for message in messages:
        if not message.images:
            result.append({"role": message.role, "content": message.text})
            continue
        content: list[dict[str, object]] = [
            {"type": "image_url", "image_url": {"url": url}} for url in remaining[: message.images]
        ]
        del remaining[: message.images]
        content.append({"type": "text", "text": message.text})
        result.append({"role": message.role, "content": content})
    return result
