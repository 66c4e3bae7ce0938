"""The web console's admin pages: only admins get in, and what they do reaches the database."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, CookieJar
from aiohttp.test_utils import TestClient

from bot.adapters.web import WebAdapter
from bot.adapters.web.admin_auth import (
    LOGINS_PER_MINUTE,
    LOGINS_PER_MINUTE_PER_ADDRESS,
    AdminSessions,
)
from bot.core.admin import Admin
from bot.settings import Settings, WebSettings
from bot.store import CorrectionStatus, RunStage, Store, TrainingRunRecord
from bot.training.evaluation import Evaluation, SampleResult
from engine.engine import Engine
from engine.types import ModelSpec
from tests.factories import add_photo, add_user, answered
from tests.scripted_backend import ScriptedBackend
from tests.test_runs import BASE_PATH, FakeTrainer, add_feedback, make_supervisor, settings_for
from tests.web_console import Console, web_console

PASSWORD = "correct horse battery staple"
PAGES = [
    "/admin",
    "/admin/review",
    "/admin/dataset",
    "/admin/training",
    "/admin/models",
    "/admin/training/events",
]
ACTIONS = [
    "/admin/logout",
    "/admin/training/start",
    "/admin/training/cancel",
    "/admin/models/activate",
    "/admin/models/rollback",
    "/admin/review/accept",
    "/admin/review/reject",
    "/admin/review/trust",
    "/admin/review/ban",
    "/admin/dataset/export",
]


class AdminBrowser:
    """A browser without a browser, on the admin pages: keeps the cookies, reads the CSRF
    token from the pages' forms."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client
        self.csrf: str | None = None

    async def log_in(self, password: str = PASSWORD) -> ClientResponse:
        return await self.client.post(
            "/admin/login", data={"password": password}, allow_redirects=False
        )

    async def log_in_with_token(self, token: str) -> ClientResponse:
        return await self.client.post("/admin/login", data={"token": token}, allow_redirects=False)

    async def open(self, path: str) -> str:
        response = await self.client.get(path, allow_redirects=False)
        assert response.status == 200, (path, response.status)
        html = await response.text()
        found = re.search(r'name="csrf" value="([^"]+)"', html)
        if found:
            self.csrf = found.group(1)
        return html

    async def post(self, path: str, csrf: str | None = "page", **fields: str) -> ClientResponse:
        data = dict(fields)
        token = self.csrf if csrf == "page" else csrf
        if token is not None:
            data["csrf"] = token
        return await self.client.post(path, data=data, allow_redirects=False)

    def cookie(self, name: str = "dishbot_admin") -> str | None:
        for cookie in self.client.session.cookie_jar:
            if cookie.key == name:
                return cookie.value
        return None


@asynccontextmanager
async def browser(console: Console) -> AsyncIterator[AdminBrowser]:
    client = TestClient(console.server, cookie_jar=CookieJar(unsafe=True))
    await client.start_server()
    try:
        yield AdminBrowser(client)
    finally:
        await client.close()


def admin_settings(data_dir: Path, password: str | None = PASSWORD) -> Settings:
    settings = settings_for(data_dir)
    return settings.model_copy(update={"web": WebSettings(admin_password=password)})


@asynccontextmanager
async def admin_console(
    store: Store, data_dir: Path, *, password: str | None = PASSWORD
) -> AsyncIterator[tuple[Console, Admin]]:
    settings = admin_settings(data_dir, password)
    engine = Engine(ScriptedBackend(capacity=2, step_s=0.01), ModelSpec(BASE_PATH, "base"))
    admin = Admin(settings, store, engine)
    told: list[TrainingRunRecord] = []
    admin.runs = make_supervisor(store, settings, engine, FakeTrainer(step_s=0.05), told)
    try:
        async with web_console(
            store, data_dir, engine=engine, settings=settings, admin=admin
        ) as console:
            yield console, admin
    finally:
        await admin.runs.close()


