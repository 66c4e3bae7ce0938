"""dishbot's SQL store and photo files."""

from bot.store.models import CorrectionStatus, ExchangeStatus, TrainingStatus
from bot.store.records import (
    CorrectionRecord,
    ExchangeRecord,
    ForgetReport,
    ModelVersionRecord,
    PhotoRecord,
    RatingRecord,
    TrainingRunRecord,
    UserRecord,
)
from bot.store.store import Store

__all__ = [
    "CorrectionRecord",
    "CorrectionStatus",
    "ExchangeRecord",
    "ExchangeStatus",
    "ForgetReport",
    "ModelVersionRecord",
    "PhotoRecord",
    "RatingRecord",
    "Store",
    "TrainingRunRecord",
    "TrainingStatus",
    "UserRecord",
]
