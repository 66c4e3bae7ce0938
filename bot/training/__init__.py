"""The learning loop, outside the chat flows: the export of users' feedback as fine-tuning
data (`bot.training.export`); runs, trainers, evaluation and versions beside it."""

from bot.training.export.dataset import export_dataset
from bot.training.export.errors import ExportError
from bot.training.export.options import ExportOptions, parse_moment
from bot.training.export.summary import ExportSummary

__all__ = ["ExportError", "ExportOptions", "ExportSummary", "export_dataset", "parse_moment"]