async def two_versions(store: Store) -> None:
    """ "base", and a trained "run-1" that is active."""
    await store.add_model_version("base", BASE_PATH)
    await store.activate_model_version("base")
    await store.add_model_version("run-1", "/models/run-1", trainer="fake")
    await store.activate_model_version("run-1")


@dataclass
class Corrected:
    exchange_id: int
    correction_id: int
    author_id: int
    other_id: int
    photo_sha256: str


async def a_corrected_answer(store: Store) -> Corrected:
    """An answer with two users' corrections waiting for review (one of them hostile)."""
    asker = await add_user(store, "501")
    author = await add_user(store, "502")
    other = await add_user(store, "503")
    photo = await add_photo(store, (30, 120, 220))
    exchange = await answered(
        store, asker, photo=photo, question="<b>what</b> is this?", answer="<img src=x>叉烧"
    )
    correction = await store.record_correction(exchange.id, author.id, "肠粉")
    await store.record_correction(exchange.id, other.id, "<script>alert('x')</script>")
    return Corrected(exchange.id, correction.id, author.id, other.id, photo.sha256)


# -- who gets in --------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
async def test_a_stranger_is_sent_to_the_login_page_from_every_admin_page(
    store: Store, data_dir: Path, path: str
) -> None:
    async with admin_console(store, data_dir) as (console, _), browser(console) as stranger:
        response = await stranger.client.get(path, allow_redirects=False)

    assert response.status == 303
    assert response.headers["Location"] == "/admin/login"


@pytest.mark.parametrize("path", ACTIONS)
async def test_every_admin_action_is_refused_without_a_session(
    store: Store, data_dir: Path, path: str
) -> None:
    await two_versions(store)
    await add_feedback(store)
    item = await a_corrected_answer(store)
    ids = {"correction": str(item.correction_id), "exchange": str(item.exchange_id)}
    user = {"user": str(item.author_id), "trust": "1", "banned": "1"}
    async with admin_console(store, data_dir) as (console, _), browser(console) as stranger:
        response = await stranger.post(path, csrf=None, name="base", **ids, **user)

    assert response.status == 403
    assert (await store.active_model_version()).name == "run-1"  # type: ignore[union-attr]
    assert await store.training_runs() == []
    assert len(await store.corrections_to_review()) == 1
    author = await store.get_user(item.author_id)
    assert author is not None
    assert (author.trust, author.banned) == (0, False)
    assert not (data_dir / "training" / "exports").exists()


async def test_a_web_visitor_is_not_an_admin(store: Store, data_dir: Path) -> None:
    async with admin_console(store, data_dir) as (console, _), console.visitor() as visitor:
        await visitor.open_page()  # a visitor cookie and a visitor CSRF token
        page = await visitor.client.get("/admin", allow_redirects=False)
        action = await visitor.client.post(
            "/admin/models/rollback",
            data={"csrf": visitor.csrf or ""},
            headers={"X-CSRF-Token": visitor.csrf or ""},
            allow_redirects=False,
        )

    assert page.status == 303
    assert action.status == 403


async def test_a_chat_admin_is_not_a_web_admin(store: Store, data_dir: Path) -> None:
    async with admin_console(store, data_dir) as (console, _), browser(console) as someone:
        # The settings name telegram:900 an admin; a cookie claiming that identity is nothing.
        someone.client.session.cookie_jar.update_cookies({"dishbot_admin": "telegram:900"})
        response = await someone.client.get("/admin", allow_redirects=False)

    assert response.status == 303


async def test_the_admin_password_logs_in_and_a_wrong_one_does_not(
    store: Store, data_dir: Path
) -> None:
    async with admin_console(store, data_dir) as (console, _), browser(console) as admin:
        wrong = await admin.log_in("hunter2")
        wrong_page = await wrong.text()
        refused = await admin.client.get("/admin", allow_redirects=False)
        right = await admin.log_in()
        html = await admin.open("/admin")

    assert wrong.status == 401
    assert "wrong password" in wrong_page
    assert refused.status == 303
    assert right.status == 303
    assert right.headers["Location"] == "/admin"
    cookie = right.headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Max-Age=" in cookie
    assert "The queue now" in html


