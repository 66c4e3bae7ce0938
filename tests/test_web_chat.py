"""The web console's chat page: a visitor asks, follows up and rates; attackers are refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import ClientSession, DummyCookieJar

from bot.adapters.web import server
from bot.adapters.web.chat import NEW_VISITORS_PER_MINUTE
from bot.core import buttons
from bot.core.dialog import MAX_QUESTION_LENGTH, DialogConfig
from bot.core.i18n import say
from bot.store import Store
from engine.engine import Engine, EngineConfig
from engine.images import MAX_IMAGE_BYTES
from engine.types import ModelSpec
from tests.scripted_backend import ScriptedBackend
from tests.web_console import ANSWER_WAIT_S, a_photo, web_console


async def test_a_visitor_asks_about_a_photo_and_the_answer_streams_in(
    store: Store, data_dir: Path
) -> None:
    async with web_console(store, data_dir) as console, console.visitor() as visitor:
        html = await visitor.open_page()
        await visitor.listen()
        assert (await visitor.ask("这是什么菜？", a_photo())).status == 202
        asked = await visitor.next_update()
        answer = await visitor.answer()

    assert "dishbot" in html
    assert asked["author"] == "visitor"
    assert "这是什么菜？" in answer["text"]
    assert [b["label"] for b in answer["buttons"]][:2] == [buttons.THUMBS_UP, buttons.THUMBS_DOWN]
    stored = await store.get_exchange(_exchange(answer))
    assert stored is not None
    assert (stored.platform, stored.question) == ("web", "这是什么菜？")
    assert stored.photo_sha256 is not None


async def test_a_visitor_waiting_behind_others_sees_how_many_are_ahead(
    store: Store, data_dir: Path
) -> None:
    engine = Engine(
        ScriptedBackend(capacity=1, step_s=0.01),  # "slow" takes 100 steps: time to queue
        ModelSpec("scripted", "scripted-model"),
        EngineConfig(max_pending_per_key=3),
    )
    async with (
        web_console(store, data_dir, engine=engine) as console,
        console.visitor() as first,
        console.visitor() as second,
        console.visitor() as third,
    ):
        for visitor in (first, second, third):
            await visitor.open_page()
            await visitor.listen()
        await first.ask("slow: what is this?", a_photo())
        await first.bot_says()  # the model is answering it
        await second.ask("and this?", a_photo((10, 200, 30)))
        async with asyncio.timeout(ANSWER_WAIT_S):
            while engine.stats().waiting < 1:  # noqa: ASYNC110 - polls the engine's queue
                await asyncio.sleep(0.01)
        await third.ask("and this one?", a_photo((30, 30, 200)))
        waiting = await third.bot_says()
        answer = await third.answer()

    assert waiting == say("queued", "en", ahead=1)
    assert answer["text"] == "scripted-model says: and this one?"


async def test_a_follow_up_asks_about_the_same_photo_and_a_rating_is_stored(
    store: Store, data_dir: Path
) -> None:
    async with web_console(store, data_dir) as console, console.visitor() as visitor:
        await visitor.open_page()
        await visitor.listen()
        await visitor.ask("what is this?", a_photo())
        first = await visitor.answer()
        await visitor.ask("is it spicy?", reply_to=first["id"])
        second = await visitor.answer()
        await visitor.press(second["id"], buttons.encode(buttons.Rate(_exchange(second), 1)))
        notice = await visitor.next_update("notice")

    follow_up = await store.get_exchange(_exchange(second))
    assert follow_up is not None
    assert follow_up.parent_id == _exchange(first)
    assert follow_up.photo_sha256 is not None
    assert notice["text"] == say("rated_up", "en")
    assert [r.value for r in await store.ratings(_exchange(second))] == [1]


async def test_a_visitor_corrects_an_answer_in_the_form_under_it(
    store: Store, data_dir: Path
) -> None:
    async with web_console(store, data_dir) as console, console.visitor() as visitor:
        await visitor.open_page()
        await visitor.listen()
        await visitor.ask("what is this?", a_photo())
        answer = await visitor.answer()
        exchange_id = _exchange(answer)
        await visitor.press(answer["id"], buttons.encode(buttons.Correct(exchange_id)))
        form = await visitor.next_update("correction")
        await visitor.correct(form["exchange_id"], "叉烧 char siu")
        thanks = await visitor.bot_says(besides=answer["id"])

    assert form["message_id"] == answer["id"]
    assert form["prompt"] == say("ask_correction", "en")
    assert thanks == say("correction_thanks", "en", text="叉烧 char siu")
    assert [c.text for c in await store.corrections(exchange_id)] == ["叉烧 char siu"]


async def test_a_visitor_can_forget_everything_stored_about_them(
    store: Store, data_dir: Path
) -> None:
    async with web_console(store, data_dir) as console, console.visitor() as visitor:
        await visitor.open_page()
        await visitor.listen()
        await visitor.ask("what is this?", a_photo())
        answer = await visitor.answer()
        await visitor.ask("/forget")
        confirm = await visitor.answer()  # the confirmation, with its buttons
        delete = next(b for b in confirm["buttons"] if b["label"] == say("forget_yes", "en"))
        await visitor.press(confirm["id"], delete["data"])
        done = await visitor.next_update("notice")

    assert done["text"].startswith("Done: I deleted 1 question(s)")
    assert await store.get_exchange(_exchange(answer)) is None


async def test_web_visitors_have_the_same_rate_limit_as_chat_users(
    store: Store, data_dir: Path
) -> None:
    config = DialogConfig(edit_interval_s=0.05, questions_per_minute=1)
    async with (
        web_console(store, data_dir, dialog_config=config) as console,
        console.visitor() as visitor,
    ):
        await visitor.open_page()
        await visitor.listen()
        await visitor.ask("what is this?", a_photo())
        await visitor.answer()
        await visitor.ask("and this?", a_photo((10, 200, 30)))
        refusal = await visitor.bot_says()

    assert refusal == say("slow_down", "en")


async def test_new_identities_are_not_free_for_the_taking(store: Store, data_dir: Path) -> None:
    async with web_console(store, data_dir) as console, console.visitor() as visitor:
        await visitor.open_page()
        statuses = []
        # No cookie kept: every page asks for a new identity.
        async with ClientSession(cookie_jar=DummyCookieJar()) as cookieless:
            for _ in range(NEW_VISITORS_PER_MINUTE + 1):
                statuses.append((await cookieless.get(console.server.make_url("/"))).status)
        returning = await visitor.client.get("/")

    assert statuses[-1] == 429  # the first page was the first visitor's
    assert statuses[:-2] == [200] * (NEW_VISITORS_PER_MINUTE - 1)
    assert returning.status == 200  # a visitor with a cookie is not refused


async def test_a_forged_cookie_gets_nobodys_conversation(store: Store, data_dir: Path) -> None:
    async with (
        web_console(store, data_dir) as console,
        console.visitor() as owner,
        console.visitor() as attacker,
    ):
        await owner.open_page()
        await owner.ask("what is this?", a_photo())
        owner_id = owner.cookie().partition(".")[0]  # type: ignore[union-attr]
        await attacker.open_page()
        attacker.client.session.cookie_jar.clear()
        forged = {"Cookie": f"dishbot_visitor={owner_id}.forged-signature"}
        forged["X-CSRF-Token"] = attacker.csrf or ""
        stream = await attacker.client.get("/events", headers=forged)
        asked = await attacker.client.post(
            "/ask", data={"question": "what did they ask?"}, headers=forged
        )
        refusal = await asked.json()
        fresh = await attacker.client.get("/", headers=forged)

    assert stream.status == 403
    assert asked.status == 403
    assert refusal["error"] == say("web_session_expired", "en")
    # The page gives the forger an identity of their own, not the one they claimed.
    new_cookie = fresh.cookies["dishbot_visitor"]
    assert not new_cookie.value.startswith(owner_id)
    assert new_cookie["httponly"]
    assert new_cookie["samesite"] == "Lax"


async def test_a_post_without_the_visitors_csrf_token_is_refused(
    store: Store, data_dir: Path
) -> None:
    async with (
        web_console(store, data_dir) as console,
        console.visitor() as visitor,
        console.visitor() as other,
    ):
        await visitor.open_page()
        await other.open_page()
        without = await visitor.ask("what is this?", a_photo(), csrf=None)
        borrowed = await visitor.ask("what is this?", a_photo(), csrf=other.csrf)
        press = await visitor.client.post("/press", json={"message_id": "1", "data": "x"})

    assert [without.status, borrowed.status, press.status] == [403, 403, 403]
    user = await store.find_user("web", visitor.cookie().partition(".")[0])  # type: ignore[union-attr]
    assert user is None  # nothing reached the dialog


async def test_an_oversized_photo_is_refused_with_a_clear_message(
    store: Store, data_dir: Path
) -> None:
    async with web_console(store, data_dir) as console, console.visitor() as visitor:
        await visitor.open_page()
        response = await visitor.ask("what is this?", b"\xff\xd8" + b"\0" * MAX_IMAGE_BYTES)
        body = await response.json()

    assert response.status == 413
    assert body["error"] == say("photo_too_large", "en", megabytes=f"{MAX_IMAGE_BYTES / 2**20:g}")
    user = await store.find_user("web", visitor.cookie().partition(".")[0])  # type: ignore[union-attr]
    assert user is None  # refused before the dialog saw it


async def test_static_files_cannot_be_read_outside_their_directory(
    store: Store, data_dir: Path
) -> None:
    async with web_console(store, data_dir) as console, console.visitor() as visitor:
        script = await visitor.client.get("/static/chat.js")
        escapes = [
            await visitor.client.get(path)
            for path in ("/static/../server.py", "/static/%2e%2e/server.py", "/static/..%2fchat.py")
        ]
        page = await visitor.client.get("/")

    assert script.status == 200
    assert all(response.status in (403, 404) for response in escapes)
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]


async def test_a_non_ascii_cookie_or_csrf_token_is_refused_not_a_server_error(
    store: Store, data_dir: Path
) -> None:
    async with web_console(store, data_dir) as console, console.visitor() as visitor:
        await visitor.open_page()
        visitor_id = (visitor.cookie() or "").partition(".")[0]
        bad_token = await visitor.ask("what is this?", a_photo(), csrf="é")
        forged = {"Cookie": f"dishbot_visitor={visitor_id}.é", "X-CSRF-Token": visitor.csrf or ""}
        async with ClientSession(cookie_jar=DummyCookieJar()) as bare:
            page = await bare.get(console.server.make_url("/"), headers=forged)
            asked = await bare.post(
                console.server.make_url("/ask"), data={"question": "hi"}, headers=forged
            )
            refusal = await asked.json()

    assert bad_token.status == 403
    assert page.status == 200  # the cookie is ignored: a new visitor, not an error
    assert not page.cookies["dishbot_visitor"].value.startswith(visitor_id)
    assert asked.status == 403
    assert refusal["error"] == say("web_session_expired", "en")


async def test_a_visitor_posting_too_fast_is_refused_before_anything_is_kept(
    store: Store, data_dir: Path
) -> None:
    # Posts a visitor may make a minute: twice the questions, plus the feedback.
    config = DialogConfig(edit_interval_s=0.05, questions_per_minute=1, feedback_per_minute=1)
    async with (
        web_console(store, data_dir, dialog_config=config) as console,
        console.visitor() as visitor,
    ):
        await visitor.open_page()
        allowed = [(await visitor.ask(f"hello {n}")).status for n in range(3)]
        flooded = await visitor.ask("one too many")
        refusal = await flooded.json()
        pressed = await visitor.press("1", "x")
        visitor_id = (visitor.cookie() or "").partition(".")[0]
        kept = console.adapter.port.conversations.of(visitor_id).messages.values()

    assert allowed == [202, 202, 202]
    assert flooded.status == 429
    assert refusal["error"] == say("slow_down", "en")
    assert pressed.status == 429
    assert "one too many" not in [message["text"] for message in kept]


async def test_a_very_long_question_is_kept_only_up_to_the_question_limit(
    store: Store, data_dir: Path
) -> None:
    async with web_console(store, data_dir) as console, console.visitor() as visitor:
        await visitor.open_page()
        await visitor.listen()
        await visitor.ask("x" * (5 * MAX_QUESTION_LENGTH), a_photo())
        asked = await visitor.next_update()
        refusal = await visitor.bot_says()

    assert asked["author"] == "visitor"
    assert asked["text"] == "x" * MAX_QUESTION_LENGTH
    assert refusal == say("question_too_long", "en", limit=MAX_QUESTION_LENGTH)


async def test_when_the_console_has_its_hands_full_a_question_is_refused_as_busy(
    store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "MAX_TASKS_IN_HAND", 2)
    async with (
        web_console(store, data_dir) as console,
        console.visitor() as first,
        console.visitor() as second,
    ):
        await first.open_page()
        await second.open_page()
        await first.listen()
        held = [(await first.ask(f"hang {n}", a_photo())).status for n in range(2)]
        async with asyncio.timeout(ANSWER_WAIT_S):
            while console.engine.stats().in_flight < 2:  # noqa: ASYNC110 - polls the engine
                await asyncio.sleep(0.01)
        refused = await second.ask("and this?", a_photo((10, 200, 30)))
        refusal = await refused.json()
        await console.engine.stop()  # the hanging answers end
        second_id = (second.cookie() or "").partition(".")[0]
        kept = console.adapter.port.conversations.of(second_id).messages

    assert held == [202, 202]
    assert refused.status == 503
    assert refusal["error"] == say("busy", "en")
    assert not kept  # refused before anything was shown or stored
    assert await store.find_user("web", second_id) is None


def _exchange(answer: dict[str, object]) -> int:
    rate = buttons.decode(str(answer["buttons"][0]["data"]))  # type: ignore[index]
    assert isinstance(rate, buttons.Rate)
    return rate.exchange_id
