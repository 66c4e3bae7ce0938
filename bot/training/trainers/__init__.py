"""Trainers: each turns an export into a full model directory dishbot can serve, in a
subprocess of its own, reporting progress in one shape (see `bot.training.trainers.base`)."""

from __future__ import annotations

from bot.errors import ConfigError
from bot.settings import Settings
from bot.training.trainers.base import Trainer


def trainer_name(settings: Settings) -> str:
    """The trainer ``training.trainer`` names; ``auto``: the one for the serving backend
    (XTuner for lmdeploy's InternVL2, dishbot's own for the transformers backend)."""
    if settings.training.trainer != "auto":
        return settings.training.trainer
    from bot.engine_setup import resolve_backend_name

    backend = resolve_backend_name(settings.engine)
    if backend == "lmdeploy":
        return "xtuner"
    if backend == "transformers":
        return "transformers"
    raise ConfigError(
        f"training.trainer = auto cannot tell how to train a model served by the {backend} "
        'backend: set training.trainer to "xtuner" or "transformers"'
    )


def trainer_for(settings: Settings) -> Trainer:
    """The trainer to retrain with, as the settings choose it (see `trainer_name`)."""
    if trainer_name(settings) == "xtuner":
        from bot.training.trainers.xtuner import XTunerTrainer

        return XTunerTrainer()
    from bot.training.trainers.transformers import TransformersTrainer

    return TransformersTrainer()
