"""dishbot's SQL store and photo files."""

from bot.store.models import CorrectionStatus, ExchangeStatus, RunStage
from bot.store.records import (
    CorrectionRecord,
    DayStats,
    ExchangeOwner,
    ExchangeRecord,
    ForgetReport,
    InboxRecord,
    ModelVersionRecord,
    PhotoRecord,
    RatingRecord,
    ReportTarget,
    ReviewedCorrection,
    ReviewItem,
    TrainingRunRecord,
    UserRecord,
    VersionRatings,
)
from bot.store.store import NothingToRollBack, RunInProgress, Store

__all__ = [
    "CorrectionRecord",
    "CorrectionStatus",
    "DayStats",
    "ExchangeOwner",
    "ExchangeRecord",
    "ExchangeStatus",
    "ForgetReport",
    "InboxRecord",
    "ModelVersionRecord",
    "NothingToRollBack",
    "PhotoRecord",
    "RatingRecord",
    "ReportTarget",
    "ReviewItem",
    "ReviewedCorrection",
    "RunInProgress",
    "RunStage",
    "Store",
    "TrainingRunRecord",
    "UserRecord",
    "VersionRatings",
]
