"""/forget: every row of the user and the photos they sent go; nobody else's data does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core import buttons
from bot.core.dialog import Dialog, DialogConfig
from bot.core.events import ButtonPress, Person, PhotoFile, PhotoQuestion, Place, TextMessage
from bot.core.i18n import say
from bot.errors import StoreUnavailable
from bot.store import Store
from bot.store.models import Correction, Exchange, Photo, Rating, User
from bot.store.records import ExchangeRecord, PhotoRecord
from engine.engine import Engine
from engine.types import ModelSpec
from tests.factories import add_photo, add_user, answered, jpeg_bytes
from tests.recording_port import GUARD_S, RecordingPort, person, private_chat
from tests.scripted_backend import ScriptedBackend


async def _count(store: Store, model: type, **where: object) -> int:
    statement = select(func.count()).select_from(model)
    for column, value in where.items():
        statement = statement.where(getattr(model, column) == value)
    async with store.engine.connect() as connection:
        return int(await connection.scalar(statement) or 0)


async def test_forget_removes_every_row_of_the_user_and_their_unshared_photos(
    store: Store, data_dir: Path
) -> None:
    alice = await add_user(store, "1")
    bob = await add_user(store, "2")
    alice_only = await add_photo(store, color=(255, 0, 0))
    shared = await add_photo(store, color=(0, 255, 0))
    bob_only = await add_photo(store, color=(0, 0, 255))

    alice_q = await answered(store, alice, photo=alice_only)
    alice_follow_up = await answered(store, alice, photo=alice_only, parent_id=alice_q.id)
    alice_shared = await answered(store, alice, photo=shared)
    bob_shared = await answered(store, bob, photo=shared)
    bob_q = await answered(store, bob, photo=bob_only)
    # Bob continues Alice's conversation in a group; Alice rates and corrects Bob's answer.
    bob_reply_to_alice = await answered(store, bob, photo=alice_only, parent_id=alice_q.id)
    await store.record_rating(alice_q.id, alice.id, 1)
    await store.record_rating(alice_q.id, bob.id, -1)  # Bob's rating of Alice's answer
    await store.record_rating(bob_q.id, alice.id, -1)
    await store.record_rating(bob_q.id, bob.id, 1)
    await store.record_correction(bob_q.id, alice.id, "肠粉, not 叉烧")
    await store.record_correction(alice_shared.id, alice.id, "烧鹅")
    await store.record_correction(bob_shared.id, bob.id, "云吞面")

    report = await store.forget(alice.id)

    assert (report.users, report.exchanges, report.ratings, report.corrections) == (1, 3, 3, 2)
    assert await store.get_user(alice.id) is None
    assert await _count(store, Exchange, user_id=alice.id) == 0
    assert await _count(store, Rating, user_id=alice.id) == 0
    assert await _count(store, Correction, user_id=alice.id) == 0
    for gone in (alice_q, alice_follow_up, alice_shared):
        assert await store.get_exchange(gone.id) is None

    # Bob's data is untouched: his user row, his exchanges, his own feedback on his answers.
    assert await store.get_user(bob.id) == bob
    assert await _count(store, User) == 1
    assert {e.id for e in [bob_shared, bob_q, bob_reply_to_alice]} == {
        e.id
        for e in [
            await store.get_exchange(bob_shared.id),
            await store.get_exchange(bob_q.id),
            await store.get_exchange(bob_reply_to_alice.id),
        ]
        if e is not None
    }
    assert [(r.user_id, r.value) for r in await store.ratings(bob_q.id)] == [(bob.id, 1)]
    assert [c.text for c in await store.corrections(bob_shared.id)] == ["云吞面"]
    follow_up = await store.get_exchange(bob_reply_to_alice.id)
    assert follow_up is not None
    assert follow_up.parent_id is None

    # "Your photos" go: the photo Alice sent is deleted, row and file, although Bob followed
    # up on it (his follow-up keeps its text, without the photo). The same picture Bob sent
    # himself (content-addressed, one row) stays his.
    assert report.photos == 1
    assert follow_up.photo_sha256 is None
    assert follow_up.question == bob_reply_to_alice.question
    assert await store.get_photo(alice_only.sha256) is None
    assert not (data_dir / alice_only.path).exists()
    for photo in (shared, bob_only):
        assert await store.get_photo(photo.sha256) is not None
        assert (data_dir / photo.path).is_file()
    bobs_own = await store.get_exchange(bob_shared.id)
    assert bobs_own is not None
    assert bobs_own.photo_sha256 == shared.sha256


async def test_forget_deletes_the_files_of_photos_only_the_user_sent(
    store: Store, data_dir: Path
) -> None:
    alice = await add_user(store, "1")
    bob = await add_user(store, "2")
    private = await add_photo(store, color=(255, 0, 0))
    bobs = await add_photo(store, color=(0, 0, 255))
    await answered(store, alice, photo=private)
    await answered(store, alice, photo=private)
    await answered(store, bob, photo=bobs)

    report = await store.forget(alice.id)

    assert report.photos == 1
    assert await store.get_photo(private.sha256) is None
    assert not (data_dir / private.path).exists()
    assert await _count(store, Photo) == 1
    assert (data_dir / bobs.path).is_file()


async def test_forgetting_an_unknown_user_removes_nothing(store: Store) -> None:
    bob = await add_user(store, "2")
    await answered(store, bob, photo=await add_photo(store))

    report = await store.forget(123_456)

    assert (report.users, report.exchanges, report.photos) == (0, 0, 0)
    assert await _count(store, Exchange) == 1


async def test_forget_takes_the_photo_from_follow_ups_at_any_depth_but_not_others_photos(
    store: Store, data_dir: Path
) -> None:
    alice, bob, carol = [await add_user(store, n) for n in ("1", "2", "3")]
    alices = await add_photo(store, color=(255, 0, 0))
    bobs = await add_photo(store, color=(0, 0, 255))
    alice_q = await answered(store, alice, photo=alices)
    bob_follow_up = await answered(store, bob, photo=alices, parent_id=alice_q.id)
    carol_follow_up = await answered(store, carol, photo=alices, parent_id=bob_follow_up.id)
    # Alice followed up on Bob's photo: that photo is Bob's, and stays.
    bob_q = await answered(store, bob, photo=bobs)
    await answered(store, alice, photo=bobs, parent_id=bob_q.id)

    report = await store.forget(alice.id)

    assert report.photos == 1
    for follow_up in (bob_follow_up, carol_follow_up):
        kept = await store.get_exchange(follow_up.id)
        assert kept is not None
        assert (kept.photo_sha256, kept.question) == (None, follow_up.question)
    assert not (data_dir / alices.path).exists()
    assert await store.get_photo(bobs.sha256) is not None
    assert (data_dir / bobs.path).is_file()


class CommitFails(Exception):
    """The database refused to commit (it went away, or a disk filled up)."""


@contextlib.contextmanager
def commits_fail(store: Store, error: Exception | None = None) -> Iterator[None]:
    """Every commit on the store's engine fails (with ``error``) while inside."""

    def refuse(_connection: object) -> None:
        raise error or CommitFails("commit refused")

    event.listen(store.engine.sync_engine, "commit", refuse)
    try:
        yield
    finally:
        event.remove(store.engine.sync_engine, "commit", refuse)