async def test_login_attempts_are_limited_per_address(store: Store, data_dir: Path) -> None:
    async with admin_console(store, data_dir) as (console, _), browser(console) as guesser:
        for guess in range(LOGINS_PER_MINUTE_PER_ADDRESS):
            assert (await guesser.log_in(f"guess {guess}")).status == 401
        # Even the right password is refused now: a guesser cannot tell it was right.
        limited = await guesser.log_in()
        page = await guesser.client.get("/admin", allow_redirects=False)

    assert limited.status == 429
    assert page.status == 303


async def test_the_one_time_login_link_asks_before_it_logs_in_and_works_once(
    store: Store, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=data_dir, web=WebSettings(port=0))
    async with web_console(store, data_dir, settings=settings) as console:
        adapter: WebAdapter = console.adapter
        with caplog.at_level(logging.INFO, logger="bot.adapters.web.server"):
            await adapter.start()
            await adapter.stop()
            printed = re.search(r"(http://\S+/admin/login\?token=(\S+))", caplog.text)
            assert printed is not None
            token = printed.group(2)
            async with (
                browser(console) as previewer,
                browser(console) as admin,
                browser(console) as late,
            ):
                # A link preview or a prefetch opens the link: it sees a form, nothing more.
                preview = await previewer.client.get(
                    f"/admin/login?token={token}", allow_redirects=False
                )
                preview_html = await preview.text()
                previewer_in = await previewer.client.get("/admin", allow_redirects=False)
                used = await admin.log_in_with_token(token)
                admin_in = await admin.client.get("/admin", allow_redirects=False)
                again = await late.log_in_with_token(token)
                late_in = await late.client.get("/admin", allow_redirects=False)
                links = re.findall(r"http://\S+/admin/login\?token=(\S+)", caplog.text)
                with_the_new_link = await late.log_in_with_token(links[-1])

    assert printed.group(1).startswith(adapter.url or "?")
    assert preview.status == 200
    assert 'method="post"' in preview_html
    assert f'name="token" value="{token}"' in preview_html
    assert previewer_in.status == 303
    assert used.status == 303
    assert used.headers["Location"] == "/admin"
    assert "SameSite=Strict" in used.headers["Set-Cookie"]
    assert admin_in.status == 200
    assert again.status == 401
    assert late_in.status == 303
    # The used link is replaced by a new one, logged as the first was: nobody is locked out.
    assert len(links) == 2
    assert links[-1] != token
    assert with_the_new_link.status == 303


async def test_a_login_link_form_posted_from_another_site_is_refused(
    store: Store, data_dir: Path
) -> None:
    async with (
        admin_console(store, data_dir, password=None) as (console, _),
        browser(console) as victim,
    ):
        token = console.adapter.admin_sessions.login_token or ""
        forged = await victim.client.post(
            "/admin/login",
            data={"token": token},
            headers={"Origin": "https://evil.example"},
            allow_redirects=False,
        )
        page = await victim.client.get("/admin", allow_redirects=False)
        still_works = await victim.log_in_with_token(token)

    assert forged.status == 403
    assert page.status == 303
    assert still_works.status == 303


