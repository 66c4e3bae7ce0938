"""The first run as a person sees it in a real browser: the chat page is up while the model
downloads, shows how far it is, and answers once the model is ready.

`dishbot run` is a real process fetching the tiny InternVL from the hub emulator; Chromium
(Debian's, through chromium-driver) opens the page it prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.factories import jpeg_bytes
from tests.hub_emulator import HubEmulator
from tests.test_model_download import REPO_ID, DishbotRun, held_in_the_weights
from tests.test_model_download import hub as hub  # the fixture, shared
from tests.test_web_browser import ANSWER_WITH_BUTTONS, CHROMEDRIVER, CHROMIUM, WAIT_S
from tests.test_web_browser import browser as browser  # the fixture, shared

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromium-driver are not installed (apt-get install chromium "
    "chromium-driver)",
)
SCREENSHOT = Path(__file__).parent.parent / "docs" / "screenshots" / "first-run.png"
BANNER = (
    "const s = document.getElementById('model-status');"
    "const p = document.getElementById('model-progress');"
    "return s.hidden || p.hidden || p.value < 30 ? null : [s.dataset.phase, s.innerText, p.value];"
)
BANNER_GONE = "return document.getElementById('model-status').hidden"


def _wait_for(driver: Any, script: str) -> Any:
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.1)
    return wait.until(lambda d: d.execute_script(script))


def test_the_page_shows_the_download_then_answers_once_the_model_is_ready(
    hub: HubEmulator, tmp_path: Path, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    held_in_the_weights(hub)
    dishbot = DishbotRun(hub, tmp_path, DISHBOT_ENGINE__MAX_NEW_TOKENS="8")
    try:
        hub.wait_until_held()
        browser.get(dishbot.url)
        # The download is held half way through the weights; the page catches up by itself.
        phase, words, percent = _wait_for(browser, BANNER)
        browser.save_screenshot(str(SCREENSHOT))
        hub.release()
        _wait_for(browser, BANNER_GONE)  # the page asks again by itself until it is ready
        photo = tmp_path / "cheung_fun.jpg"
        photo.write_bytes(jpeg_bytes(size=(640, 480)))
        browser.find_element(By.ID, "photo").send_keys(str(photo))
        browser.find_element(By.ID, "question").send_keys("这是什么菜？")
        browser.find_element(By.ID, "send").click()
        answer_id = _wait_for(browser, ANSWER_WITH_BUTTONS)
        answer = browser.find_element(By.ID, f"m-{answer_id}").find_element(By.CLASS_NAME, "text")
        answer_text = answer.text
    finally:
        hub.release()
        status = dishbot.stop()

    assert phase == "downloading"
    assert words.startswith(f"downloading the model {REPO_ID}, ")
    assert "% of " in words
    assert 0 < percent < 100
    assert answer_text
    assert "still getting ready" not in answer_text
    assert status == 0


def test_a_page_opened_while_a_retry_waits_shows_the_model_ready_once_it_is(
    hub: HubEmulator, tmp_path: Path, browser: Any
) -> None:
    for _ in range(5):  # five drops in a row: "kept being cut short", tried again in 5 s
        hub.drop_once(after_bytes=100_000, filename="model.safetensors")
    dishbot = DishbotRun(hub, tmp_path)
    try:
        dishbot.until(lambda: dishbot.model_status()["phase"] == "failed", "the failure")
        browser.get(dishbot.url)
        shown_first = browser.find_element("id", "model-status-text").text
        _wait_for(browser, BANNER_GONE)  # the page keeps asking while a retry is due
    finally:
        status = dishbot.stop()

    assert "trying again in" in shown_first
    assert status == 0
