"""The evaluation gate: the candidate and the active model answer the same questions, taken
from a real export of a real store, through real engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.settings import TrainingSettings
from bot.store import Store
from bot.training.evaluation import Evaluation, SampleResult, decide, evaluate, score
from engine.engine import Engine, EngineConfig
from engine.types import ModelSpec
from tests.factories import add_photo, add_user, answered
from tests.scripted_backend import ScriptedBackend
from tests.test_export_selection import ADMIN_ID, export

QUESTION = "这是什么菜？"


def test_a_correction_scores_when_the_answer_names_the_taught_dish() -> None:
    assert score("这是肠粉。", "肠粉", "这是肠粉，淋了酱油。") == 1.0
    assert score("这是肠粉。", "肠粉", "这是叉烧。") == 0.0
    assert score("This is cheung fun.", "cheung fun", "That's CHEUNG-FUN, rice rolls!") == 1.0


def test_an_approved_answer_scores_by_character_similarity_in_any_language() -> None:
    assert score("这是叉烧，甜的。", None, "这是叉烧，甜的。") == 1.0
    close = score("这是叉烧，甜的。", None, "这是叉烧，很甜。")
    far = score("这是叉烧，甜的。", None, "Mapo tofu is spicy.")
    assert 0.5 < close < 1.0
    assert far < 0.2
    assert score("这是叉烧。", None, "这是叉烧。\ufffd") == 1.0, "an answer cut mid-character"


def test_a_correction_with_no_dish_name_left_names_nothing() -> None:
    assert score("？？", "？？", "这是叉烧。") == 0.0


def _evaluation(**scores: list[tuple[float, float]]) -> Evaluation:
    """Held-out and taught samples are corrections, kept ones approved answers; held-out
    approved answers are given as ``held_out_approved``."""
    samples = []
    for name, pairs in scores.items():
        set_name = "held_out" if name == "held_out_approved" else name
        corrected = name in ("held_out", "taught")
        samples += [
            SampleResult(set_name, "p.jpg", "?", "x", "a", "c", active, candidate, corrected)  # type: ignore[arg-type]
            for active, candidate in pairs
        ]
    return Evaluation(tuple(samples))


def test_the_gate_promotes_a_candidate_better_by_the_margin_on_held_out() -> None:
    training = TrainingSettings(min_eval_samples=2, promote_margin=0.1)

    better = decide(_evaluation(held_out=[(0.2, 0.5), (0.4, 0.5)]), training)
    barely = decide(_evaluation(held_out=[(0.5, 0.55), (0.5, 0.55)]), training)

    assert better.promote
    assert "held-out corrections" in better.reason
    assert not barely.promote
    assert "needs +0.1" in barely.reason


def test_with_few_held_out_questions_taught_and_kept_decide() -> None:
    training = TrainingSettings(min_eval_samples=5, promote_margin=0.1)

    decision = decide(
        _evaluation(held_out=[(1.0, 0.0)], taught=[(0.0, 1.0)], kept=[(1.0, 1.0), (1.0, 1.0)]),
        training,
    )

    assert decision.promote, decision.reason
    assert "taught and kept" in decision.reason


def test_one_correction_learnt_outweighs_many_kept_answers_it_keeps() -> None:
    # The origin lesson: one correction, ten approved answers the candidate still gives.
    decision = decide(_evaluation(taught=[(0.0, 1.0)], kept=[(1.0, 1.0)] * 10), TrainingSettings())

    assert decision.promote, decision.reason
    assert decision.reason == "better on taught and kept: 1.00 vs 0.50"


def test_held_out_approved_answers_do_not_block_but_must_not_be_forgotten() -> None:
    training = TrainingSettings(min_eval_samples=2, promote_margin=0.1, kept_tolerance=0.1)
    corrections = [(0.0, 1.0), (0.0, 1.0)]

    kept = decide(_evaluation(held_out=corrections, held_out_approved=[(1.0, 1.0)] * 8), training)
    forgot = decide(_evaluation(held_out=corrections, held_out_approved=[(1.0, 0.5)] * 8), training)

    assert kept.promote, kept.reason
    assert not forgot.promote
    assert "forgot approved answers" in forgot.reason


def test_a_candidate_that_forgets_approved_answers_is_rejected_however_much_it_learnt() -> None:
    training = TrainingSettings(promote_margin=0.1, kept_tolerance=0.1)

    decision = decide(_evaluation(taught=[(0.0, 1.0)] * 5, kept=[(1.0, 0.5)]), training)

    assert not decision.promote
    assert "forgot approved answers" in decision.reason
    assert decide(_evaluation(taught=[(0.0, 1.0)], kept=[(1.0, 0.5)]), training, force=True).promote


def test_nothing_to_evaluate_on_is_no_promotion() -> None:
    decision = decide(Evaluation(), TrainingSettings())

    assert not decision.promote
    assert decision.reason == "there was nothing to evaluate on"


async def test_both_models_answer_the_held_out_taught_and_kept_questions_of_an_export(
    store: Store, tmp_path: Path
) -> None:
    asker = await add_user(store, "5")
    admin = await add_user(store, ADMIN_ID)
    taught = await answered(
        store,
        asker,
        photo=await add_photo(store, (1, 2, 3)),
        question=QUESTION,
        answer="这是叉烧。",
    )
    await store.record_correction(taught.id, admin.id, "肠粉")
    for n in range(3):
        photo = await add_photo(store, (50 * n, 90, 9))
        liked = await answered(store, asker, photo=photo, question=QUESTION, answer=f"叉烧 {n}")
        await store.record_rating(liked.id, admin.id, 1)
    out = tmp_path / "export"
    await export(store, tmp_path / "data", out)
    # The scripted backend answers "<model name> says: <question>": the candidate's name
    # names the taught dish, the active model's does not.
    active = Engine(ScriptedBackend(), ModelSpec("scripted", "叉烧-v1"), EngineConfig())
    candidate = Engine(ScriptedBackend(), ModelSpec("scripted", "肠粉-v2"), EngineConfig())
    seen: list[tuple[int, int]] = []

    async with active, candidate:
        evaluation = await evaluate(
            active=active,
            candidate=candidate,
            export_dir=out,
            store=store,
            training=TrainingSettings(kept_samples=2),
            progress=lambda done, total: seen.append((done, total)),
        )

    assert (evaluation.count("taught"), evaluation.count("kept")) == (1, 2)
    assert evaluation.mean("taught", "active") == 0.0
    assert evaluation.mean("taught", "candidate") == 1.0
    [lesson] = [s for s in evaluation.samples if s.set_name == "taught"]
    assert (lesson.question, lesson.expected) == (QUESTION, "这是肠粉。")
    assert lesson.candidate_answer == f"肠粉-v2 says: {QUESTION}"
    assert seen[-1] == (6, 6)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'dishbot.db'}"
