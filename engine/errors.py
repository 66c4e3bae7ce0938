"""Typed errors of the engine. Each one's message is plain English a bot can build on."""

from __future__ import annotations


class EngineError(Exception):
    """Base of everything the engine raises on purpose."""


class BadImage(EngineError):
    """The image cannot be used: empty, too large, truncated, not an image, unsupported.

    ``reason`` is short and safe to show a user ("the file is not an image").
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class QueueFull(EngineError):
    """Too many questions are waiting, from everyone together; try again later."""


class TooManyPending(EngineError):
    """This fairness key (user) already has as many questions waiting as allowed."""


class DeadlineExceeded(EngineError):
    """The request's deadline passed before it was answered."""


class Cancelled(EngineError):
    """The request was cancelled before it was answered."""


class GenerationFailed(EngineError):
    """The backend failed while generating an answer (it counts as a backend fault)."""


class ModelLoadFailed(EngineError):
    """A model could not be loaded (missing files, out of memory, wrong format)."""


class ModelRefused(ModelLoadFailed):
    """A model server refused to serve us (a wrong key, no such model or path: HTTP 401, 403,
    404): asking again will not help until the settings change."""


class EngineClosed(EngineError):
    """The engine is stopped (or stopping) and takes no more requests."""


class ModelNotReady(EngineClosed):
    """The engine has not started yet: its model is still being fetched or loaded (or could
    not be). A kind of `EngineClosed`, so code that only knows that one still refuses."""


class RequestRefused(GenerationFailed):
    """The backend refused this one request (e.g. HTTP 400: the prompt is too long).

    The request's fault, not the backend's: it does not count towards opening the circuit.
    """


class GenerationStalled(DeadlineExceeded):
    """The model said nothing at all before the request's deadline: a hung backend."""


class ModelUnavailable(EngineError):
    """The backend keeps failing, so questions are refused for a while (the circuit is open).

    ``retry_after_s`` is when a question may be tried again, at the earliest.
    """

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"the model is unavailable; try again in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class PromptTooLong(EngineError):
    """The question and its photos alone do not fit in the model's context."""
