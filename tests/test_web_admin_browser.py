"""The admin console in a real headless browser (Debian's chromium through chromium-driver).

An admin logs in, accepts a correction in Review, starts a run in Training and watches its
progress move without reloading the page, and finds the new version in Models; every admin
page's screenshot goes to docs/screenshots/ for the README. The run is the real
`RunSupervisor` with a trainer whose training is a small subprocess writing real progress
lines (tests/test_runs.py's `FakeTrainer`), so it ends in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.store import CorrectionStatus, RunStage, Store
from tests.test_runs import FakeTrainer, add_feedback
from tests.test_web_admin import PASSWORD, a_corrected_answer, admin_console
from tests.test_web_browser import CHROMEDRIVER, CHROMIUM, _in_thread, _wait_for
from tests.test_web_browser import browser as browser  # the fixture

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromium-driver are not installed",
)
SCREENSHOTS = Path(__file__).parent.parent / "docs" / "screenshots"
# The marker survives only as long as the page is not reloaded.
MARK_PAGE = "window.dishbotNotReloaded = true; return true;"
NOT_RELOADED = "return window.dishbotNotReloaded === true"
TRAINING_MOVES = (
    "const p = document.getElementById('run-progress');"
    "return window.dishbotNotReloaded === true && document.body.dataset.runStage === 'training'"
    " && p.value > 0 && p.value < 1 && !document.getElementById('run-chart').hidden"
)
RUN_FINISHED = "return document.body.dataset.runFinished === 'true'"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_an_admin_reviews_trains_and_sees_the_new_version(
    store: Store, data_dir: Path, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    await add_feedback(store)
    item = await a_corrected_answer(store)

    async def shoot(name: str) -> None:
        await _in_thread(lambda: browser.save_screenshot(str(SCREENSHOTS / f"admin-{name}.png")))

    async with admin_console(store, data_dir) as (console, admin):
        assert admin.runs is not None
        admin.runs._trainer_factory = lambda _settings: FakeTrainer(step_s=0.3)
        base = str(console.server.make_url("/")).rstrip("/")
        await _in_thread(lambda: browser.set_window_size(1280, 900))

        # Log in: /admin sends a stranger to the login page.
        await _in_thread(lambda: browser.get(f"{base}/admin"))
        login_url = await _in_thread(lambda: browser.current_url)
        field = await _in_thread(lambda: browser.find_element(By.ID, "password"))
        await _in_thread(lambda: field.send_keys(PASSWORD))
        await shoot("login")
        await _in_thread(lambda: browser.find_element(By.ID, "login").click())
        await _wait_for(browser, "return document.getElementById('queue') !== null")
        await shoot("overview")

        # Review: accept one user's correction as it is.
        await _in_thread(lambda: browser.get(f"{base}/admin/review"))
        await shoot("review")
        row = f"tr[data-correction='{item.correction_id}'] button.accept"
        await _in_thread(lambda: browser.find_element(By.CSS_SELECTOR, row).click())
        await _wait_for(browser, "return document.getElementById('nothing-to-review') !== null")
        statuses = {c.id: c.status for c in await store.corrections(item.exchange_id)}

        await _in_thread(lambda: browser.get(f"{base}/admin/dataset"))
        await shoot("dataset")

        # Training: start a run and watch it move, on the same page load.
        await _in_thread(lambda: browser.get(f"{base}/admin/training"))
        await _in_thread(lambda: browser.find_element(By.ID, "start-run").click())
        await _wait_for(browser, "return document.getElementById('run-id').textContent !== ''")
        await _in_thread(lambda: browser.execute_script(MARK_PAGE))
        await _wait_for(browser, TRAINING_MOVES)
        await shoot("training")
        await _wait_for(browser, RUN_FINISHED)
        stage = await _in_thread(lambda: browser.find_element(By.ID, "run-stage").text)
        not_reloaded = await _in_thread(lambda: browser.execute_script(NOT_RELOADED))
        runs = await store.training_runs()

        # Models: the new version, active.
        await _in_thread(lambda: browser.get(f"{base}/admin/models"))
        first = await _in_thread(lambda: browser.find_element(By.ID, "version-1"))
        newest = await _in_thread(lambda: first.get_attribute("data-name"))
        heading = await _in_thread(lambda: first.find_element(By.TAG_NAME, "h2").text)
        await shoot("models")

    assert login_url.endswith("/admin/login")
    assert statuses[item.correction_id] is CorrectionStatus.ACCEPTED
    assert not_reloaded
    assert runs[0].stage is RunStage.DONE, runs[0].error
    assert stage == "done: the new model is answering"
    assert newest == f"run-{runs[0].id}"
    assert "active" in heading
    for name in ("login", "overview", "review", "dataset", "training", "models"):
        assert (SCREENSHOTS / f"admin-{name}.png").stat().st_size > 0