async def test_a_non_ascii_admin_cookie_or_csrf_token_is_refused_not_a_server_error(
    store: Store, data_dir: Path
) -> None:
    await two_versions(store)
    async with admin_console(store, data_dir) as (console, _), browser(console) as admin:
        await admin.log_in()
        await admin.open("/admin/models")
        in_form = await admin.post("/admin/models/rollback", csrf="é")
        in_header = await admin.client.post(
            "/admin/models/rollback", headers={"X-CSRF-Token": "é"}, allow_redirects=False
        )
        cookie = admin.cookie() or ""
        async with browser(console) as forger:
            forged = {"Cookie": f"dishbot_admin={cookie[:-1]}é"}
            page = await forger.client.get("/admin", headers=forged, allow_redirects=False)
            password = await forger.log_in("pässwörd")
    async with (
        admin_console(store, data_dir, password=None) as (console, _),
        browser(console) as guesser,
    ):
        token = await guesser.log_in_with_token("é" * 32)

    assert (in_form.status, in_header.status) == (403, 403)
    assert page.status == 303
    assert password.status == 401
    assert token.status == 401
    assert (await store.active_model_version()).name == "run-1"  # type: ignore[union-attr]


async def test_with_a_password_there_is_no_login_link(store: Store, data_dir: Path) -> None:
    async with admin_console(store, data_dir) as (console, _):
        assert console.adapter.admin_sessions.login_token is None


async def test_a_session_is_new_at_each_login_and_gone_after_logout(
    store: Store, data_dir: Path
) -> None:
    async with admin_console(store, data_dir) as (console, _), browser(console) as admin:
        await admin.log_in()
        first = admin.cookie()
        await admin.log_in()
        second = admin.cookie()
        await admin.open("/admin")
        logged_out = await admin.post("/admin/logout")
        # The old cookie, kept by someone, no longer works.
        admin.client.session.cookie_jar.update_cookies({"dishbot_admin": second or ""})
        after = await admin.client.get("/admin", allow_redirects=False)

    assert first != second
    assert logged_out.status == 303
    assert after.status == 303


async def test_a_forged_admin_post_without_the_csrf_token_is_refused(
    store: Store, data_dir: Path
) -> None:
    await two_versions(store)
    async with admin_console(store, data_dir) as (console, _), browser(console) as admin:
        await admin.log_in()
        await admin.open("/admin/models")
        without = await admin.post("/admin/models/rollback", csrf=None)
        wrong = await admin.post("/admin/models/rollback", csrf="x" * 43)

    assert without.status == 403
    assert wrong.status == 403
    assert (await store.active_model_version()).name == "run-1"  # type: ignore[union-attr]


# -- what an admin does -------------------------------------------------------------------


async def test_an_admin_rolls_back_and_activates_a_version(store: Store, data_dir: Path) -> None:
    await two_versions(store)
    async with admin_console(store, data_dir) as (console, _), browser(console) as admin:
        await admin.log_in()
        page = await admin.open("/admin/models")
        rolled = await admin.post("/admin/models/rollback")
        after_rollback = await store.active_model_version()
        activated = await admin.post("/admin/models/activate", name="run-1")
        unknown = await admin.post("/admin/models/activate", name="nope")
        told = await admin.open(unknown.headers["Location"])

    assert "run-1" in page
    assert "base" in page
    assert rolled.status == activated.status == 303
    assert after_rollback is not None
    assert after_rollback.name == "base"
    assert (await store.active_model_version()).name == "run-1"  # type: ignore[union-attr]
    assert "There is no such version." in told


async def test_the_models_page_shows_the_evaluation_side_by_side_escaped(
    store: Store, data_dir: Path
) -> None:
    photo = await add_photo(store)
    sample = SampleResult(
        "taught",
        f"images/{photo.sha256}.jpg",
        "这是什么菜？",
        "肠粉",
        "<script>alert(1)</script>叉烧",
        "肠粉",
        0.0,
        1.0,
        corrected=True,
    )
    await store.add_model_version("base", BASE_PATH)
    await store.add_model_version(
        "run-1", "/m", trainer="fake", evaluation=Evaluation((sample,)).to_json()
    )
    async with admin_console(store, data_dir) as (console, _), browser(console) as admin:
        await admin.log_in()
        html = await admin.open("/admin/models")
        image = await admin.client.get(f"/admin/photos/{photo.sha256}")
        body = await image.read()

    assert "&lt;script&gt;alert(1)&lt;/script&gt;叉烧" in html
    assert "<script>alert(1)" not in html
    assert f'src="/admin/photos/{photo.sha256}"' in html
    assert image.status == 200
    assert body == store.photo_file(photo).read_bytes()


