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
    """The backend failed while generating an answer."""


class ModelLoadFailed(EngineError):
    """A model could not be loaded (missing files, out of memory, wrong format)."""


class EngineClosed(EngineError):
    """The engine is stopped (or stopping) and takes no more requests."""
