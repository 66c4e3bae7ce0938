"""Training data and retraining: exporting users' feedback as XTuner fine-tuning data."""

from bot.training.errors import ExportError
from bot.training.export import export_dataset
from bot.training.options import ExportOptions, parse_moment
from bot.training.summary import ExportSummary

__all__ = ["ExportError", "ExportOptions", "ExportSummary", "export_dataset", "parse_moment"]