async def test_photos_are_for_admins_only(store: Store, data_dir: Path) -> None:
    photo = await add_photo(store)
    async with (
        admin_console(store, data_dir) as (console, _),
        browser(console) as stranger,
        browser(console) as admin,
    ):
        refused = await stranger.client.get(f"/admin/photos/{photo.sha256}", allow_redirects=False)
        await admin.log_in()
        unknown = await admin.client.get("/admin/photos/" + "0" * 64)
        traversal = await admin.client.get("/admin/photos/..%2F..%2Fweb_secret")

    assert refused.status == 303
    assert unknown.status == 404
    assert traversal.status == 404


async def test_an_admin_starts_a_run_watches_it_live_and_it_lands_in_models(
    store: Store, data_dir: Path
) -> None:
    await add_feedback(store)
    async with admin_console(store, data_dir) as (console, admin), browser(console) as web:
        assert admin.runs is not None
        # Slow enough for the page to see it train (the stream reads the run every second).
        admin.runs._trainer_factory = lambda _settings: FakeTrainer(step_s=0.3)
        await web.log_in()
        await web.open("/admin/training")
        started = await web.post("/admin/training/start")
        runs = await store.training_runs()
        assert runs, "no run started"
        seen = await _watch(web, until=lambda state: state["finished"])
        assert admin.runs is not None
        finished = await admin.runs.wait(runs[0].id)
        models = await web.open("/admin/models")
        training = await web.open("/admin/training")

    assert started.status == 303
    assert finished.stage is RunStage.DONE, finished.error
    stages = [state["stage"] for state in seen]
    assert any(state["fraction"] is not None and state["fraction"] < 1 for state in seen), stages
    assert any(state["chart"] for state in seen)  # the loss curve, drawn while it trained
    assert seen[-1]["stage"] == "done: the new model is answering"
    assert f"run-{finished.id}" in models
    assert "done: the new model is answering" in training


async def test_an_admin_cancels_the_run(store: Store, data_dir: Path) -> None:
    await add_feedback(store)
    async with admin_console(store, data_dir) as (console, admin), browser(console) as web:
        assert admin.runs is not None
        admin.runs._trainer_factory = lambda _settings: FakeTrainer(step_s=5.0)
        await web.log_in()
        await web.open("/admin/training")
        await web.post("/admin/training/start")
        await _watch(web, until=lambda state: state["stage"] == "training")
        second = await web.post("/admin/training/start")
        told_busy = await web.open(second.headers["Location"])
        cancelled = await web.post("/admin/training/cancel")
        busy_again = await web.post("/admin/training/cancel")

    runs = await store.training_runs()
    assert cancelled.status == 303
    assert runs[0].stage is RunStage.CANCELLED
    assert busy_again.headers["Location"].endswith("m=retrain_nothing_running")
    assert "A run is already going: one at a time." in told_busy
    assert len(runs) == 1


