"""The evaluation gate: the candidate and the active model answer the same questions.

Three sets, from the run's export and the store:

* **held out**: the export's validation split (photos never trained on);
* **taught**: the accepted corrections that were trained on (does it now name the dish users
  taught it?);
* **kept**: a sample of approved (👍) answers of the active model (does it still agree?).

A correction scores 1 when the answer names the corrected dish (normalised containment); an
approved answer scores its character-level similarity to the approved text, which works for
Chinese and English alike. Both models answer greedily, each with the prompt it is served with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bot.core.i18n import say
from bot.settings import TrainingSettings
from bot.store import Store
from bot.training.export.export_dir import IMAGES_DIR
from bot.training.export.targets import dish_name
from bot.training.export.text import clean_turn_text, comparison_key
from bot.training.export.writer import TRAIN_FILE, VAL_FILE
from engine.engine import Engine, Request
from engine.errors import EngineError
from engine.prompts import IMAGE_PLACEHOLDER
from engine.types import GenerationParams

log = logging.getLogger(__name__)

EVALUATION_KEY = "training:evaluation"  # the fairness key evaluation questions queue under
ANSWER_TOKENS = 128  # a dish name and a sentence or two are enough to judge
# What the bot asks for a photo sent without a caption.
DEFAULT_QUESTION = say("default_question", "en")

SetName = Literal["held_out", "taught", "kept"]
SET_NAMES: tuple[SetName, ...] = ("held_out", "taught", "kept")


@dataclass(frozen=True, slots=True)
class SampleResult:
    """One question of one set: what each model answered and how it scored (0..1)."""

    set_name: SetName
    image: str  # the photo's file name in the export's images directory
    question: str
    expected: str
    active_answer: str
    candidate_answer: str
    active_score: float
    candidate_score: float
    corrected: bool = False  # the expected answer is a correction (else an approved answer)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Every sample's result; the per-set means are derived."""

    samples: tuple[SampleResult, ...] = field(default=())

    def mean(self, set_name: SetName, model: Literal["active", "candidate"]) -> float | None:
        """The mean score of ``model`` on ``set_name`` (None for an empty set)."""
        scores = [
            s.active_score if model == "active" else s.candidate_score
            for s in self.samples
            if s.set_name == set_name
        ]
        return sum(scores) / len(scores) if scores else None

    def count(self, set_name: SetName) -> int:
        """How many samples ``set_name`` has."""
        return sum(1 for s in self.samples if s.set_name == set_name)

    def to_json(self) -> dict[str, Any]:
        """As stored with a run and its version: per-set counts and means, and the samples."""
        summary = {
            name: {
                "count": self.count(name),
                "active": self.mean(name, "active"),
                "candidate": self.mean(name, "candidate"),
            }
            for name in SET_NAMES
        }
        return {"summary": summary, "samples": [dataclasses.asdict(s) for s in self.samples]}

    @classmethod
    def from_json(cls, stored: dict[str, Any]) -> Evaluation:
        """The evaluation `to_json` stored."""
        return cls(tuple(SampleResult(**sample) for sample in stored["samples"]))


def candidate_means(stored: dict[str, Any] | None) -> dict[SetName, float | None]:
    """Per set, the mean score a stored evaluation gave the candidate (None: no samples)."""
    summary = (stored or {}).get("summary") or {}
    means: dict[SetName, float | None] = {}
    for name in SET_NAMES:
        value = (summary.get(name) or {}).get("candidate")
        means[name] = float(value) if isinstance(value, int | float) else None
    return means


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether to promote, and the rule's reasoning in one sentence."""

    promote: bool
    reason: str


@dataclass(frozen=True, slots=True)
class _Question:
    set_name: SetName
    image: str
    question: str
    expected: str
    names_dish: str | None  # the taught dish for a correction; None for an approved answer