async def test_a_forget_that_does_not_commit_deletes_no_photo_file(
    store: Store, data_dir: Path
) -> None:
    alice = await add_user(store, "1")
    photo = await add_photo(store, color=(255, 0, 0))
    await answered(store, alice, photo=photo)

    with commits_fail(store), pytest.raises(CommitFails):
        await store.forget(alice.id)

    # Nothing was forgotten, so the row still names its file, and the file is there.
    assert await store.get_user(alice.id) is not None
    assert await store.get_photo(photo.sha256) is not None
    assert (data_dir / photo.path).is_file()


async def test_a_photo_whose_commit_the_database_drops_is_store_unavailable_and_leaves_nothing(
    store: Store, data_dir: Path
) -> None:
    dropped = ConnectionResetError("connection reset by peer")
    with commits_fail(store, dropped), pytest.raises(StoreUnavailable):
        await store.add_photo(jpeg_bytes((9, 9, 9)), image_format="JPEG", width=64, height=48)

    assert await _count(store, Photo) == 0
    assert [p for p in (data_dir / "photos").rglob("*") if p.is_file()] == []


async def test_a_photo_whose_row_is_not_committed_leaves_no_file(
    store: Store, data_dir: Path
) -> None:
    with commits_fail(store), pytest.raises(CommitFails):
        await store.add_photo(jpeg_bytes((9, 9, 9)), image_format="JPEG", width=64, height=48)

    assert await _count(store, Photo) == 0
    assert [p for p in (data_dir / "photos").rglob("*") if p.is_file()] == []


# -- /forget racing questions in flight (the dialog) -----------------------------------------


@contextlib.asynccontextmanager
async def serving(store: Store, backend: ScriptedBackend | None = None) -> AsyncIterator[Dialog]:
    engine = Engine(backend or ScriptedBackend(), ModelSpec("scripted", "dishbot-test"))
    async with engine:
        yield Dialog(store, engine, DialogConfig(edit_interval_s=0.01, questions_per_minute=60))


async def confirm_forget(dialog: Dialog, port: RecordingPort, who: Person) -> None:
    where = private_chat(who.user_id)
    confirmation = await port.send(where, "forget everything?")
    data = buttons.encode(buttons.ConfirmForget(who.user_id))
    await dialog.handle(ButtonPress(who, where, confirmation, data), port)