async def _watch(web: AdminBrowser, until: Any) -> list[dict[str, Any]]:
    """The training stream's states until one satisfies ``until``."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(30):  # a safety net for a broken test, not a timing claim
        response = await web.client.get("/admin/training/events")
        assert response.status == 200
        try:
            while True:
                line = await response.content.readline()
                assert line, "the stream ended"
                if not line.startswith(b"data: "):
                    continue
                state = json.loads(line[len(b"data: ") :])
                seen.append(state)
                if state["id"] is not None and until(state):
                    return seen
        finally:
            response.close()


async def test_the_review_page_shows_each_answer_with_its_corrections_escaped(
    store: Store, data_dir: Path
) -> None:
    item = await a_corrected_answer(store)
    async with admin_console(store, data_dir) as (console, _), browser(console) as admin:
        await admin.log_in()
        html = await admin.open("/admin/review")

    assert f'src="/admin/photos/{item.photo_sha256}"' in html
    assert "&lt;b&gt;what&lt;/b&gt; is this?" in html
    assert "&lt;img src=x&gt;叉烧" in html
    assert "肠粉" in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert "<script>alert" not in html
    assert "<img src=x>" not in html


async def test_an_admin_accepts_a_correction_in_review(store: Store, data_dir: Path) -> None:
    item = await a_corrected_answer(store)
    async with admin_console(store, data_dir) as (console, _), browser(console) as admin:
        await admin.log_in()
        await admin.open("/admin/review")
        accepted = await admin.post("/admin/review/accept", correction=str(item.correction_id))
        html = await admin.open("/admin/review")

    assert accepted.status == 303
    statuses = {c.user_id: c.status for c in await store.corrections(item.exchange_id)}
    assert statuses == {
        item.author_id: CorrectionStatus.ACCEPTED,
        item.other_id: CorrectionStatus.REJECTED,
    }
    assert "No corrections are waiting for review." in html


async def test_an_admin_fixes_and_accepts_a_correction(store: Store, data_dir: Path) -> None:
    item = await a_corrected_answer(store)
    async with admin_console(store, data_dir) as (console, _), browser(console) as admin:
        await admin.log_in()
        await admin.open("/admin/review")
        await admin.post(
            "/admin/review/accept", correction=str(item.correction_id), text="布拉肠粉"
        )

    accepted = [c for c in await store.corrections(item.exchange_id) if c.id == item.correction_id]
    assert [(c.text, c.status) for c in accepted] == [("布拉肠粉", CorrectionStatus.ACCEPTED)]


async def test_an_admin_rejects_an_answers_corrections(store: Store, data_dir: Path) -> None:
    item = await a_corrected_answer(store)
    async with admin_console(store, data_dir) as (console, _), browser(console) as admin:
        await admin.log_in()
        await admin.open("/admin/review")
        await admin.post("/admin/review/reject", exchange=str(item.exchange_id))

    statuses = {c.status for c in await store.corrections(item.exchange_id)}
    assert statuses == {CorrectionStatus.REJECTED}


async def test_an_admin_trusts_one_user_and_bans_another(store: Store, data_dir: Path) -> None:
    item = await a_corrected_answer(store)
    async with admin_console(store, data_dir) as (console, _), browser(console) as admin:
        await admin.log_in()
        await admin.open("/admin/review")
        await admin.post("/admin/review/trust", user=str(item.author_id), trust="1")
        await admin.post("/admin/review/ban", user=str(item.other_id), banned="1")
        html = await admin.open("/admin/review")
        bad = await admin.post("/admin/review/ban", user="../1", banned="1")

    author, other = await store.get_user(item.author_id), await store.get_user(item.other_id)
    assert author is not None
    assert other is not None
    assert (author.trust, author.banned) == (1, False)
    assert (other.trust, other.banned) == (0, True)
    assert "Stop trusting" in html
    assert "Lift the ban" in html
    assert bad.status == 400


async def test_the_overview_charts_questions_latency_and_ratings_per_version(
    store: Store, data_dir: Path
) -> None:
    asker, rater = await add_user(store, "601"), await add_user(store, "602")
    exchange = await answered(store, asker, photo=await add_photo(store))
    await store.record_rating(exchange.id, rater.id, 1)
    async with admin_console(store, data_dir) as (console, _), browser(console) as admin:
        await admin.log_in()
        html = await admin.open("/admin")

    images = re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', html)
    charts = [base64.b64decode(image).decode() for image in images]
    assert len(charts) == 3
    questions, latency, ratings = charts
    assert "Questions per day" in questions
    assert exchange.created_at.date().isoformat() in questions
    assert "p95" in latency
    assert "internvl2-2b" in ratings  # the version that answered, rated 👍
    assert not any("kozea.github.io" in chart for chart in charts)  # no script from a CDN
    assert "The queue now" in html


async def test_the_dataset_page_previews_the_export_and_the_button_exports(
    store: Store, data_dir: Path
) -> None:
    await add_feedback(store, photos=3)
    item = await a_corrected_answer(store)
    await store.accept_correction(item.correction_id)
    async with admin_console(store, data_dir) as (console, admin), browser(console) as web:
        await web.log_in()
        html = await web.open("/admin/dataset")
        exported = await web.post("/admin/dataset/export")
        told = await web.open(exported.headers["Location"])
        exports = list(admin.exports_dir().iterdir())

    assert re.search(r'id="samples">4<', html)  # 3 approved answers and the accepted fix
    assert "exported" in html
    assert "肠粉" in html  # among the dishes, and in a record
    assert f'src="/admin/photos/{item.photo_sha256}"' in html
    assert exported.status == 303
    assert [path.name for path in exports] == [exported.headers["Location"].split("=")[1]]
    assert (exports[0] / "train.jsonl").read_text(encoding="utf-8")
    assert exports[0].name in told


async def test_a_login_form_posted_from_another_site_is_refused(
    store: Store, data_dir: Path
) -> None:
    async with admin_console(store, data_dir) as (console, _), browser(console) as victim:
        forged = await victim.client.post(
            "/admin/login",
            data={"password": PASSWORD},
            headers={"Origin": "https://evil.example"},
            allow_redirects=False,
        )
        page = await victim.client.get("/admin", allow_redirects=False)

    assert forged.status == 403
    assert page.status == 303


async def test_a_login_goes_to_the_overview_whatever_address_it_names(
    store: Store, data_dir: Path
) -> None:
    async with admin_console(store, data_dir) as (console, _), browser(console) as admin:
        response = await admin.client.post(
            "/admin/login?next=https://evil.example/&return_to=//evil.example",
            data={"password": PASSWORD},
            allow_redirects=False,
        )

    assert response.headers["Location"] == "/admin"


def test_an_expired_or_altered_session_cookie_is_refused() -> None:
    now = [1_000_000.0]
    sessions = AdminSessions(b"s" * 32, PASSWORD, ttl_s=60, clock=lambda: now[0])
    cookie = sessions.log_in_with_password(PASSWORD)
    assert cookie is not None
    session_id, expiry, signature = cookie.split(".")
    longer = f"{session_id}.{int(expiry) + 3600}.{signature}"

    assert sessions.session(cookie) == session_id
    assert sessions.session(longer) is None  # the expiry is signed
    assert AdminSessions(b"t" * 32, PASSWORD).session(cookie) is None  # another secret
    now[0] += 61
    assert sessions.session(cookie) is None


async def test_the_training_stream_ends_when_the_admin_logs_out(
    store: Store, data_dir: Path
) -> None:
    async with admin_console(store, data_dir) as (console, _), browser(console) as admin:
        await admin.log_in()
        await admin.open("/admin/training")
        stream = await admin.client.get("/admin/training/events")
        first = await stream.content.readline()
        await admin.post("/admin/logout")
        async with asyncio.timeout(10):  # a safety net, not a timing claim
            rest = await stream.content.read()

    assert first.startswith(b"data: ")
    assert stream.content.at_eof()
    assert b"data:" not in rest


def test_login_attempts_are_limited_overall_across_addresses() -> None:
    sessions = AdminSessions(b"s" * 32, PASSWORD)
    allowed = [sessions.may_try(f"10.0.{n // 250}.{n % 250}") for n in range(LOGINS_PER_MINUTE)]

    assert all(allowed)
    assert not sessions.may_try("10.9.9.9")  # a new address, but the minute's attempts are used