async def evaluate(
    *,
    active: Engine,
    candidate: Engine,
    export_dir: Path,
    store: Store,
    training: TrainingSettings,
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Ask ``active`` and ``candidate`` every question of the three sets and score the answers.

    The sets come from the export in ``export_dir`` (its validation and training records)
    and the store (which answer a record's target replaced, if any). Each model answers with
    greedy decoding and the prompt it is served with (the engines know theirs).
    ``progress(done, total)`` is called as answers come in.
    """
    questions = await _questions(export_dir, store, training)
    total = len(questions)
    done = 0

    def one_done() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, 2 * total)

    active_answers, candidate_answers = await asyncio.gather(
        _answers(active, questions, export_dir, one_done),
        _answers(candidate, questions, export_dir, one_done),
    )
    return Evaluation(
        tuple(
            SampleResult(
                set_name=q.set_name,
                image=q.image,
                question=q.question,
                expected=q.expected,
                active_answer=mine,
                candidate_answer=theirs,
                active_score=score(q.expected, q.names_dish, mine),
                candidate_score=score(q.expected, q.names_dish, theirs),
                corrected=q.names_dish is not None,
            )
            for q, mine, theirs in zip(questions, active_answers, candidate_answers, strict=True)
        )
    )


def score(expected: str, names_dish: str | None, answer: str) -> float:
    """How well ``answer`` matches: for a correction (``names_dish``), 1 when the answer names
    the dish (after normalising case, width and punctuation), else 0; for an approved answer,
    the character-level similarity of the two (0..1), which works for Chinese and English."""
    said = _comparable(answer)
    if names_dish is not None:
        dish = _comparable(names_dish)
        return 1.0 if dish and dish in said else 0.0
    return difflib.SequenceMatcher(None, _comparable(expected), said, autojunk=False).ratio()


def _comparable(text: str) -> str:
    # U+FFFD stands for bytes a tokenizer could not decode (an answer cut mid-character):
    # no content to compare.
    return comparison_key(text.replace("\ufffd", ""))


def decide(evaluation: Evaluation, training: TrainingSettings, *, force: bool = False) -> Decision:
    """The promotion rule (written in the README).

    Only a correction can show a model got better (the active model already agrees with its
    own approved answers), so the candidate must beat the active model by
    ``promote_margin`` on the held-out corrections, or, with fewer than
    ``min_eval_samples`` of those, on taught and kept (the mean of the two sets' means); and
    on every approved answer asked (kept, and held out) it must not fall more than
    ``kept_tolerance`` below the active model. ``force`` promotes whatever the scores.
    """
    if force:
        return Decision(True, "promoted by force, whatever the scores")
    held_out = [s for s in evaluation.samples if s.set_name == "held_out" and s.corrected]
    if len(held_out) >= training.min_eval_samples:
        basis, (active, candidate) = "held-out corrections", _mean_scores(held_out)
    else:
        basis = "taught and kept"
        active, candidate = _mean_of_sets(evaluation, ("taught", "kept"))
    if active is None or candidate is None:
        return Decision(False, "there was nothing to evaluate on")
    approved = [s for s in evaluation.samples if not s.corrected]
    kept_active, kept_candidate = _mean_scores(approved)
    if (
        kept_active is not None
        and kept_candidate is not None
        and kept_candidate < kept_active - training.kept_tolerance
    ):
        return Decision(
            False,
            f"it forgot approved answers: {kept_candidate:.2f} vs {kept_active:.2f} "
            f"(tolerance {training.kept_tolerance:g})",
        )
    gain = candidate - active
    if gain < training.promote_margin:
        return Decision(
            False,
            f"not better enough on {basis}: {candidate:.2f} vs {active:.2f} "
            f"(needs +{training.promote_margin:g})",
        )
    return Decision(True, f"better on {basis}: {candidate:.2f} vs {active:.2f}")


def _mean_scores(samples: Sequence[SampleResult]) -> tuple[float | None, float | None]:
    if not samples:
        return None, None
    return (
        sum(s.active_score for s in samples) / len(samples),
        sum(s.candidate_score for s in samples) / len(samples),
    )


def _mean_of_sets(
    evaluation: Evaluation, sets: Sequence[SetName]
) -> tuple[float | None, float | None]:
    """Each set's mean, then their mean: one correction weighs as much as many kept answers."""
    means = [_mean_scores([s for s in evaluation.samples if s.set_name == name]) for name in sets]
    present = [(a, c) for a, c in means if a is not None and c is not None]
    if not present:
        return None, None
    return (
        sum(a for a, _ in present) / len(present),
        sum(c for _, c in present) / len(present),
    )


async def _questions(export_dir: Path, store: Store, training: TrainingSettings) -> list[_Question]:
    """The three sets' questions: every held-out record, every trained record whose target
    is a correction, and an even sample of the trained records that are approved answers."""
    held_out = [await _question(r, "held_out", store) for r in _records(export_dir / VAL_FILE)]
    trained = [await _question(r, "taught", store) for r in _records(export_dir / TRAIN_FILE)]
    taught = [q for q in trained if q is not None and q.names_dish is not None]
    approved = [q for q in trained if q is not None and q.names_dish is None]
    kept = [
        _Question("kept", q.image, q.question, q.expected, None)
        for q in _evenly(approved, training.kept_samples)
    ]
    return [q for q in held_out if q is not None] + taught + kept


async def _question(record: dict[str, object], set_name: SetName, store: Store) -> _Question | None:
    """The record's first question and the answer it trains, and whether that answer is a
    correction (it differs from what the model said) naming a dish."""
    conversations = record.get("conversations")
    image = record.get("image")
    if not isinstance(conversations, list) or len(conversations) < 2 or not isinstance(image, str):
        return None
    asked = str(conversations[0].get("value", ""))
    question = asked.removeprefix(IMAGE_PLACEHOLDER).strip() or DEFAULT_QUESTION
    expected = str(conversations[1].get("value", ""))
    said = await _model_answer(record, store)
    corrected = said is not None and clean_turn_text(said) != expected
    names_dish = (dish_name(expected) or expected) if corrected else None
    return _Question(set_name, image, question, expected, names_dish)


async def _model_answer(record: dict[str, object], store: Store) -> str | None:
    """What the model answered to the record's first question, from the store."""
    record_id = str(record.get("id", ""))
    last = record_id.removeprefix("exchange-")
    if not last.isascii() or not last.isdigit():
        return None
    chain = await store.conversation(int(last))
    return chain[0].answer if chain else None


def _records(path: Path) -> list[dict[str, object]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def _evenly(items: Sequence[_Question], count: int) -> list[_Question]:
    """``count`` of ``items`` spread evenly over them (all when there are fewer)."""
    if count >= len(items):
        return list(items)
    if count <= 0:
        return []
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


async def _answers(
    engine: Engine,
    questions: Sequence[_Question],
    export_dir: Path,
    one_done: Callable[[], None],
) -> list[str]:
    """Each question asked of ``engine`` in turn (the queue's per-user limit holds for
    evaluation too); a question the engine fails on scores as an empty answer."""
    answers = []
    for question in questions:
        photo = await asyncio.to_thread((export_dir / IMAGES_DIR / question.image).read_bytes)
        request = Request(
            key=EVALUATION_KEY,
            question=question.question,
            images=(photo,),
            params=GenerationParams(max_new_tokens=ANSWER_TOKENS, do_sample=False),
        )
        try:
            answer = await (await engine.submit(request)).result()
            answers.append(answer.text)
        except EngineError as exc:
            log.warning("evaluation: %s could not answer %r: %s", engine.model.name, question, exc)
            answers.append("")
        one_done()
    return answers
