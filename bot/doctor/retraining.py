"""Retraining: the trainer `dishbot retrain` would use can run here. Only ever a warning: the
bot answers without it."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
from typing import Any

from bot.doctor.blocking import in_thread, run_command
from bot.doctor.context import Context
from bot.doctor.findings import Finding, ok, warn, with_fix
from bot.doctor.probes import last_line
from bot.errors import ConfigError
from bot.training.trainers import trainer_name

XTUNER_IMPORT_TIMEOUT_S = 50.0
SET_PYTHON = "set DISHBOT_TRAINING__PYTHON to the python of an environment with XTuner"
INSTALL_XTUNER = "pip install 'xtuner[deepspeed]' there"
# Run by training.python: what XTuner needs of its environment, as JSON on stdout.
XTUNER_PROBE = """
import importlib.util, json
found = {}
try:
    import xtuner
    found["xtuner"] = getattr(xtuner, "__version__", "?")
except Exception as exc:
    found["xtuner_error"] = f"{type(exc).__name__}: {exc}"
found["deepspeed"] = importlib.util.find_spec("deepspeed") is not None
try:
    import torch
    found["torch"] = torch.__version__
    found["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
except Exception as exc:
    found["torch_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(found))
"""


async def check_retraining(context: Context) -> Finding:
    """The retraining line: XTuner's environment, or peft for dishbot's own trainer."""
    settings = context.settings
    try:
        name = trainer_name(settings)
    except ConfigError as exc:
        return warn("retraining", with_fix(str(exc), "set DISHBOT_TRAINING__TRAINER"))
    if name == "xtuner":
        python = settings.training.python
        return xtuner_finding(
            python, settings.training.gpus, await in_thread(lambda: _probe(python))
        )
    return _own_trainer()


def _own_trainer() -> Finding:
    if importlib.util.find_spec("peft") is None:
        return warn(
            "retraining",
            with_fix(
                "dishbot's trainer needs peft, which is not installed: `dishbot retrain` "
                "cannot train",
                'pip install "dishbot[cpu]" (or pip install peft)',
            ),
        )
    version = importlib.metadata.version("peft")
    return ok("retraining", f"dishbot's trainer (transformers + peft {version})")


def _probe(python: str) -> dict[str, Any] | str:
    """What ``python`` says about XTuner, or why it could not say."""
    try:
        done = run_command([python, "-c", XTUNER_PROBE], XTUNER_IMPORT_TIMEOUT_S)
    except FileNotFoundError:
        return f"training.python = {python} does not exist"
    except PermissionError:
        return f"training.python = {python} cannot be run"
    except subprocess.TimeoutExpired:
        return f"{python} took over {XTUNER_IMPORT_TIMEOUT_S:g} s to import XTuner"
    if done.returncode != 0:
        return f"{python} failed: {last_line(done.stderr)}"
    try:
        found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"{python} did not say what it has: {last_line(done.stdout + done.stderr)}"
    return found


def xtuner_finding(python: str, gpus: int, found: dict[str, Any] | str) -> Finding:
    """The retraining line for XTuner, from what ``python`` said (or why it said nothing)."""
    if isinstance(found, str):
        return warn("retraining", with_fix(found, SET_PYTHON))
    if "xtuner" not in found:
        problem = f"XTuner does not import in {python}: {found.get('xtuner_error')}"
        return warn("retraining", with_fix(problem, f"{INSTALL_XTUNER}, or {SET_PYTHON}"))
    version = found["xtuner"]
    if "torch" not in found:
        problem = (
            f"XTuner {version} in {python}, but torch does not import: {found.get('torch_error')}"
        )
        return warn("retraining", with_fix(problem, f"{INSTALL_XTUNER}, or {SET_PYTHON}"))
    seen = int(found.get("gpus", 0))
    if seen < gpus:
        sees = "no CUDA GPU" if seen == 0 else f"{seen} CUDA GPU{'s' * (seen > 1)}"
        problem = (
            f"XTuner {version} in {python}, but its torch sees {sees} "
            f"(training.gpus = {gpus}): XTuner trains only on CUDA"
        )
        return warn("retraining", with_fix(problem, f"run it on a GPU host, or {SET_PYTHON}"))
    if not found.get("deepspeed"):
        problem = f"XTuner {version} in {python}, but deepspeed is missing"
        return warn("retraining", with_fix(problem, f"{INSTALL_XTUNER}"))
    return ok("retraining", f"XTuner {version} in {python}, {seen} CUDA GPU{'s' * (seen > 1)}")
