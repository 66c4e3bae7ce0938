"""The chat page in a real headless browser: Debian's chromium driven through chromium-driver.

Skipped only where chromium is not installed (CI installs it: see .ci/run). The answer comes
from the tiny random-weight InternVL on the transformers backend, so it is gibberish, but it
is the real model path: decode, prompt, generate, stream.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bot.core import buttons
from bot.core.i18n import say
from bot.settings import Settings
from bot.store import Store
from tests.factories import jpeg_bytes
from tests.web_console import web_console

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromium-driver are not installed (apt-get install chromium "
    "chromium-driver)",
)
SCREENSHOT = Path(__file__).parent.parent / "docs" / "screenshots" / "chat.png"
WAIT_S = 60.0  # a safety net for a broken page, not a timing claim
T = TypeVar("T")


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=420,860")  # a phone's screen
    options.add_argument("--lang=en-US")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def tiny_engine(tiny_internvl: Path) -> Any:
    from bot.engine_setup import build_engine

    settings = Settings(
        engine={
            "backend": "transformers",
            "model": str(tiny_internvl),
            "device": "cpu",
            "max_new_tokens": 12,
        }
    )
    return build_engine(settings)


async def _in_thread(call: Callable[[], T]) -> T:
    # Selenium blocks; the server under test runs on this event loop.
    return await asyncio.to_thread(call)


async def _wait_for(driver: Any, script: str) -> Any:
    """What ``script`` (JavaScript returning a value) returns once the page makes it truthy."""
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.1)
    return await _in_thread(lambda: wait.until(lambda d: d.execute_script(script)))


STATUS_SHOWN = "const s = document.getElementById('status'); return !s.hidden && s.textContent"
ANSWER_WITH_BUTTONS = (
    "const a = [...document.querySelectorAll('.msg.bot')].filter("
    "m => m.querySelector('button.press')); return a.length ? a[a.length - 1].dataset.id : null;"
)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_visitor_uploads_a_photo_sees_the_answer_stream_in_and_rates_it(
    store: Store, data_dir: Path, tmp_path: Path, browser: Any, tiny_engine: Any
) -> None:
    from selenium.webdriver.common.by import By

    photo = tmp_path / "char_siu.jpg"
    photo.write_bytes(jpeg_bytes(size=(640, 480)))
    async with web_console(store, data_dir, engine=tiny_engine) as console:
        url = str(console.server.make_url("/"))
        await _in_thread(lambda: browser.get(url))
        page_input = await _in_thread(lambda: browser.find_element(By.ID, "photo"))
        await _in_thread(lambda: page_input.send_keys(str(photo)))
        question = await _in_thread(lambda: browser.find_element(By.ID, "question"))
        await _in_thread(lambda: question.send_keys("What is <b>this</b>?"))
        await _in_thread(lambda: browser.find_element(By.ID, "send").click())

        answer_id = await _wait_for(browser, ANSWER_WITH_BUTTONS)
        answer = await _in_thread(lambda: browser.find_element(By.ID, f"m-{answer_id}"))
        answer_text = await _in_thread(lambda: answer.find_element(By.CLASS_NAME, "text").text)
        asked = await _in_thread(
            lambda: browser.find_element(By.CSS_SELECTOR, ".msg.visitor .text").text
        )
        bold = await _in_thread(lambda: browser.find_elements(By.CSS_SELECTOR, ".log b"))
        shown_photo = await _wait_for(
            browser, "return document.querySelector('.msg.visitor img.photo') !== null"
        )
        await _in_thread(lambda: browser.save_screenshot(str(SCREENSHOT)))
        thumbs_up = await _in_thread(
            lambda: answer.find_element(By.CSS_SELECTOR, "button.press[data-action$=':up']")
        )
        rate = buttons.decode(await _in_thread(lambda: thumbs_up.get_attribute("data-action")))
        await _in_thread(thumbs_up.click)
        notice = await _wait_for(browser, STATUS_SHOWN)

    assert answer_text.strip() != ""
    assert asked == "What is <b>this</b>?"  # shown as text, not markup
    assert bold == []
    assert shown_photo
    assert notice == say("rated_up", "en")
    assert isinstance(rate, buttons.Rate)
    exchange = await store.get_exchange(rate.exchange_id)
    assert exchange is not None
    assert (exchange.platform, exchange.answer) == ("web", answer_text.strip())
    assert [r.value for r in await store.ratings(exchange.id)] == [1]
    assert SCREENSHOT.stat().st_size > 0
