"""How a run is shown to the admin who started it: in chat, on the command line, the same.

One message per run, edited as it goes: the stage, a text progress bar with the percent, the
loss and the time left; at the end the evaluation table (active vs candidate on held out,
taught and kept) and the decision. English or Chinese, as the admin writes.
"""

from __future__ import annotations

from typing import Literal

from bot.store import TrainingRunRecord
from bot.training.evaluation import SET_NAMES, Evaluation, SetName

Language = Literal["en", "zh"]

BAR_WIDTH = 16
_FULL, _EMPTY = "█", "░"

STAGES: dict[str, dict[Language, str]] = {
    "queued": {"en": "queued", "zh": "排队中"},
    "exporting": {"en": "exporting the feedback", "zh": "导出反馈数据"},
    "training": {"en": "training", "zh": "训练中"},
    "converting": {"en": "converting the model", "zh": "转换模型"},
    "evaluating": {"en": "evaluating", "zh": "评估中"},
    "promoting": {"en": "promoting", "zh": "上线新模型"},
    "done": {"en": "done: the new model is answering", "zh": "完成：新模型已上线"},
    "rejected": {"en": "rejected: the active model stays", "zh": "未通过：继续使用当前模型"},
    "failed": {"en": "failed", "zh": "失败"},
    "cancelled": {"en": "cancelled", "zh": "已取消"},
}
SET_LABELS: dict[SetName, dict[Language, str]] = {
    "held_out": {"en": "held out", "zh": "留出集"},
    "taught": {"en": "taught", "zh": "纠正过的"},
    "kept": {"en": "kept", "zh": "保持的"},
}
_WORDS: dict[str, dict[Language, str]] = {
    "run": {"en": "Retraining run {id}", "zh": "重新训练 #{id}"},
    "loss": {"en": "loss", "zh": "损失"},
    "left": {"en": "left", "zh": "剩余"},
    "active": {"en": "active", "zh": "当前"},
    "candidate": {"en": "candidate", "zh": "候选"},
    "decision": {"en": "Decision", "zh": "结论"},
    "version": {"en": "now answering: {name}", "zh": "当前模型：{name}"},
}


def stage_name(stage: str, language: Language = "en") -> str:
    """A stage as people read it."""
    return STAGES.get(stage, {}).get(language, stage)


def progress_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """``fraction`` (0..1) as a bar of ``width`` characters and a percent: ``███░░░ 50%``."""
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    return f"{_FULL * filled}{_EMPTY * (width - filled)} {fraction * 100:.0f}%"


def duration(seconds: float) -> str:
    """``seconds`` as h:mm:ss or m:ss."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(
    *,
    fraction: float,
    loss: float | None,
    eta_s: float | None,
    language: Language = "en",
) -> str:
    """The bar, then the loss and the time left when known."""
    parts = [progress_bar(fraction)]
    if loss is not None:
        parts.append(f"{_WORDS['loss'][language]} {loss:.4f}")
    if eta_s is not None:
        parts.append(f"{duration(eta_s)} {_WORDS['left'][language]}")
    return " · ".join(parts)


def evaluation_table(evaluation: Evaluation, language: Language = "en") -> str:
    """Active vs candidate, one line per set: the mean scores and how many questions."""
    width = max(len(labels[language]) for labels in SET_LABELS.values()) + 2
    active, candidate = _WORDS["active"][language], _WORDS["candidate"][language]
    lines = [f"{'':<{width}}{active:>9}{candidate:>11}"]
    for name in SET_NAMES:
        count = evaluation.count(name)
        mine, theirs = evaluation.mean(name, "active"), evaluation.mean(name, "candidate")
        label = SET_LABELS[name][language]
        lines.append(f"{label:<{width}}{_score(mine):>9}{_score(theirs):>11}   ({count})")
    return "\n".join(lines)


def run_title(run_id: int, language: Language = "en") -> str:
    """The first line of a run's message."""
    return _WORDS["run"][language].format(id=run_id)


def decision_line(reason: str, language: Language = "en") -> str:
    """The decision, with the rule's reason."""
    return f"{_WORDS['decision'][language]}: {reason}"


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render_run(
    run: TrainingRunRecord, language: Language = "en", version: str | None = None
) -> str:
    """Everything the admin needs to know about ``run`` now, as one message.

    While it runs: the stage and its progress. At the end: how it ended, the notes, the
    evaluation table and the decision, or the error (with the trainer's log tail).
    ``version`` names the version now answering, when the run promoted one.
    """
    lines = [f"{run_title(run.id, language)}: {stage_name(run.stage.value, language)}"]
    progress = stage_progress(run)
    if not run.finished and progress is not None:
        stage, fraction, loss, eta_s = progress
        line = progress_line(fraction=fraction, loss=loss, eta_s=eta_s, language=language)
        lines.append(f"{stage_name(stage, language)} {line}")
    lines.extend(f"• {note}" for note in run.notes)
    if run.evaluation and run.evaluation.get("samples"):
        lines += ["", evaluation_table(Evaluation.from_json(run.evaluation), language)]
    if run.decision:
        lines.append(decision_line(run.decision, language))
    if version is not None:
        lines.append(_WORDS["version"][language].format(name=version))
    if run.error:
        lines += ["", run.error]
    return "\n".join(lines)


def stage_progress(run: TrainingRunRecord) -> tuple[str, float, float | None, float | None] | None:
    """The stage under way with how far it is (0..1), its loss and time left; None when the
    row holds no progress of the stage the run is in (it keeps the last stage's until the
    next one reports; the trainer's converting is reported while the run still trains)."""
    progress = run.progress or {}
    stage = str(progress.get("stage") or "")
    total = int(progress.get("total") or 0)
    if not total or stage not in (run.stage.value, "converting"):
        return None
    fraction = min(1.0, int(progress.get("iteration") or 0) / total)
    return stage, fraction, _number(progress.get("loss")), _number(progress.get("eta_s"))


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None