async def nothing_left_of(store: Store, data_dir: Path, who: Person) -> None:
    assert await store.find_user(who.platform, who.user_id) is None
    assert await _count(store, Exchange) == 0
    assert await _count(store, Photo) == 0
    assert [p for p in (data_dir / "photos").rglob("*") if p.is_file()] == []


async def test_a_photo_still_downloading_when_its_sender_confirms_forget_is_never_stored(
    store: Store, data_dir: Path
) -> None:
    port, ada = RecordingPort(), person("1")
    fetching, released = asyncio.Event(), asyncio.Event()

    async def slow_download() -> bytes:
        fetching.set()
        await released.wait()
        return jpeg_bytes((10, 20, 30))

    question = PhotoQuestion(ada, private_chat("1"), "m1", PhotoFile(slow_download), "what?")
    async with serving(store) as dialog:
        asking = asyncio.create_task(dialog.handle(question, port))
        await asyncio.wait_for(fetching.wait(), GUARD_S)
        await confirm_forget(dialog, port, ada)
        released.set()
        await asyncio.wait_for(asking, GUARD_S)

    await nothing_left_of(store, data_dir, ada)
    assert not any("says" in text for text in port.texts("1")), "the question was not answered"


async def test_forget_cancels_the_users_question_being_answered_and_leaves_nothing(
    store: Store, data_dir: Path
) -> None:
    port, ada = RecordingPort(), person("1")

    async def download() -> bytes:
        return jpeg_bytes((10, 20, 30))

    question = PhotoQuestion(ada, private_chat("1"), "m1", PhotoFile(download), "slow one")
    async with serving(store, ScriptedBackend(step_s=0.05)) as dialog:
        asking = asyncio.create_task(dialog.handle(question, port))
        await port.until(lambda: any("says" in text for text in port.texts("1")))
        await confirm_forget(dialog, port, ada)
        await asyncio.wait_for(asking, GUARD_S)

    await nothing_left_of(store, data_dir, ada)
    assert "Cancelled." in port.texts("1")
    assert not any(shown.buttons for shown in port.messages.values() if "says" in shown.text), (
        "no answer was delivered to rate"
    )


async def test_the_same_picture_sent_by_someone_else_as_its_first_sender_forgets_stays_theirs(
    store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, ada, lin = RecordingPort(), person("1"), person("2")

    async def download() -> bytes:
        return jpeg_bytes((10, 20, 30))  # both send the very same file

    async with serving(store) as dialog:
        first = PhotoQuestion(ada, private_chat("1"), "a1", PhotoFile(download), "what?")
        await dialog.handle(first, port)
        add_photo = store.add_photo

        async def add_photo_as_ada_forgets(*args: Any, **kwargs: Any) -> PhotoRecord:
            # Lin's copy of the picture is stored just as Ada's /forget goes through.
            photo = await add_photo(*args, **kwargs)
            monkeypatch.setattr(store, "add_photo", add_photo)
            await confirm_forget(dialog, port, ada)
            return photo

        monkeypatch.setattr(store, "add_photo", add_photo_as_ada_forgets)
        second = PhotoQuestion(lin, private_chat("2"), "l1", PhotoFile(download), "what?")
        await asyncio.wait_for(dialog.handle(second, port), GUARD_S)

    assert any(shown.buttons for shown in port.messages.values() if shown.chat_id == "2"), (
        "Lin's question was answered"
    )
    [photo] = await _photos(store)
    assert (data_dir / photo.path).is_file()
    assert await _count(store, Exchange, photo_sha256=photo.sha256) == 1


async def _photos(store: Store) -> list[Photo]:
    async with AsyncSession(store.engine) as session:
        return list(await session.scalars(select(Photo)))


async def test_a_follow_up_on_an_answer_forgotten_as_it_is_stored_is_told_the_answer_is_gone(
    store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, ada, lin = RecordingPort(), person("1"), person("2")
    group = Place("-100", private=False)

    async def download() -> bytes:
        return jpeg_bytes((10, 20, 30))

    async with serving(store) as dialog:
        first = PhotoQuestion(ada, group, "a1", PhotoFile(download), "what?", addressed=True)
        await dialog.handle(first, port)
        [answer_id] = [i for i, shown in port.messages.items() if shown.buttons]
        start_exchange = store.start_exchange

        async def start_exchange_as_ada_forgets(**values: Any) -> ExchangeRecord:
            # Ada's /forget goes through just before Lin's follow-up on her answer is stored.
            monkeypatch.setattr(store, "start_exchange", start_exchange)
            await confirm_forget(dialog, port, ada)
            return await start_exchange(**values)

        monkeypatch.setattr(store, "start_exchange", start_exchange_as_ada_forgets)
        follow_up = TextMessage(lin, group, "l1", "is it spicy?", reply_to=answer_id)
        await asyncio.wait_for(dialog.handle(follow_up, port), GUARD_S)

    assert port.texts("-100")[-1] == say("answer_gone", "en")
    assert await _count(store, Exchange) == 0
    assert await _count(store, Photo) == 0
