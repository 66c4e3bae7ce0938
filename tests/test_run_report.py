"""What an admin reads about a run: stage, progress bar, loss, time left, the evaluation."""

from __future__ import annotations

from bot.training.evaluation import Evaluation, SampleResult
from bot.training.report import duration, evaluation_table, progress_bar, progress_line


def test_the_progress_bar_fills_with_the_fraction_and_says_the_percent() -> None:
    assert progress_bar(0.0) == "░" * 16 + " 0%"
    assert progress_bar(0.5) == "█" * 8 + "░" * 8 + " 50%"
    assert progress_bar(1.7) == "█" * 16 + " 100%"


def test_a_progress_line_has_the_loss_and_the_time_left_when_known() -> None:
    line = progress_line(fraction=0.25, loss=1.02314, eta_s=873)
    assert line == "████░░░░░░░░░░░░ 25% · loss 1.0231 · 14:33 left"
    assert progress_line(fraction=0.0, loss=None, eta_s=None) == "░" * 16 + " 0%"
    assert "剩余" in progress_line(fraction=0.1, loss=None, eta_s=3725, language="zh")
    assert duration(3725) == "1:02:05"


def test_the_evaluation_table_sets_active_against_candidate_per_set() -> None:
    evaluation = Evaluation(
        (
            SampleResult("taught", "a.jpg", "?", "这是肠粉。", "叉烧", "肠粉", 0.0, 1.0),
            SampleResult("kept", "b.jpg", "?", "虾饺", "虾饺", "虾饺", 1.0, 0.9),
            SampleResult("kept", "c.jpg", "?", "烧卖", "烧卖", "烧卖", 1.0, 1.0),
        )
    )

    lines = evaluation_table(evaluation).splitlines()

    assert lines[0].split() == ["active", "candidate"]
    assert lines[1].split() == ["held", "out", "–", "–", "(0)"]
    assert lines[2].split() == ["taught", "0.00", "1.00", "(1)"]
    assert lines[3].split() == ["kept", "1.00", "0.95", "(2)"]
    assert "纠正过的" in evaluation_table(evaluation, "zh")
