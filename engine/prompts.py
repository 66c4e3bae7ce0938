"""The one chat template and system prompt, shared by every backend and by training export.

A conversation is always: the system prompt, then the first user turn carrying the photo(s)
before its text, then alternating answers and follow-up questions. Backends that take raw
text render it with `render_chatml` (InternVL2's InternLM2 template and the HF InternVL
models' Qwen2 template are both ChatML); backends that take messages use `to_openai_messages`.

User text never reaches a model as control tokens. A question (or an earlier answer, which
may be a user's correction) holding ``<|im_end|>``, ``<IMG_CONTEXT>`` and the like would
otherwise end turns, inject instructions or break the image layout; `build_messages` breaks
every such token in it with an invisible zero-width space (`neutralise_control_tokens`), so
that it is read as the text it looks like. Backends that tokenize themselves also keep user
text from matching special tokens at the token level.

The system prompt belongs to the model version: dishbot's own prompt for a base model, and
for a model fine-tuned with XTuner the fixed prompt XTuner trained it with (XTuner's
InternVL dataset ignores any other), so that what is trained is what is served.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
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

# Whole tokens that InternVL and lmdeploy give a meaning to, whatever the model's own
# tokenizer says: InternVL2's added tokens, the image placeholders of XTuner data and of
# lmdeploy, and SentencePiece's specials. The training export removes the same ones.
CONTROL_MARKERS = (
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    IMAGE_PLACEHOLDER,
    "<IMAGE_TOKEN>",
    "<video>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<s>",
    "</s>",
    "<unk>",
)
# What user text must never carry: the markers, and the beginnings of whole families: "<|"
# starts every ChatML-style token (<|im_start|>, <|im_end|>, <|endoftext|>, InternLM2's
# <|action_start|>, ...); "[UNUSED_TOKEN_" is how InternLM2's SentencePiece model spells the
# pieces its chat template reuses as <|im_start|> and <|im_end|>.
CHAT_CONTROL_TOKENS = ("<|", "[UNUSED_TOKEN_", *CONTROL_MARKERS)

# Invisible, and no tokenizer's control token contains it: inserted after a token's first
# character, it leaves the text looking the same but no longer the token.
_BREAK = "\u200b"

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


def neutralise_control_tokens(text: str, model_tokens: Iterable[str] = ()) -> str:
    """``text`` with every control token in it broken by an invisible zero-width space.

    The tokens are `CHAT_CONTROL_TOKENS` and ``model_tokens`` (the model tokenizer's special
    and added tokens, when known). Breaking repeats until none is left, so overlapping or
    nested forms (``<im<image>age>``) cannot survive; nothing is removed, so nothing can
    reassemble, and the text reads as before. Tokens shorter than two characters or made
    of whitespace only are left alone: they cannot be broken, or are ordinary text.
    """
    tokens = {
        token
        for token in (*CHAT_CONTROL_TOKENS, *model_tokens)
        if len(token) > 1 and not token.isspace() and _BREAK not in token
    }
    # Each pass breaks every occurrence it finds and can create none, so this ends.
    while found := [token for token in tokens if token in text]:
        for token in found:
            text = text.replace(token, token[0] + _BREAK + token[1:])
    return text


def build_messages(
    system_prompt: str,
    history: Sequence[Turn],
    question: str,
    num_images: int,
    model_tokens: Iterable[str] = (),
) -> list[ChatMessage]:
    """The conversation to send: system, then turns, the photos in the first user turn.

    Every question and answer goes through `neutralise_control_tokens` (with the model's
    own ``model_tokens``); the system prompt is the operator's and is sent as it is.
    """
    tokens = tuple(model_tokens)
    messages = [ChatMessage("system", system_prompt)]
    turns = [*((turn.question, turn.answer) for turn in history), (question, None)]
    for position, (asked, answered) in enumerate(turns):
        images = num_images if position == 0 else 0
        messages.append(ChatMessage("user", neutralise_control_tokens(asked, tokens), images))
        if answered is not None:
            messages.append(ChatMessage("assistant", neutralise_control_tokens(answered, tokens)))
    return messages


@dataclass(frozen=True, slots=True)
class PromptPart:
    """A stretch of a rendered prompt: the template's own markup, or a message's text.

    A tokenizer reads ``markup`` parts with their control tokens and every other part as
    plain text, so no message can add a control token whatever it holds.
    """

    text: str
    markup: bool


def render_chatml(
    messages: Sequence[ChatMessage], image_text: Callable[[int], str] = lambda _: IMAGE_PLACEHOLDER
) -> str:
    """The prompt as ChatML text, ending with the open assistant turn.

    ``image_text(i)`` gives the text standing for image ``i`` (for InternVL, ``<img>``, the
    image context tokens, ``</img>``); each image is followed by a newline, as in training.
    """
    return "".join(part.text for part in render_chatml_parts(messages, image_text))


def render_chatml_parts(
    messages: Sequence[ChatMessage], image_text: Callable[[int], str] = lambda _: IMAGE_PLACEHOLDER
) -> list[PromptPart]:
    """`render_chatml`'s prompt in parts: the template's markup and the messages' texts."""
    parts = []
    image_index = 0
    for message in messages:
        images = ""
        for _ in range(message.images):
            images += image_text(image_index) + "\n"
            image_index += 1
        parts.append(PromptPart(f"<|im_start|>{message.role}\n{images}", markup=True))
        parts.append(PromptPart(message.text, markup=False))
        parts.append(PromptPart("<|im_end|>\n", markup=True))
    parts.append(PromptPart("<|im_start|>assistant\n", markup=True))
    return parts


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
