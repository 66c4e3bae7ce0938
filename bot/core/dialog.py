"""The user flows: ask about a photo, follow up, rate, correct, cancel, forget.

Adapters turn platform updates into `bot.core.events` and call `Dialog.handle` with the
`ChatPort` to answer through. Everything here is the same on every platform.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

from bot.core import buttons
from bot.core.answer_writes import AnswerWrites, WaitingAnswer, store_unavailable
from bot.core.budget import PacedPort, unpaced
from bot.core.events import (
    ButtonPress,
    Command,
    CorrectionSubmitted,
    Event,
    NotAPhoto,
    Person,
    PhotoQuestion,
    Place,
    TextMessage,
)
from bot.core.i18n import Language, image_reason, language_of, say
from bot.core.observer import NO_OBSERVER, AnswerTiming, DialogObserver, Outcome
from bot.core.port import ChatPort
from bot.core.reply import EditPacer, StreamingReply
from bot.core.text import visible_text
from bot.errors import AlreadyAnswered, AlreadyAsked, NotFound, StoreUnavailable
from bot.store import ExchangeStatus, Store
from bot.store.models import utcnow
from bot.store.records import ExchangeRecord, ForgetReport, UserRecord
from engine.engine import Answer, Engine, Queued, Request, RequestHandle, TextDelta
from engine.errors import (
    BadImage,
    Cancelled,
    DeadlineExceeded,
    EngineClosed,
    EngineError,
    ModelNotReady,
    ModelUnavailable,
    PromptTooLong,
    QueueFull,
    TooManyPending,
)
from engine.images import MAX_IMAGE_BYTES
from engine.types import Turn

log = logging.getLogger(__name__)

MAX_CORRECTION_LENGTH = 500  # characters; a dish name or a sentence, not an essay
# Characters; a question about a dish fits with room to spare, and a wall of text is refused
# before it costs the model (and every user batched with it) a long prompt.
MAX_QUESTION_LENGTH = 1000
PENDING_PROMPTS = 10_000  # users whose latest ✏️ prompt is remembered, newest kept

AdminHandler = Callable[[Command, ChatPort, UserRecord, Language], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class DialogConfig:
    """The dialog's limits; `bot.app` fills them from the settings."""

    questions_per_minute: int = 6
    feedback_per_minute: int = 30  # button presses and corrections, per user
    replies_per_minute: int = 20  # hints, refusals of non-photos, command replies, per user
    follow_up_window_s: float = 600.0  # a private text this soon after a photo follows it up
    correction_window_s: float = 600.0  # a private text this soon after ✏️ is the correction
    edit_interval_s: float = 1.0  # per chat
    max_photo_bytes: int = MAX_IMAGE_BYTES
    # Pauses between tries to store a finished answer while the database is unavailable;
    # after the last one the answer is shown without buttons and stored in the background.
    answer_write_retries_s: tuple[float, ...] = (0.2, 1.0, 3.0)


class Verdict(enum.Enum):
    """What `RateLimiter.check` decided about one event."""

    ALLOWED = "allowed"
    REFUSED = "refused"  # the first refusal in a window: tell the user once
    REFUSED_AGAIN = "refused again"  # told already: stay silent, a flood gets no echo


class RateLimiter:
    """At most ``per_minute`` events per key in any sliding minute.

    Keys idle for a minute are forgotten now and then (every `SWEEP_EVERY` checks, and at
    least once a minute), so memory follows the users active in the last minute, not every
    user ever seen.
    """

    SWEEP_EVERY = 1024  # checks between sweeps of idle keys

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._times: dict[str, deque[float]] = defaultdict(deque)
        self._told: set[str] = set()  # keys refused since their last allowed event
        self._checks = 0
        self._swept_at = clock()

    def __len__(self) -> int:
        """How many keys are remembered."""
        return len(self._times)

    def allow(self, key: str) -> bool:
        """Count an event for ``key``; False (and not counted) when over the limit."""
        return self.check(key) is Verdict.ALLOWED

    def check(self, key: str) -> Verdict:
        """Count an event for ``key`` when under the limit, and say whether it was allowed,
        and if not, whether this is the first refusal since the key was last allowed."""
        now = self._clock()
        self._checks += 1
        if self._checks % self.SWEEP_EVERY == 0 or now - self._swept_at >= 60.0:
            self._forget_idle(now)
        times = self._times[key]
        while times and times[0] <= now - 60.0:
            times.popleft()
        if len(times) >= self.per_minute:
            if key in self._told:
                return Verdict.REFUSED_AGAIN
            self._told.add(key)
            return Verdict.REFUSED
        self._told.discard(key)
        times.append(now)
        return Verdict.ALLOWED

    def _forget_idle(self, now: float) -> None:
        self._swept_at = now
        idle = [key for key, times in self._times.items() if not times or times[-1] <= now - 60]
        for key in idle:
            del self._times[key]
            self._told.discard(key)


@dataclass(frozen=True, slots=True)
class _Refusal:
    words: str  # for the user
    reason: str  # for the exchange record


@dataclass(eq=False, slots=True)
class _Asking:
    """A question on its way in, from receipt until it is stored; ``forgotten`` once its
    sender confirms /forget meanwhile (it must then store nothing)."""

    forgotten: bool = False


class _Forgotten(Exception):
    """The sender of a question confirmed /forget before it was stored."""


