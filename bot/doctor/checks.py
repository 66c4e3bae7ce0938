"""Every check of `dishbot doctor`, in the order it reports them."""

from __future__ import annotations

from bot.doctor.backends import check_serving, check_torch
from bot.doctor.database import check_database
from bot.doctor.environment import check_packages, check_python
from bot.doctor.host import check_disk, check_web
from bot.doctor.model import check_model
from bot.doctor.platforms import check_discord, check_telegram
from bot.doctor.retraining import check_retraining
from bot.doctor.runner import IMPORT_TIMEOUT_S, NETWORK_TIMEOUT_S, Check

# A network check's own HTTP timeout is NETWORK_TIMEOUT_S; its check allows a little more.
_NETWORK_CHECK_S = NETWORK_TIMEOUT_S + 2

BEFORE_SETTINGS = (
    Check("python", check_python),
    Check("packages", check_packages),
)
AFTER_SETTINGS = (
    Check("torch", check_torch, timeout_s=IMPORT_TIMEOUT_S),
    Check("lmdeploy", check_serving, timeout_s=IMPORT_TIMEOUT_S),
    Check("model", check_model, timeout_s=IMPORT_TIMEOUT_S),
    Check("database", check_database, timeout_s=_NETWORK_CHECK_S),
    Check("telegram", check_telegram, timeout_s=_NETWORK_CHECK_S),
    Check("discord", check_discord, timeout_s=_NETWORK_CHECK_S),
    Check("retraining", check_retraining, timeout_s=IMPORT_TIMEOUT_S),
    Check("disk", check_disk),
    Check("web", check_web),
)