class KeyedLocks:
    """One lock per key, held only while in use, so memory follows the keys busy now."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        """How many keys have a lock now (taken or waited for)."""
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Hold ``key``'s lock."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass(frozen=True, slots=True)
class _CorrectionPrompt:
    message_id: str
    platform_user_id: str
    asked_at: float


class Dialog:
    """One dialog serves every chat of every adapter; it is safe to call concurrently."""

    def __init__(
        self,
        store: Store,
        engine: Engine,
        config: DialogConfig | None = None,
        *,
        admin: AdminHandler | None = None,
        clock: Callable[[], float] = time.monotonic,
        observer: DialogObserver = NO_OBSERVER,
    ) -> None:
        self.store = store
        self.observer = observer
        self.engine = engine
        self.config = config or DialogConfig()
        self._admin = admin
        self._clock = clock
        self._rate = RateLimiter(self.config.questions_per_minute, clock)
        self._feedback_rate = RateLimiter(self.config.feedback_per_minute, clock)
        self._replies_rate = RateLimiter(self.config.replies_per_minute, clock)
        self._pacer = EditPacer(self.config.edit_interval_s)
        self._handles: dict[str, set[RequestHandle]] = defaultdict(set)
        self._answering: set[int] = set()  # exchanges being answered here now
        self.answer_writes = AnswerWrites(store)
        # Questions received and not yet stored, per user, so /forget can stop them; and a
        # lock per user that /forget and the storing of a question of theirs take in turn.
        self._asking: dict[str, set[_Asking]] = {}
        self._user_locks = KeyedLocks()
        # ✏️ prompts waiting for a reply are in the store, which outlives a restart; the
        # newest per (platform, chat, user) is also here, for private chats, where users
        # often just type instead of replying (a convenience a restart may forget).
        self._latest_prompt: OrderedDict[tuple[str, str, str], _CorrectionPrompt] = OrderedDict()

    async def handle(self, event: Event, port: ChatPort) -> None:
        """Act on one event. Never raises: failures are logged and the user gets an apology."""
        port = PacedPort(port, self._pacer.budget)  # every call counted in its chat's budget
        try:
            await self._dispatch(event, port)
        except StoreUnavailable as error:
            # Expected while the database restarts: one line, no traceback per message.
            log.warning("could not handle %s: %s", type(event).__name__, error)
            await self._apologise(event, port, "store_unavailable")
        except Exception:
            log.exception("failed to handle %s", type(event).__name__)
            await self._apologise(event, port, "engine_failed")

    @staticmethod
    async def _apologise(event: Event, port: ChatPort, key: str) -> None:
        with contextlib.suppress(Exception):
            language = language_of(event.who.language)
            if isinstance(event, ButtonPress):
                await port.acknowledge(event, say(key, language))
            else:
                await port.send(event.where, say(key, language))

    async def close(self) -> None:
        """Stop storing answers in the background (call it when the bot stops)."""
        await self.answer_writes.close()

    def busy_exchanges(self) -> set[int]:
        """The pending exchanges this process is still answering or storing."""
        return self._answering | self.answer_writes.exchange_ids()

    async def _dispatch(self, event: Event, port: ChatPort) -> None:
        match event:
            case PhotoQuestion():
                with self._receiving(event.who) as asking:
                    await self._photo(event, port, asking)
            case NotAPhoto():
                await self._not_a_photo(event, port)
            case TextMessage():
                with self._receiving(event.who) as asking:
                    await self._text(event, port, asking)
            case ButtonPress():
                await self._press(event, port)
            case CorrectionSubmitted():
                await self._correction_submitted(event, port)
            case Command():
                await self._command(event, port)

    # -- people ---------------------------------------------------------------------------

    async def _user(self, who: Person) -> UserRecord | None:
        """The stored user, or None when they are banned (banned users get no answers)."""
        user = await self.store.upsert_user(
            who.platform, who.user_id, display_name=who.display_name, language=who.language
        )
        if user.banned:
            log.info("ignoring banned user %s:%s", who.platform, who.user_id)
            return None
        return user

    @staticmethod
    def _key(who: Person) -> str:
        return f"{who.platform}:{who.user_id}"

    @contextlib.contextmanager
    def _receiving(self, who: Person) -> Iterator[_Asking]:
        """Track a question from receipt until handled, so /forget can find it."""
        key, asking = self._key(who), _Asking()
        self._asking.setdefault(key, set()).add(asking)
        try:
            yield asking
        finally:
            questions = self._asking[key]
            questions.discard(asking)
            if not questions:
                del self._asking[key]

    @contextlib.asynccontextmanager
    async def _storing(self, who: Person, asking: _Asking) -> AsyncIterator[None]:
        """Store a question's photo and exchange in turn with /forget: never after it."""
        async with self._user_locks.hold(self._key(who)):
            if asking.forgotten:
                raise _Forgotten
            yield

    # -- asking about a photo -------------------------------------------------------------

    async def _photo(self, event: PhotoQuestion, port: ChatPort, asking: _Asking) -> None:
        if not event.where.private and not event.addressed:
            return
        if await self._asked_before(event):
            return
        user = await self._user(event.who)
        if user is None:
            return
        question = visible_text(event.question or "")
        language = language_of(event.who.language, question)
        question = question or say("default_question", language)
        if await self._over_rate_limit(port, user, event, question, language):
            return
        if await self._too_long(port, user, event, question, language):
            return
        limit = self.config.max_photo_bytes
        if event.photo.size is not None and event.photo.size > limit:
            words = say("photo_too_large", language, megabytes=f"{limit / 2**20:g}")
            reason = f"photo of {event.photo.size} bytes is over the limit"
            await self._refuse(port, user, event, question, words, reason)
            return
        with contextlib.suppress(Exception):
            await port.typing(event.where)
        try:
            data = await event.photo.fetch()
        except Exception:
            log.warning("could not download a photo", exc_info=True)
            words = say("download_failed", language)
            await self._refuse(port, user, event, question, words, "download failed")
            return

        async def store(handle: RequestHandle) -> ExchangeRecord:
            # The engine has decoded the photo by now: store it as it found it.
            info = handle.images[0]

            async def save() -> ExchangeRecord:
                photo = await self.store.add_photo(
                    data, image_format=info.format, width=info.width, height=info.height
                )
                return await self._start_exchange(user, event, question, photo.sha256)

            async with self._storing(event.who, asking):
                try:
                    return await save()
                except NotFound:
                    # Someone who sent the same picture had it forgotten between the two
                    # writes: it is stored again, for this user.
                    return await save()

        request = Request(key=self._key(event.who), question=question, images=(data,))
        await self._ask(port, user, event, request, language, store)

    async def _ask(
        self,
        port: ChatPort,
        user: UserRecord,
        event: PhotoQuestion | TextMessage,
        request: Request,
        language: Language,
        store: Callable[[RequestHandle], Awaitable[ExchangeRecord]],
    ) -> None:
        """Submit ``request``, record it with ``store`` once admitted, and stream the answer."""
        asked_at = time.monotonic()
        handle = await self._submit(request, language)
        if isinstance(handle, _Refusal):
            await self._refuse(port, user, event, request.question, handle.words, handle.reason)
            return
        try:
            exchange = await store(handle)
        except AlreadyAsked:
            # The same message came twice at once (a redelivery racing the first delivery):
            # the first one answers.
            handle.cancel()
            self._untrack(request.key, handle)
            return
        except (_Forgotten, NotFound) as gone:
            # Its sender had everything forgotten meanwhile, or (a follow-up) the one whose
            # conversation it continued did.
            handle.cancel()
            self._untrack(request.key, handle)
            words = say("cancelled" if isinstance(gone, _Forgotten) else "answer_gone", language)
            await port.send(event.where, words, reply_to=event.message_id)
            return
        except BaseException:
            handle.cancel()
            self._untrack(request.key, handle)
            raise
        await self._answer(
            handle, exchange, port, event.who, event.where, event.message_id, language, asked_at
        )

    # -- resuming what a previous process accepted ------------------------------------------

    async def resume(self, exchange: ExchangeRecord, port: ChatPort) -> None:
        """Answer a pending question that a process now gone accepted and never finished.

        Claim it first (`Store.claim_exchange`). It goes into the engine's queue like a new
        question of its user, and its answer streams into its chat as a reply to the original
        message, with rating buttons. When it cannot be asked again (its photo is gone, the
        engine refuses), it is marked failed and the user is told to send it again.
        Never raises, except when cancelled (the bot stopping: it stays pending).
        """
        try:
            await self._resume(exchange, port)
        except Exception:
            log.exception("could not resume exchange %s", exchange.id)
            with contextlib.suppress(Exception):
                now = await self.store.get_exchange(exchange.id)
                if now is not None and now.status is ExchangeStatus.PENDING:
                    await self.give_up(exchange, "resuming it failed", port)

    async def show_stored_answer(self, exchange: ExchangeRecord, port: ChatPort) -> None:
        """Show an answer that was stored and never shown (its process died between the
        two) as it was stored, with its rating buttons, replying to its question."""
        log.info("showing the answer to exchange %s, stored and never shown", exchange.id)
        user = await self.store.get_user(exchange.user_id)
        language = language_of(user.language if user else None, exchange.question)
        text = (exchange.answer or "").strip() or say("empty_answer", language)
        where = _place_of(exchange)
        reply = StreamingReply(port, where, self._pacer, reply_to=exchange.question_message_id)
        last_message_id = await reply.finish(text, buttons.answer_buttons(exchange.id))
        if last_message_id is None:  # the last part may not have arrived (`DeliveryUnknown`)
            log.warning("the answer to exchange %s may not have arrived", exchange.id)
            return
        await self.store.set_reply_message(exchange.id, last_message_id)

    async def give_up(self, exchange: ExchangeRecord, reason: str, port: ChatPort | None) -> None:
        """Mark a resumed question failed with ``reason`` and, where ``port`` reaches its chat,
        apologise that the answer was lost in a restart."""
        log.warning("exchange %s is not answered after a restart: %s", exchange.id, reason)
        await self.store.fail_exchange(exchange.id, error=f"lost in a restart: {reason}")
        if port is None:
            return
        user = await self.store.get_user(exchange.user_id)
        language = language_of(user.language if user else None, exchange.question)
        try:
            await port.send(
                _place_of(exchange),
                say("restart_lost_answer", language),
                reply_to=exchange.question_message_id,
            )
        except Exception:
            log.warning("could not apologise for exchange %s", exchange.id, exc_info=True)

    async def _resume(self, exchange: ExchangeRecord, port: ChatPort) -> None:
        user = await self.store.get_user(exchange.user_id)
        if user is None or user.banned:
            await self.give_up(exchange, "its user is gone or banned", None)
            return
        who = Person(exchange.platform, user.platform_user_id, user.display_name, user.language)
        language = language_of(user.language, exchange.question)
        request = await self._resumed_request(exchange, self._key(who))
        if request is None:
            await self.give_up(exchange, "its photo is gone", port)
            return
        handle = await self._submit(request, language)
        if isinstance(handle, _Refusal):
            await self.give_up(exchange, handle.reason, port)
            return
        log.info("answering exchange %s, left unanswered by a previous process", exchange.id)
        reply_to = exchange.question_message_id
        await self._answer(handle, exchange, port, who, _place_of(exchange), reply_to, language)

    async def _resumed_request(self, exchange: ExchangeRecord, key: str) -> Request | None:
        """The request as it was first asked: its stored photo, and for a follow-up the
        conversation before it; None when the photo is gone."""
        if exchange.photo_sha256 is None:
            return None
        photo = await self.store.get_photo(exchange.photo_sha256)
        if photo is None:
            return None
        try:
            data = await asyncio.to_thread(self.store.photo_file(photo).read_bytes)
        except OSError:
            return None
        history: list[Turn] = []
        if exchange.parent_id is not None:
            history = [
                Turn(turn.question, turn.answer)
                for turn in await self.store.conversation(exchange.parent_id)
                if turn.answer is not None
            ]
        return Request(key=key, question=exchange.question, images=(data,), history=tuple(history))

    async def _asked_before(self, event: PhotoQuestion | TextMessage) -> bool:
        """Whether this message was taken already. An edited message and an update the
        platform delivers again are not asked again: the answer, and the ratings people gave
        it, belong to what was first asked. To ask something else, send a new message."""
        if not await self.store.was_asked(
            event.who.platform, event.where.chat_id, event.message_id
        ):
            return False
        log.info("message %s in %s was asked already: ignored", event.message_id, event.where)
        return True

    async def _too_chatty(
        self, port: ChatPort, who: Person, where: Place, reply_to: str | None, language: Language
    ) -> bool:
        """True when the user has had `DialogConfig.replies_per_minute` replies that are not
        answers this minute: told once, then nothing, so a flood is not echoed back."""
        verdict = self._replies_rate.check(self._key(who))
        if verdict is Verdict.REFUSED:
            await port.send(where, say("slow_down", language), reply_to=reply_to)
        return verdict is not Verdict.ALLOWED

    async def _too_long(
        self,
        port: ChatPort,
        user: UserRecord,
        event: PhotoQuestion | TextMessage,
        question: str,
        language: Language,
    ) -> bool:
        """True (and the user told) when the question is over `MAX_QUESTION_LENGTH`."""
        if len(question) <= MAX_QUESTION_LENGTH:
            return False
        words = say("question_too_long", language, limit=MAX_QUESTION_LENGTH)
        reason = f"question of {len(question)} characters is over the limit"
        await self._refuse(port, user, event, question[:MAX_QUESTION_LENGTH], words, reason)
        return True

    async def _over_rate_limit(
        self,
        port: ChatPort,
        user: UserRecord,
        event: PhotoQuestion | TextMessage,
        question: str,
        language: Language,
    ) -> bool:
        """True when the user asks too fast; only the first refusal of a window is recorded
        and answered, so a flood is not echoed back message for message."""
        verdict = self._rate.check(self._key(event.who))
        if verdict is Verdict.REFUSED:
            await self._refuse(
                port, user, event, question, say("slow_down", language), "rate limited"
            )
        elif verdict is Verdict.REFUSED_AGAIN:
            log.debug("%s is still over the rate limit: ignored", self._key(event.who))
        return verdict is not Verdict.ALLOWED

    async def _start_exchange(
        self,
        user: UserRecord,
        event: PhotoQuestion | TextMessage,
        question: str,
        photo_sha256: str | None = None,
        parent_id: int | None = None,
    ) -> ExchangeRecord:
        return await self.store.start_exchange(
            user_id=user.id,
            platform=event.who.platform,
            chat_id=event.where.chat_id,
            question=question,
            question_message_id=event.message_id,
            photo_sha256=photo_sha256,
            parent_id=parent_id,
        )

    async def _submit(self, request: Request, language: Language) -> RequestHandle | _Refusal:
        """Hand the question to the engine; when it refuses, what to tell the user and why."""
        try:
            handle = await self.engine.submit(request)
        except BadImage as exc:
            words = say("bad_image", language, reason=image_reason(exc.reason, language))
            return _Refusal(words, f"bad image: {exc.reason}")
        except TooManyPending:
            return _Refusal(say("too_many_pending", language), "too many pending")
        except QueueFull:
            return _Refusal(say("busy", language), "queue full")
        except ModelNotReady:
            return _Refusal(say("model_not_ready", language), "model not ready")
        except EngineClosed:
            return _Refusal(say("unavailable", language), "engine not running")
        except ModelUnavailable:
            return _Refusal(say("model_unavailable", language), "model unavailable")
        except PromptTooLong:
            return _Refusal(say("prompt_too_long", language), "prompt too long")
        # From now on /cancel can reach it, even before it is stored.
        self._handles[request.key].add(handle)
        return handle

    def _untrack(self, key: str, handle: RequestHandle) -> None:
        handles = self._handles.get(key)
        if handles is not None:
            handles.discard(handle)
            if not handles:
                del self._handles[key]

    async def _refuse(
        self,
        port: ChatPort,
        user: UserRecord,
        event: PhotoQuestion | TextMessage,
        question: str,
        words: str,
        reason: str,
    ) -> None:
        """Record a question that will not be answered, with why, then tell the user."""
        try:
            exchange = await self._start_exchange(user, event, question)
        except AlreadyAsked:
            return  # told the first time it came
        await self.store.fail_exchange(exchange.id, error=reason, latency_ms=0)
        self.observer.not_answered("refused")
        await port.send(event.where, words, reply_to=event.message_id)

    async def _answer(
        self,
        handle: RequestHandle,
        exchange: ExchangeRecord,
        port: ChatPort,
        who: Person,
        where: Place,
        reply_to: str | None,
        language: Language,
        asked_at: float | None = None,
    ) -> None:
        """Stream the engine's answer into the chat and store how it ended. ``asked_at``
        (monotonic) is when the question was asked, for the observer's timings; by default
        now."""
        asked_at = time.monotonic() if asked_at is None else asked_at
        self._answering.add(exchange.id)
        try:
            # While an answer is pending, up to its final message, its chat keeps a call in
            # reserve for it, so typing and partial edits (made only from what is spare)
            # never delay the answer.
            with self._pacer.budget.reserve(port, where):
                await self._answer_into(
                    handle, exchange, port, who, where, reply_to, language, asked_at
                )
        finally:
            self._answering.discard(exchange.id)

    async def _answer_into(
        self,
        handle: RequestHandle,
        exchange: ExchangeRecord,
        port: ChatPort,
        who: Person,
        where: Place,
        reply_to: str | None,
        language: Language,
        asked_at: float,
    ) -> None:
        started = time.monotonic()
        key = self._key(who)
        reply = StreamingReply(port, where, self._pacer, reply_to=reply_to)
        typing = asyncio.create_task(self._keep_typing(port, where))
        first_text: list[float] = []  # when the first words came, for the observer
        try:
            answer = await self._stream(handle, reply, language, first_text)
        except EngineError as exc:
            await self._answer_failed(exc, exchange, reply, language, started)
            return
        except asyncio.CancelledError:
            # The bot is stopping: the question stays pending for the next start to answer.
            handle.cancel()
            await reply.abandon()
            raise
        except BaseException:
            handle.cancel()
            await reply.abandon()
            with contextlib.suppress(Exception):
                await self.store.fail_exchange(
                    exchange.id, error="interrupted", latency_ms=_ms_since(started)
                )
            raise
        finally:
            typing.cancel()
            self._untrack(key, handle)
        self.observer.answered(
            AnswerTiming(
                queued_s=answer.queued_s,
                first_text_s=first_text[0] - asked_at if first_text else None,
                total_s=time.monotonic() - asked_at,
                text=answer.text,
            )
        )
        text = answer.text.strip() or say("empty_answer", language)
        shown = _with_trim_note(text, handle.turns_left_out, language)
        # Stored before it is shown, so a button pressed the moment it appears finds it.
        try:
            stored = await self._store_answer(exchange.id, answer, _ms_since(started))
        except AlreadyAnswered:
            # Only a second handler of the same question gets here; its answer is shown
            # without buttons, as the first answer is the one rated.
            log.warning("exchange %s was answered already: this answer is not stored", exchange.id)
            await reply.finish(shown)
            return
        if not stored:
            latency = _ms_since(started)
            await self._show_before_storing(exchange.id, answer, latency, shown, reply, port, where)
            return
        try:
            last_message_id = await reply.finish(shown, buttons.answer_buttons(exchange.id))
        except Exception:
            # The platform would not take the answer: say so in the record rather than
            # let it look delivered.
            await self.store.fail_exchange(
                exchange.id,
                error="the answer could not be delivered",
                latency_ms=_ms_since(started),
            )
            raise
        if last_message_id is None:  # lost (`DeliveryUnknown`): an earlier part is not it
            return
        try:
            # Shielded: a stop now must not leave a delivered answer without its message id.
            await asyncio.shield(self.store.set_reply_message(exchange.id, last_message_id))
        except Exception as exc:
            if not store_unavailable(exc):
                raise
            # Only replies to the answer miss it (as follow-ups); the answer is stored.
            log.warning("could not note which message answers exchange %s: %s", exchange.id, exc)

    async def _store_answer(self, exchange_id: int, answer: Answer, latency_ms: int) -> bool:
        """Store a finished answer, trying again while the database is unavailable; False
        when it stayed unavailable through `DialogConfig.answer_write_retries_s`."""
        for pause in (*self.config.answer_write_retries_s, None):
            try:
                await self.store.finish_exchange(
                    exchange_id,
                    answer=answer.text,
                    model_version=answer.model,
                    latency_ms=latency_ms,
                )
            except Exception as exc:
                if not store_unavailable(exc):
                    raise
                log.warning("could not store the answer to exchange %s: %s", exchange_id, exc)
                if pause is None:
                    return False
                await asyncio.sleep(pause)
            else:
                return True
        return False  # not reached: the last pause is None

    async def _show_before_storing(
        self,
        exchange_id: int,
        answer: Answer,
        latency: int,
        text: str,
        reply: StreamingReply,
        port: ChatPort,
        where: Place,
    ) -> None:
        """The database is down: show the answer without buttons (nothing could record a
        press) and store it in the background; its buttons go on once it is stored."""
        log.error(
            "the database is unavailable: the answer to exchange %s is shown and stored later",
            exchange_id,
        )
        last_message_id = await reply.finish(text)

        async def add_buttons() -> None:
            # With the last message's id lost (`DeliveryUnknown`) the buttons stay off: on an
            # earlier part they would seem to rate half an answer.
            if last_message_id is not None:
                await port.set_buttons(where, last_message_id, buttons.answer_buttons(exchange_id))

        self.answer_writes.add(
            WaitingAnswer(
                exchange_id, answer.text, answer.model, latency, last_message_id, add_buttons
            )
        )

    async def _stream(
        self,
        handle: RequestHandle,
        reply: StreamingReply,
        language: Language,
        first_text: list[float],
    ) -> Answer:
        text = ""
        last_ahead: int | None = None
        async for event in handle:
            if isinstance(event, Queued) and event.ahead > 0 and event.ahead != last_ahead:
                last_ahead = event.ahead
                reply.status(say("queued", language, ahead=event.ahead))
            elif isinstance(event, TextDelta):
                if not first_text:
                    first_text.append(time.monotonic())
                text += event.text
                reply.stream(text)
            elif isinstance(event, Answer):
                return event
        raise EngineClosed("the request ended without an answer")

    async def _answer_failed(
        self,
        error: EngineError,
        exchange: ExchangeRecord,
        reply: StreamingReply,
        language: Language,
        started: float,
    ) -> None:
        outcome: Outcome
        if isinstance(error, Cancelled):
            words, reason, outcome = say("cancelled", language), "cancelled", "cancelled"
        elif isinstance(error, DeadlineExceeded):
            words, reason, outcome = say("timed_out", language), "timed out", "timed_out"
        elif isinstance(error, EngineClosed):
            words, reason, outcome = say("unavailable", language), "engine stopped", "unavailable"
        elif isinstance(error, ModelUnavailable):
            words, reason = say("model_unavailable", language), "model unavailable"
            outcome = "unavailable"
        else:
            log.error("the engine failed on exchange %s: %s", exchange.id, error)
            words, reason = say("engine_failed", language), f"engine error: {error}"
            outcome = "failed"
        self.observer.not_answered(outcome)
        with contextlib.suppress(NotFound):  # gone: its sender had it forgotten
            await self.store.fail_exchange(exchange.id, error=reason, latency_ms=_ms_since(started))
        await reply.finish(words)

    async def _keep_typing(self, port: ChatPort, where: Place) -> None:
        # Only from the chat's spare calls: the answer's own call is kept in reserve.
        budget = self._pacer.budget
        while True:
            if budget.spare(port, where):
                with contextlib.suppress(Exception):
                    await unpaced(port).typing(where)
            await asyncio.sleep(port.typing_interval_s)

    async def _not_a_photo(self, event: NotAPhoto, port: ChatPort) -> None:
        if not event.where.private and not event.addressed:
            return
        if await self._user(event.who) is None:
            return
        language = language_of(event.who.language)
        if await self._too_chatty(port, event.who, event.where, event.message_id, language):
            return
        words = say("not_a_photo", language, reason=image_reason(event.reason, language))
        await port.send(event.where, words, reply_to=event.message_id)

    # -- text: corrections and follow-ups -------------------------------------------------

    async def _text(self, event: TextMessage, port: ChatPort, asking: _Asking) -> None:
        text = visible_text(event.text)
        if not text:
            return
        corrected = await self._prompt_answered(event)
        if corrected is not None:
            exchange_id, author = corrected
            await self._store_correction(author, event, exchange_id, text, port)
            return
        parent = await self._followed_up(event)
        if parent is None:
            addressed = event.where.private or event.addressed
            if addressed and await self._user(event.who) is not None:
                language = language_of(event.who.language, text)
                if await self._too_chatty(port, event.who, event.where, event.message_id, language):
                    return
                hint = say("no_photo_hint", language)
                await port.send(event.where, hint, reply_to=event.message_id)
            return
        user = await self._user(event.who)
        if user is None:
            return
        await self._follow_up(event, text, parent, user, port, asking)

    async def _prompt_answered(self, event: TextMessage) -> tuple[int, UserRecord] | None:
        """The exchange this text corrects, and its author, when it answers a ✏️ prompt: a
        reply to the prompt, or (in a private chat) the next text soon after it."""
        platform, chat = event.who.platform, event.where.chat_id
        prompt_id = event.reply_to
        if prompt_id is None:
            if not event.where.private:
                return None
            latest = self._latest_prompt.pop((platform, chat, event.who.user_id), None)
            window = self.config.correction_window_s
            if latest is None or self._clock() - latest.asked_at > window:
                return None
            prompt_id = latest.message_id
        exchange_id = await self.store.take_correction_prompt(
            platform, chat, prompt_id, event.who.user_id
        )
        if exchange_id is None:
            return None
        self._latest_prompt.pop((platform, chat, event.who.user_id), None)
        user = await self._user(event.who)  # stored only now: most replies answer no prompt
        return None if user is None else (exchange_id, user)

    async def _followed_up(self, event: TextMessage) -> ExchangeRecord | None:
        """The answered exchange this text follows up, if any."""
        platform, chat = event.who.platform, event.where.chat_id
        if event.reply_to is not None:
            exchange = await self.store.find_exchange_by_reply(platform, chat, event.reply_to)
            if exchange is not None and exchange.answer is not None:
                return exchange
        if not event.where.private:
            return None
        user = await self.store.find_user(platform, event.who.user_id)
        if user is None:
            return None
        since = utcnow() - timedelta(seconds=self.config.follow_up_window_s)
        return await self.store.latest_exchange(user.id, platform, chat, since=since)

    async def _follow_up(
        self,
        event: TextMessage,
        question: str,
        parent: ExchangeRecord,
        user: UserRecord,
        port: ChatPort,
        asking: _Asking,
    ) -> None:
        if await self._asked_before(event):
            return
        language = language_of(event.who.language, question)
        if await self._over_rate_limit(port, user, event, question, language):
            return
        if await self._too_long(port, user, event, question, language):
            return
        history = [
            Turn(turn.question, turn.answer)
            for turn in await self.store.conversation(parent.id)
            if turn.answer is not None
        ]
        photo = await self.store.get_photo(parent.photo_sha256) if parent.photo_sha256 else None
        if photo is None:
            await port.send(event.where, say("answer_gone", language), reply_to=event.message_id)
            return
        data = await asyncio.to_thread(self.store.photo_file(photo).read_bytes)

        async def store(handle: RequestHandle) -> ExchangeRecord:
            async with self._storing(event.who, asking):
                return await self._start_exchange(user, event, question, photo.sha256, parent.id)

        request = Request(
            key=self._key(event.who), question=question, images=(data,), history=tuple(history)
        )
        await self._ask(port, user, event, request, language, store)

    # -- buttons --------------------------------------------------------------------------

    async def _press(self, press: ButtonPress, port: ChatPort) -> None:
        language = language_of(press.who.language)
        action = buttons.decode(press.data)
        if action is None:
            # Forged or from another bot: refused quietly, before anything is read or stored.
            log.info("unknown button data from %s", self._key(press.who))
            await port.acknowledge(press, say("unknown_button", language))
            return
        if self._feedback_rate.check(self._key(press.who)) is not Verdict.ALLOWED:
            # Every press must be answered (the platform shows a spinner otherwise), but
            # only to the presser, and nothing is stored.
            await port.acknowledge(press, say("slow_down", language))
            return
        user = await self._user(press.who)
        if user is None:
            await port.acknowledge(press, say("unknown_button", language))
            return
        match action:
            case buttons.Rate(exchange_id, value):
                await self._rate_answer(press, port, user, exchange_id, value, language)
            case buttons.Correct(exchange_id):
                await self._offer_correction(press, port, user, exchange_id, language)
            case buttons.ConfirmForget(owner) | buttons.KeepData(owner) if (
                owner != press.who.user_id
            ):
                await port.acknowledge(press, say("not_your_button", language))
            case buttons.ConfirmForget():
                report = await self._forget(press.who, user)
                words = (
                    say(
                        "forget_done",
                        language,
                        exchanges=report.exchanges,
                        ratings=report.ratings,
                        corrections=report.corrections,
                        photos=report.photos,
                    )
                    if report.exchanges or report.ratings or report.corrections
                    else say("forget_nothing", language)
                )
                await port.acknowledge(press, words)
                await port.edit(press.where, press.message_id, words)
            case buttons.KeepData():
                await port.acknowledge(press, say("forget_kept", language))
                await port.edit(press.where, press.message_id, say("forget_kept", language))

    async def _forget(self, who: Person, user: UserRecord) -> ForgetReport:
        """Stop the user's questions and delete what is stored about them. A question of
        theirs received before this stores nothing afterwards (see `_storing`)."""
        key = self._key(who)
        async with self._user_locks.hold(key):
            for asking in self._asking.get(key, ()):
                asking.forgotten = True
            self.cancel_pending(who)
            report = await self.store.forget(user.id)
        self._forget_prompts(who)
        return report

    async def _exchange_here(self, press: ButtonPress, exchange_id: int) -> ExchangeRecord | None:
        """The exchange a button names, if it belongs to the chat the button is in."""
        exchange = await self.store.get_exchange(exchange_id)
        if exchange is None or exchange.answer is None:
            return None
        if exchange.platform != press.who.platform or exchange.chat_id != press.where.chat_id:
            log.warning("button for exchange %s pressed outside its chat", exchange_id)
            return None
        return exchange

    async def _rate_answer(
        self,
        press: ButtonPress,
        port: ChatPort,
        user: UserRecord,
        exchange_id: int,
        value: int,
        language: Language,
    ) -> None:
        if await self._exchange_here(press, exchange_id) is None:
            await port.acknowledge(press, say("answer_gone", language))
            return
        try:
            await self.store.record_rating(exchange_id, user.id, value)
        except NotFound:
            await port.acknowledge(press, say("answer_gone", language))
            return
        self.observer.rated(value)
        if value > 0:
            await port.acknowledge(press, say("rated_up", language))
        else:
            # A 👎 comes with the offer to say what the dish really is.
            await self._ask_for_correction(press, port, user, exchange_id, language)
        with contextlib.suppress(Exception):
            await port.set_buttons(
                press.where, press.message_id, buttons.answer_buttons(exchange_id, chosen=value)
            )

    async def _offer_correction(
        self,
        press: ButtonPress,
        port: ChatPort,
        user: UserRecord,
        exchange_id: int,
        language: Language,
    ) -> None:
        if await self._exchange_here(press, exchange_id) is None:
            await port.acknowledge(press, say("answer_gone", language))
            return
        await self._ask_for_correction(press, port, user, exchange_id, language)

    async def _ask_for_correction(
        self,
        press: ButtonPress,
        port: ChatPort,
        user: UserRecord,
        exchange_id: int,
        language: Language,
    ) -> None:
        prompt_id = await port.ask_for_correction(
            press, exchange_id, say("ask_correction", language)
        )
        if prompt_id is None:
            return  # the platform's own form collects the text: what is typed next is not it
        platform, chat = press.who.platform, press.where.chat_id
        try:
            await self.store.remember_correction_prompt(
                exchange_id, user.id, platform, chat, prompt_id
            )
        except NotFound:
            return  # the answer was forgotten meanwhile: a reply is just a message now
        prompt = _CorrectionPrompt(prompt_id, press.who.user_id, self._clock())
        self._remember((platform, chat, press.who.user_id), prompt)

    def _remember(self, key: tuple[str, str, str], prompt: _CorrectionPrompt) -> None:
        """Keep ``prompt`` as the newest for ``key``; forget prompts past their window, and
        the oldest beyond `PENDING_PROMPTS`."""
        prompts = self._latest_prompt
        prompts[key] = prompt
        prompts.move_to_end(key)
        expired = prompt.asked_at - self.config.correction_window_s
        while len(prompts) > PENDING_PROMPTS or next(iter(prompts.values())).asked_at < expired:
            prompts.popitem(last=False)

    def _forget_prompts(self, who: Person) -> None:
        """Drop the user's remembered latest prompts (the store forgets its own)."""
        for key in [
            k
            for k, p in self._latest_prompt.items()
            if k[0] == who.platform and p.platform_user_id == who.user_id
        ]:
            del self._latest_prompt[key]

    async def _correction_submitted(self, event: CorrectionSubmitted, port: ChatPort) -> None:
        language = language_of(event.who.language)
        if self._feedback_rate.check(self._key(event.who)) is not Verdict.ALLOWED:
            # A form is answered only to its sender, so each one may be: no flood echoes.
            await port.send(event.where, say("slow_down", language))
            return
        user = await self._user(event.who)
        if user is None:
            return
        await self._store_correction(user, event, event.exchange_id, event.text, port)

    async def _store_correction(
        self,
        user: UserRecord,
        event: TextMessage | CorrectionSubmitted,
        exchange_id: int,
        text: str,
        port: ChatPort,
    ) -> None:
        who, where = event.who, event.where
        # A dish name is often in another language than the user's own: thank them in theirs.
        language = language_of(who.language)
        text = " ".join(visible_text(text).split())[:MAX_CORRECTION_LENGTH]
        if not text:
            await port.send(where, say("correction_empty", language))
            return
        exchange = await self.store.get_exchange(exchange_id)
        if (
            exchange is None
            or exchange.answer is None
            or (exchange.platform, exchange.chat_id) != (who.platform, where.chat_id)
        ):
            # Gone, or named by a forged form: either way there is no answer here to correct.
            await port.send(where, say("answer_gone", language))
            return
        try:
            await self.store.record_correction(exchange_id, user.id, text)
        except NotFound:
            await port.send(where, say("answer_gone", language))
            return
        self.observer.corrected()
        await port.send(where, say("correction_thanks", language, text=text))

    # -- commands -------------------------------------------------------------------------

    async def _command(self, command: Command, port: ChatPort) -> None:
        user = await self._user(command.who)
        if user is None:
            return
        language = language_of(command.who.language, command.argument)
        where, reply_to = command.where, command.message_id
        if await self._too_chatty(port, command.who, where, reply_to, language):
            return
        match command.name:
            case "start":
                await port.send(where, say("start", language), reply_to=reply_to)
            case "help":
                await port.send(where, say("help", language), reply_to=reply_to)
            case "cancel":
                count = self.cancel_pending(command.who)
                words = (
                    say("cancel_done", language, count=count)
                    if count
                    else say("cancel_none", language)
                )
                await port.send(where, words, reply_to=reply_to)
            case "forget" if command.who.is_chat:
                await port.send(where, say("forget_people_only", language), reply_to=reply_to)
            case "forget":
                await port.send(
                    where,
                    say("forget_confirm", language),
                    reply_to=reply_to,
                    buttons=buttons.forget_buttons(
                        command.who.user_id,
                        say("forget_yes", language),
                        say("forget_no", language),
                    ),
                )
            case _:
                if self._admin is not None and await self._admin(command, port, user, language):
                    return
                await port.send(where, say("unknown_command", language), reply_to=reply_to)

    def cancel_pending(self, who: Person) -> int:
        """Cancel every question of this user still waiting or being answered."""
        handles = list(self._handles.get(self._key(who), ()))
        for handle in handles:
            handle.cancel()
        return len(handles)


def _with_trim_note(text: str, turns_left_out: int, language: Language) -> str:
    """The answer as shown: with a note when the engine left out old turns to fit the
    model's context (the stored answer stays the model's own words)."""
    if turns_left_out == 0:
        return text
    if turns_left_out == 1:
        return f"{text}\n\n{say('turn_left_out', language)}"
    return f"{text}\n\n{say('turns_left_out', language, count=turns_left_out)}"


def _place_of(exchange: ExchangeRecord) -> Place:
    """The chat of a stored exchange. Whether it is private is not stored: Telegram's
    private chats are the users' own (positive) ids; elsewhere it does not matter for an
    answer, which goes to the chat either way."""
    private = exchange.platform == "telegram" and exchange.chat_id.isdigit()
    return Place(exchange.chat_id, private=private)


def _ms_since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
