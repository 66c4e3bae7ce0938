"""Load bench: `dishbot run` as a real process, its users played on Telegram and Discord.

Run by hand from the repository root: ``python bench/load.py`` (a few minutes on 2 cores);
``--quick`` is a smoke run (20 users x 2 photos) that tests/test_bench_load.py runs.

What runs: the bot is `dishbot run` (``python -m bot.cli run``) in its own process, configured
only by DISHBOT_* variables, with a real SQLite store in a temporary data directory. Its
Telegram adapter talks to the Telegram emulator (tests/telegram_emulator.py), its Discord
adapter to the Discord emulator (tests/discord_emulator.py), its engine (``backend =
"openai"``) to a simulated model server (tests/openai_server.py, `BatchingOpenAIServer`).
Emulators and model run here, in the bench process, which also plays the users; the bot's
CPU time and memory are read from /proc/<pid>.

Phases (each its own bot process, one data directory and database throughout):

1. throughput: an instant model (answers at once, no batch limit), every user sends photos
   one after another; the bot's CPU seconds per answered question give the questions a
   second one core of the bot sustains when the model is never the bottleneck.
2. load: a continuously batching model (``--capacity`` slots, prefill and per-token time);
   ``--photos`` rounds, in each every user sends one photo, reads the answer, sometimes
   asks a follow-up (a reply to the answer), and rates the answer 👍 or 👎; a few abusive
   users flood photos far over the rate limit, junk posing as photos and files that are not
   photos. The bot's RSS is read after each round: its growth from the 2nd round to the last
   is the soak figure.
3. kill: a wave of photos; once answers are streaming the bot is killed with SIGKILL; while
   it is down Telegram users send more photos and press rating buttons (Telegram keeps
   updates for a bot that is away; Discord does not replay a gateway a dead client missed,
   so Discord users send only while the bot is up); the bot is started again, and every
   question must end answered or apologised for.

How the emulators were checked not to be the bottleneck: the bench process's own CPU use
over each phase (it is one event loop: near 100% of a core would mean the emulators or the
users limit the bot) and its event-loop lag (a 50 ms ticker's overshoot) are printed with
the figures.

The last line is ``name=value`` pairs for scripts; the exit status is 1 when lost > 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import random
import resource
import signal
import sqlite3
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from PIL import Image, ImageDraw  # noqa: E402

from tests.discord_emulator import DiscordEmulator  # noqa: E402
from tests.openai_server import BatchingOpenAIServer  # noqa: E402
from tests.telegram_emulator import TelegramEmulator  # noqa: E402
from tests.telegram_emulator import User as TelegramUser  # noqa: E402

DEFINITIONS = """\
Definitions (every figure counts questions: photos, junk posing as photos, follow-ups):
  sent        questions users sent while the bot was up or (Telegram only) down
  answered    the user saw the final answer: a bot message replying to the question, with
              its rating buttons (👍 👎 ✏️)
  refused     the user was told no (a reply without buttons) and the exchange row records a
              refusal: rate limited, too many pending, queue full, bad image, too large, ...
              (by reason, from the exchanges' error column)
  dropped     no word and no row, from an abusive user already told to slow down: a flood
              past its first refusal is ignored on purpose
  accepted    every other question: the remaining exchange rows, and questions that got
              no word at all
  apologised  accepted, and the user was told it failed (timed out, engine error, ...)
  lost        accepted - answered - apologised: a pending row, a row answered in the
              database but never shown, or a question that got no word at all. Must be 0.
  twice       questions whose final answer came in two different messages
  latency     from the update reaching the platform to the call that showed the answer's
              buttons, normal users' answered questions
  bot CPU     user + system CPU seconds of the `dishbot run` process, /proc/<pid>/stat
  RSS         the process's resident memory, /proc/<pid>/status (VmRSS; peak: VmHWM)
"""

REFUSALS = {  # exchange error -> reason shown; `bot.core.dialog` writes these
    "rate limited": "rate limited",
    "too many pending": "too many pending",
    "queue full": "queue full (busy)",
    "engine not running": "engine not running",
    "download failed": "download failed",
}
REFUSAL_PREFIXES = {
    "bad image": "bad image",
    "photo of ": "photo too large",
    "question of ": "question too long",
}
ANSWER_MARK = BatchingOpenAIServer.ANSWER_MARK
STATUS_PREFIXES = ("⏳", "…")  # the queue position and the placeholder: not a final word
RATE_PREFIX = "dishbot:rate:"
READY_GUARD_S = 60.0  # how long `dishbot run` may take to start polling; a guard, not a figure
STOP_GUARD_S = 20.0
LAG_TICK_S = 0.05
THROUGHPUT_PHOTOS = 2  # per user, one after another, in the throughput phase
KILL_PRESSES = 10  # rating buttons pressed while the bot is down
LOST_EXAMPLES = 5  # lost questions named in the report


# -- options ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    users: int
    photos: int
    discord_share: float
    abusive: int
    flood: int
    follow_up_every: int
    capacity: int
    prefill_ms: float
    token_ms: float
    answer_tokens: int
    rate_limit: int
    answer_timeout_s: float
    settle_s: float
    spread_s: float
    phases: tuple[str, ...]
    seed: int
    keep: Path | None


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200, help="normal users")
    parser.add_argument("--photos", type=int, default=5, help="photos per user (= rounds)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 users x 2 photos")
    parser.add_argument("--discord-share", type=float, default=0.25, help="users on Discord")
    parser.add_argument("--abusive", type=int, default=4, help="users flooding")
    parser.add_argument("--flood", type=int, default=40, help="photos each abusive user sends")
    parser.add_argument("--follow-up-every", type=int, default=3, help="1 in N answers")
    parser.add_argument("--capacity", type=int, default=16, help="model's batch slots")
    parser.add_argument("--prefill-ms", type=float, default=150.0)
    parser.add_argument("--token-ms", type=float, default=40.0, help="per decode step")
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument(
        "--rate-limit", type=int, default=6, help="limits.questions_per_minute (6: default)"
    )
    parser.add_argument(
        "--answer-timeout", type=float, default=120.0, help="how long a user waits, s"
    )
    parser.add_argument(
        "--settle", type=float, default=30.0, help="at the end, wait while this changes, s"
    )
    parser.add_argument("--spread", type=float, default=5.0, help="a round's arrivals, s")
    kill = parser.add_mutually_exclusive_group()
    kill.add_argument("--no-kill", action="store_true", help="skip the kill-and-restart run")
    kill.add_argument("--kill-only", action="store_true", help="only the kill-and-restart run")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--keep", type=Path, help="keep the data directory and logs here")
    args = parser.parse_args(argv)
    if args.quick:
        args.users, args.photos, args.abusive, args.flood = 20, 2, 2, 15
        args.prefill_ms, args.token_ms, args.spread = 50.0, 10.0, 0.5
        args.settle = min(args.settle, 10.0)
    phases: tuple[str, ...] = ("throughput", "load", "kill")
    if args.no_kill:
        phases = ("throughput", "load")
    elif args.kill_only:
        phases = ("kill",)
    return Options(
        users=args.users,
        photos=args.photos,
        discord_share=args.discord_share,
        abusive=args.abusive,
        flood=args.flood,
        follow_up_every=args.follow_up_every,
        capacity=args.capacity,
        prefill_ms=args.prefill_ms,
        token_ms=args.token_ms,
        answer_tokens=args.answer_tokens,
        rate_limit=args.rate_limit,
        answer_timeout_s=args.answer_timeout,
        settle_s=args.settle,
        spread_s=args.spread,
        phases=phases,
        seed=args.seed,
        keep=args.keep,
    )


# -- what users see -----------------------------------------------------------------------

Key = tuple[str, str, str]  # platform, chat id, message id


@dataclass
class Question:
    """One message a user sent, and what the bot showed in reply to it."""

    key: Key
    phase: str
    kind: str  # "photo", "junk image", "follow-up", "not a photo"
    person: str
    abusive: bool
    sent_at: float
    while_down: bool = False
    texts: dict[str, str] = field(default_factory=dict)  # bot message id -> text now
    finals: dict[str, float] = field(default_factory=dict)  # message id with buttons -> when
    buttons: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (👍, 👎) data
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def answer_id(self) -> str | None:
        """The message that carries the rating buttons, once shown."""
        return next(iter(self.finals), None)

    @property
    def told(self) -> bool:
        """Whether a final word (not a status, not a partial answer) reached the user."""
        return bool(self.finals) or any(_final_word(text) for text in self.texts.values())

    @property
    def latency_s(self) -> float | None:
        return min(self.finals.values()) - self.sent_at if self.finals else None


def _final_word(text: str) -> bool:
    text = text.strip()
    return bool(text) and not text.startswith((*STATUS_PREFIXES, ANSWER_MARK))


class Tracker:
    """Every question users asked, fed by the emulators with every message the bot shows."""

    def __init__(self) -> None:
        self.questions: dict[Key, Question] = {}
        self._owners: dict[Key, Question] = {}  # a bot message -> the question it answers
        self.unattributed = 0  # bot messages answering no question (correction prompts...)
        self.phase = ""
        self.bot_down = False

    def asked(self, key: Key, kind: str, person: str, abusive: bool) -> Question:
        question = Question(
            key, self.phase, kind, person, abusive, time.monotonic(), while_down=self.bot_down
        )
        self.questions[key] = question
        return question

    def shown(
        self,
        platform: str,
        chat: str,
        message_id: str,
        reply_to: str | None,
        text: str,
        rate: tuple[str, str] | None,
    ) -> None:
        """The bot sent or edited ``message_id``; ``rate`` is its rating buttons' data."""
        key = (platform, chat, message_id)
        owner = self._owners.get(key)
        if owner is None and reply_to is not None:
            owner = self.questions.get((platform, chat, reply_to))
            if owner is not None:
                self._owners[key] = owner
        if owner is None:
            self.unattributed += 1
            return
        owner.texts[message_id] = text
        if rate is not None and message_id not in owner.finals:
            owner.finals[message_id] = time.monotonic()
            owner.buttons[message_id] = rate
        if owner.told:
            owner.settled.set()

    def of_phase(self, phase: str) -> list[Question]:
        return [q for q in self.questions.values() if q.phase == phase]


def _rate_pair(data: Sequence[str]) -> tuple[str, str] | None:
    rates = [d for d in data if d.startswith(RATE_PREFIX)]
    ups = [d for d in rates if d.endswith(":up")]
    downs = [d for d in rates if d.endswith(":down")]
    return (ups[0], downs[0]) if ups and downs else None


class TrackedTelegram(TelegramEmulator):
    """The Telegram emulator, telling the tracker about every message the bot shows."""

    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def _publish(self, message: dict[str, Any]) -> dict[str, Any]:
        published = super()._publish(message)
        self._tell(published)
        return published

    def _apply_edit(
        self, message: dict[str, Any], key: str | None, value: str | None, markup: Any
    ) -> dict[str, Any]:
        edited = super()._apply_edit(message, key, value, markup)
        self._tell(edited)
        return edited

    def _tell(self, message: Mapping[str, Any]) -> None:
        replied = message.get("reply_to_message")
        keyboard = (message.get("reply_markup") or {}).get("inline_keyboard", [])
        data = [b.get("callback_data", "") for row in keyboard for b in row]
        self.tracker.shown(
            "telegram",
            str(message["chat"]["id"]),
            str(message["message_id"]),
            None if replied is None else str(replied["message_id"]),
            message.get("text") or message.get("caption") or "",
            _rate_pair(data),
        )


class TrackedDiscord(DiscordEmulator):
    """The Discord emulator, telling the tracker about every message the bot shows."""

    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def _publish(self, message: dict[str, Any]) -> None:
        super()._publish(message)
        self._tell(message)

    def _edit(self, message: dict[str, Any], payload: Mapping[str, Any], files: Any) -> None:
        super()._edit(message, payload, files)
        self._tell(message)

    def _tell(self, message: Mapping[str, Any]) -> None:
        if message["author"]["id"] != self.bot_user["id"]:
            return
        reference = message.get("message_reference")
        data = [
            c.get("custom_id", "")
            for row in message.get("components", [])
            for c in row.get("components", [])
        ]
        self.tracker.shown(
            "discord",
            str(message["channel_id"]),
            str(message["id"]),
            None if reference is None else str(reference["message_id"]),
            message.get("content", ""),
            _rate_pair(data),
        )


# -- the users ----------------------------------------------------------------------------


class Photos:
    """Distinct photos the size Telegram sends (1280x960 JPEG), cheap to make many of.

    A few base images are drawn once; each photo is one of them with a unique JPEG comment
    segment, so every photo has its own bytes (its own row in the content-addressed store)
    and costs the bot a full decode.
    """

    def __init__(self, seed: int, bases: int = 8) -> None:
        rng = random.Random(seed)
        self._bases = [self._draw(rng) for _ in range(bases)]
        self._count = 0

    @staticmethod
    def _draw(rng: random.Random) -> bytes:
        image = Image.new("RGB", (1280, 960), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(40):
            x, y = rng.randrange(1200), rng.randrange(900)
            colour = tuple(rng.randrange(256) for _ in range(3))
            draw.ellipse((x, y, x + rng.randrange(40, 300), y + rng.randrange(40, 300)), colour)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()

    def next(self) -> bytes:
        self._count += 1
        base = self._bases[self._count % len(self._bases)]
        comment = f"dishbot load bench photo {self._count}".encode()
        segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
        return base[:2] + segment + base[2:]  # right after SOI


JUNK_IMAGE = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8  # a JPEG header, then nonsense
NOT_A_PHOTO = b"PK\x03\x04" + b"\0" * 512  # a zip file


class Person:
    """A user of one platform, in their private chat with the bot."""

    platform = ""

    def __init__(self, name: str, tracker: Tracker, abusive: bool = False) -> None:
        self.name = name
        self.tracker = tracker
        self.abusive = abusive
        self.asked_at: list[float] = []  # when this user's questions were sent

    async def pace(self, per_minute: int) -> None:
        """Wait until one more question keeps this user within ``per_minute``, with a margin
        for the time an update takes to reach the bot."""
        recent = [t for t in self.asked_at if t > time.monotonic() - 62.0]
        if len(recent) >= per_minute:
            await asyncio.sleep(recent[-per_minute] + 62.0 - time.monotonic())

    def ask(self, key: Key, kind: str) -> Question:
        self.asked_at.append(time.monotonic())
        return self.tracker.asked(key, kind, self.name, self.abusive)

    def send_photo(self, data: bytes, caption: str | None) -> Question:
        raise NotImplementedError

    def send_file(self, data: bytes, name: str, mime: str, kind: str) -> Question:
        raise NotImplementedError

    def follow_up(self, answered: Question, text: str) -> Question:
        raise NotImplementedError

    def rate(self, answered: Question, up: bool) -> None:
        raise NotImplementedError


class TelegramPerson(Person):
    platform = "telegram"

    def __init__(
        self, telegram: TrackedTelegram, user_id: int, tracker: Tracker, abusive: bool = False
    ) -> None:
        super().__init__(f"telegram:{user_id}", tracker, abusive)
        self.telegram = telegram
        self.user = TelegramUser(user_id, f"user{user_id}")
        self.chat = self.user.private_chat

    def _key(self, message: Mapping[str, Any]) -> Key:
        return ("telegram", str(self.chat.id), str(message["message_id"]))

    def send_photo(self, data: bytes, caption: str | None) -> Question:
        file_id = self.telegram.add_file(data)
        sent = self.telegram.send_photo_message(
            self.user, self.chat, [file_id], caption, sizes=[(1280, 960)]
        )
        return self.ask(self._key(sent["message"]), "photo")

    def send_file(self, data: bytes, name: str, mime: str, kind: str) -> Question:
        file_id = self.telegram.add_file(data, suffix=name.rpartition(".")[2])
        sent = self.telegram.send_document(self.user, self.chat, file_id, name, mime)
        return self.ask(self._key(sent["message"]), kind)

    def follow_up(self, answered: Question, text: str) -> Question:
        assert answered.answer_id is not None
        sent = self.telegram.send_text(
            self.user, self.chat, text, reply_to_message_id=int(answered.answer_id)
        )
        return self.ask(self._key(sent["message"]), "follow-up")

    def rate(self, answered: Question, up: bool) -> None:
        assert answered.answer_id is not None
        message = self.telegram.message(self.chat.id, int(answered.answer_id))
        up_data, down_data = answered.buttons[answered.answer_id]
        self.telegram.press_button(self.user, message, up_data if up else down_data)


class DiscordPerson(Person):
    platform = "discord"

    def __init__(
        self, discord: TrackedDiscord, index: int, tracker: Tracker, abusive: bool = False
    ) -> None:
        self.discord = discord
        self.user = discord.add_user(f"user{index}")
        self.channel = discord.add_dm_channel(self.user)
        super().__init__(f"discord:{self.user['id']}", tracker, abusive)

    def _key(self, message: Mapping[str, Any]) -> Key:
        return ("discord", str(self.channel), str(message["id"]))

    def send_photo(self, data: bytes, caption: str | None) -> Question:
        attachment = self.discord.add_file(data, "dish.jpg", "image/jpeg")
        sent = self.discord.send_message(self.channel, self.user, caption or "", [attachment])
        return self.ask(self._key(sent), "photo")

    def send_file(self, data: bytes, name: str, mime: str, kind: str) -> Question:
        attachment = self.discord.add_file(data, name, mime)
        sent = self.discord.send_message(self.channel, self.user, "", [attachment])
        return self.ask(self._key(sent), kind)

    def follow_up(self, answered: Question, text: str) -> Question:
        assert answered.answer_id is not None
        sent = self.discord.send_message(
            self.channel, self.user, text, reply_to=int(answered.answer_id)
        )
        return self.ask(self._key(sent), "follow-up")

    def rate(self, answered: Question, up: bool) -> None:
        assert answered.answer_id is not None
        up_data, down_data = answered.buttons[answered.answer_id]
        self.discord.press_button(int(answered.answer_id), up_data if up else down_data, self.user)


CAPTIONS = [None, None, "is this spicy?", "what is in it?", "这是什么菜？"]
FOLLOW_UPS = ["how do I make it?", "is it vegetarian?", "这道菜辣吗？", "what goes with it?"]


# -- the bot process ----------------------------------------------------------------------


class BotProcess:
    """`dishbot run` as an operator starts it, its log kept, its CPU and memory read."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, telegram: TelegramEmulator, discord: DiscordEmulator) -> None:
        polls = len(telegram.calls("getUpdates"))
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bot.cli",
                "run",
                env=self.env,
                cwd=self.log.parent,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + READY_GUARD_S
        while len(telegram.calls("getUpdates")) <= polls or not discord.connected:
            if self.process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dishbot run did not start; see {self.log}")
            await asyncio.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_s(self) -> float:
        """User + system CPU seconds the bot has used."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        utime, stime = int(fields[11]), int(fields[12])
        return (utime + stime) / os.sysconf("SC_CLK_TCK")

    def memory_mb(self) -> tuple[float, float]:
        """Resident memory now and at its peak, in MB."""
        status = Path(f"/proc/{self.pid}/status").read_text().splitlines()
        values = {line.split(":")[0]: line.split()[1] for line in status if line.startswith("Vm")}
        return int(values["VmRSS"]) / 1024, int(values["VmHWM"]) / 1024

    async def kill(self) -> None:
        """SIGKILL, as the OOM killer or a power cut would stop it."""
        assert self.process is not None
        self.process.kill()
        await self.process.wait()

    async def stop(self) -> bool:
        """SIGTERM; False when it had to be killed, not having stopped within the guard."""
        if self.process is None or self.process.returncode is not None:
            return True
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), STOP_GUARD_S)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            return False
        return True


def bot_environment(
    data_dir: Path,
    telegram: TelegramEmulator,
    discord: DiscordEmulator,
    model: BatchingOpenAIServer,
    options: Options,
) -> dict[str, str]:
    """`dishbot run`'s settings, as an operator sets them."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "DISHBOT_DATA_DIR": str(data_dir),
        "DISHBOT_TELEGRAM__TOKEN": telegram.token,
        "DISHBOT_TELEGRAM__BASE_URL": telegram.base_url,
        "DISHBOT_TELEGRAM__BASE_FILE_URL": telegram.base_file_url,
        "DISHBOT_DISCORD__TOKEN": discord.token,
        "DISHBOT_DISCORD__API_BASE": discord.api_base,
        "DISHBOT_DISCORD__GATEWAY_URL": discord.gateway_url,
        "DISHBOT_ENGINE__BACKEND": "openai",
        "DISHBOT_ENGINE__MODEL": model.models[0],
        "DISHBOT_ENGINE__OPENAI__BASE_URL": model.url,
        "DISHBOT_ENGINE__MAX_BATCH_SIZE": str(min(model.capacity, 64)),
        "DISHBOT_LIMITS__QUESTIONS_PER_MINUTE": str(options.rate_limit),
    }


# -- the bench process's own load ---------------------------------------------------------


class BenchLoad:
    """This process's CPU use and event-loop lag: high values would mean the emulators and
    the simulated users, not the bot, set the pace."""

    def __init__(self) -> None:
        self._lags: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._cpu0 = 0.0
        self._wall0 = 0.0

    def start(self) -> None:
        self._lags = []
        self._cpu0, self._wall0 = _own_cpu_s(), time.monotonic()
        self._task = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(LAG_TICK_S)
            self._lags.append(time.monotonic() - before - LAG_TICK_S)

    async def stop(self) -> tuple[float, float]:
        """This process's CPU use (share of one core) and its p99 event-loop lag (s)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        share = (_own_cpu_s() - self._cpu0) / max(time.monotonic() - self._wall0, 1e-9)
        return share, percentile(self._lags, 0.99)


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# -- counting -----------------------------------------------------------------------------


@dataclass
class Tally:
    """What became of one phase's questions, from the users' side and the database."""

    phase: str
    sent: int = 0
    answered: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    dropped: int = 0
    apologised: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)
    twice: int = 0
    not_photos: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    sent_while_down: int = 0
    lost_examples: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return self.answered + sum(self.apologised.values()) + sum(self.lost.values())

    @property
    def lost_count(self) -> int:
        return sum(self.lost.values())


@dataclass(frozen=True)
class Row:
    status: str
    error: str | None
    reply_message_id: str | None


def exchange_rows(database: Path) -> dict[Key, Row]:
    """Every exchange row, by the message that asked it."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        db.execute("PRAGMA busy_timeout = 5000")
        found = db.execute(
            "SELECT platform, chat_id, question_message_id, status, error, reply_message_id"
            " FROM exchanges"
        ).fetchall()
    return {(p, c, str(m)): Row(s, e, r) for p, c, m, s, e, r in found}


def ratings_stored(database: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        db.execute("PRAGMA busy_timeout = 5000")
        return int(db.execute("SELECT count(*) FROM ratings").fetchone()[0])


def refusal_reason(error: str | None) -> str | None:
    if error is None:
        return None
    if error in REFUSALS:
        return REFUSALS[error]
    for prefix, reason in REFUSAL_PREFIXES.items():
        if error.startswith(prefix):
            return reason
    return None


def tally(phase: str, questions: Sequence[Question], rows: Mapping[Key, Row]) -> Tally:
    result = Tally(phase)
    told_to_slow_down = {
        q.person
        for q in questions
        if q.told and q.key in rows and refusal_reason(rows[q.key].error) == "rate limited"
    }
    for question in questions:
        row = rows.get(question.key)
        if question.kind == "not a photo":
            result.not_photos["hinted" if question.told else "silent"] += 1
            continue
        result.sent += 1
        result.sent_while_down += question.while_down
        lost_before = result.lost_count
        _count(result, question, row, told_to_slow_down)
        if result.lost_count > lost_before and len(result.lost_examples) < LOST_EXAMPLES:
            who = "abusive " if question.abusive else ""
            result.lost_examples.append(
                f"{question.kind} from {who}{question.person}, message {question.key[2]}"
                f"{' (sent while down)' if question.while_down else ''}"
            )
    return result


def _count(result: Tally, question: Question, row: Row | None, flooded: set[str]) -> None:
    reason = refusal_reason(row.error) if row is not None and row.status == "failed" else None
    if question.finals:
        result.answered += 1
        result.twice += len(question.finals) > 1
        if not question.abusive and question.latency_s is not None:
            result.latencies.append(question.latency_s)
    elif reason is not None and question.told:
        result.refused[reason] += 1
    elif row is None and not question.told and question.abusive and question.person in flooded:
        result.dropped += 1
    elif question.told and (row is None or row.status == "failed"):
        result.apologised[(row.error if row else None) or "no record"] += 1
    elif row is None:
        # On Discord, a message the killed process had from the gateway is gone: a new
        # session is not sent what the dead one missed.
        result.lost[f"no word at all, no record ({question.key[0]})"] += 1
    elif row.status == "answered":
        shown = "no reply_message_id" if row.reply_message_id is None else "a reply_message_id"
        result.lost[f"answered in the database ({shown}), never shown"] += 1
    elif row.status == "pending":
        result.lost[f"still pending{', no word' if not question.told else ''}"] += 1
    else:
        result.lost[f"failed ({row.error}) without a word to the user"] += 1


# -- the phases -----------------------------------------------------------------------------


@dataclass
class Figures:
    """Everything printed at the end."""

    tallies: list[Tally] = field(default_factory=list)
    cpu_ms_per_question: float | None = None
    throughput_answered: int = 0
    throughput_wall_qps: float | None = None
    rss_by_round: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    bench_load: dict[str, tuple[float, float]] = field(default_factory=dict)
    ratings: dict[str, tuple[int, int]] = field(default_factory=dict)  # phase -> pressed, stored
    restart_s: float | None = None
    api_calls: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # tg, dc, wall
    notes: list[str] = field(default_factory=list)


class Bench:
    """The emulators, the model, the users and the bot, for all phases."""

    def __init__(self, options: Options, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.database = self.data_dir / "dishbot.db"
        self.tracker = Tracker()
        self.telegram = TrackedTelegram(self.tracker)
        self.discord = TrackedDiscord(self.tracker)
        self.rng = random.Random(options.seed)
        self.photos = Photos(options.seed)
        self.figures = Figures()
        self.load = BenchLoad()
        self.people: list[Person] = []
        self.abusers: list[Person] = []
        self.pressed = 0
        self.rated: set[Key] = set()  # each answer is rated once: a rating is per user
        self._bots = 0
        # From the kill until the restarted bot holds a gateway session: a Discord message
        # sent meanwhile reaches no bot (Discord gives a new session nothing a dead one
        # missed), so Discord users wait; `bot_down` ends earlier, when the restart begins.
        self._discord_unreachable = False
        self._calls_before = (0, 0)
        self._ratings_before = 0
        self._began = 0.0

    async def run(self) -> Figures:
        async with self.telegram, self.discord:
            self._make_people()
            for phase in self.options.phases:
                await getattr(self, f"phase_{phase}")()
        return self.figures

    def _make_people(self) -> None:
        options = self.options
        on_discord = round(options.users * options.discord_share)
        for index in range(options.users):
            if index < on_discord:
                self.people.append(DiscordPerson(self.discord, index, self.tracker))
            else:
                self.people.append(TelegramPerson(self.telegram, 10_000 + index, self.tracker))
        for index in range(options.abusive):
            if index % 2 and options.discord_share > 0:
                abuser: Person = DiscordPerson(self.discord, 90_000 + index, self.tracker, True)
            else:
                abuser = TelegramPerson(self.telegram, 90_000 + index, self.tracker, True)
            self.abusers.append(abuser)
        self.rng.shuffle(self.people)

    async def _start_bot(self, model: BatchingOpenAIServer) -> BotProcess:
        self._bots += 1
        env = bot_environment(self.data_dir, self.telegram, self.discord, model, self.options)
        bot = BotProcess(env, self.workdir / f"dishbot-{self._bots}.log")
        for person in self.people + self.abusers:
            person.asked_at.clear()  # a new process starts with a new rate limiter
        await bot.start(self.telegram, self.discord)
        return bot

    def _rate(self, person: Person, question: Question, up: bool) -> None:
        person.rate(question, up)
        self.pressed += 1
        self.rated.add(question.key)

    def _unrated_telegram_answers(self) -> list[Question]:
        return [
            q
            for q in self.tracker.questions.values()
            if q.finals and q.key[0] == "telegram" and q.key not in self.rated and not q.abusive
        ]

    def _ratings(self) -> tuple[int, int]:
        """Rating buttons pressed in this phase, and ratings stored in it."""
        return self.pressed, ratings_stored(self.database) - self._ratings_before

    async def _stop(self, bot: BotProcess) -> None:
        if not await bot.stop():
            self.figures.notes.append(
                f"{bot.log.name}: did not stop within {STOP_GUARD_S:g} s of SIGTERM; killed"
            )

    def _begin(self, phase: str) -> None:
        self.tracker.phase = phase
        self.pressed = 0
        print(f"[{time.strftime('%H:%M:%S')}] {phase} ...", flush=True)
        self._calls_before = (len(self.telegram.calls()), len(self.discord.calls()))
        self._ratings_before = ratings_stored(self.database) if self.database.exists() else 0
        self._began = time.monotonic()
        self.load.start()

    async def _end(self, phase: str) -> Tally:
        self.figures.bench_load[phase] = await self.load.stop()
        self.figures.api_calls[phase] = (
            len(self.telegram.calls()) - self._calls_before[0],
            len(self.discord.calls()) - self._calls_before[1],
            time.monotonic() - self._began,
        )
        result = tally(phase, self.tracker.of_phase(phase), exchange_rows(self.database))
        self.figures.tallies.append(result)
        return result

    # ---------------------------------------------------------------- 1. throughput

    async def phase_throughput(self) -> None:
        async with BatchingOpenAIServer.instant(self.options.answer_tokens) as model:
            bot = await self._start_bot(model)
            try:
                await self._warm_up(bot)
                self._begin("throughput")
                cpu0, wall0 = bot.cpu_s(), time.monotonic()
                per_user = min(self.options.photos, THROUGHPUT_PHOTOS)
                await asyncio.gather(*(self._ask_in_turn(p, per_user) for p in self.people))
                cpu, wall = bot.cpu_s() - cpu0, time.monotonic() - wall0
                result = await self._end("throughput")
            finally:
                await self._stop(bot)
        self.figures.throughput_answered = result.answered
        if result.answered:
            self.figures.cpu_ms_per_question = 1000 * cpu / result.answered
            self.figures.throughput_wall_qps = result.answered / wall

    async def _warm_up(self, bot: BotProcess) -> None:
        """A first question for each platform, so imports and connections are made before
        anything is measured."""
        self.tracker.phase = "warm-up"
        ones = [
            next(p for p in self.people if p.platform == name)
            for name in ("telegram", "discord")
            if any(p.platform == name for p in self.people)
        ]
        await asyncio.gather(*(self._ask_in_turn(person, 1) for person in ones))

    async def _ask_in_turn(self, person: Person, photos: int) -> None:
        for _ in range(photos):
            await person.pace(self.options.rate_limit)
            question = person.send_photo(self.photos.next(), None)
            await self._wait(question)

    async def _wait(self, question: Question) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(question.settled.wait(), self.options.answer_timeout_s)
        return question.settled.is_set()

    # ---------------------------------------------------------------- 2. load and soak

    def _batching_model(self) -> BatchingOpenAIServer:
        options = self.options
        return BatchingOpenAIServer(
            capacity=options.capacity,
            prefill_s=options.prefill_ms / 1000,
            token_s=options.token_ms / 1000,
            answer_tokens=options.answer_tokens,
        )

    async def phase_load(self) -> None:
        options = self.options
        async with self._batching_model() as model:
            bot = await self._start_bot(model)
            try:
                self._begin("load")
                flooding = [asyncio.create_task(self._flood(a)) for a in self.abusers]
                for number in range(1, options.photos + 1):
                    await asyncio.gather(*(self._one_round(p) for p in self.people))
                    self.figures.rss_by_round.append(bot.memory_mb()[0])
                    print(
                        f"  [{time.strftime('%H:%M:%S')}] round {number}: "
                        f"RSS {self.figures.rss_by_round[-1]:.0f} MB",
                        flush=True,
                    )
                await asyncio.gather(*flooding)
                await self._settle(self.tracker.of_phase("load"))
                self.figures.peak_rss_mb = max(self.figures.peak_rss_mb, bot.memory_mb()[1])
                await self._end("load")
                self.figures.ratings["load"] = self._ratings()
            finally:
                await self._stop(bot)

    async def _one_round(self, person: Person) -> None:
        await asyncio.sleep(self.rng.uniform(0, self.options.spread_s))  # not all at once
        await person.pace(self.options.rate_limit)
        question = person.send_photo(self.photos.next(), self.rng.choice(CAPTIONS))
        if not await self._wait(question) or not question.finals:
            return
        if self.rng.randrange(self.options.follow_up_every) == 0:
            await asyncio.sleep(self.rng.uniform(0.1, 1.0))
            await person.pace(self.options.rate_limit)
            await self._wait(person.follow_up(question, self.rng.choice(FOLLOW_UPS)))
        await asyncio.sleep(self.rng.uniform(0.1, 0.5))
        self._rate(person, question, up=self.rng.random() < 0.7)

    async def _flood(self, abuser: Person) -> None:
        """Photos far over the rate limit, junk posing as photos, files that are not."""
        for index in range(self.options.flood):
            if index % 8 == 0:
                abuser.send_file(JUNK_IMAGE, "dish.jpg", "image/jpeg", "junk image")
            elif index % 8 == 1:
                abuser.send_file(NOT_A_PHOTO, "menu.zip", "application/zip", "not a photo")
            else:
                abuser.send_photo(self.photos.next(), None)
            await asyncio.sleep(0.05)

    async def _settle(self, questions: Sequence[Question]) -> None:
        """Wait until nothing is left to come: every question from a normal user has a word,
        no exchange row is pending and every answer stored was shown; or until nothing has
        changed for `settle_s` (what is still missing then is counted as lost). A rating
        pressed is waited for too."""
        progress, changed = None, time.monotonic()
        while True:
            waiting = self._still_waiting(questions)
            now = time.monotonic()
            if not any(waiting):
                return
            if waiting != progress:
                progress, changed = waiting, now
            elif now - changed > self.options.settle_s:
                print(f"  after {self.options.settle_s:g} s without change: {waiting}")
                return
            await asyncio.sleep(0.5)

    def _still_waiting(self, questions: Sequence[Question]) -> tuple[int, int, int, int]:
        """Normal users' questions without a word, pending rows, stored answers not shown,
        button presses not yet stored."""
        rows = exchange_rows(self.database)
        unanswered = sum(
            not q.settled.is_set() and not q.abusive and q.kind != "not a photo" for q in questions
        )
        pending = unshown = 0
        for question in questions:
            row = rows.get(question.key)
            pending += row is not None and row.status == "pending"
            unshown += row is not None and row.status == "answered" and not question.finals
        unrated = self._ratings_before + self.pressed - ratings_stored(self.database)
        return unanswered, pending, unshown, max(0, unrated)

    # ---------------------------------------------------------------- 3. kill and restart

    async def phase_kill(self) -> None:
        async with self._batching_model() as model:
            bot = await self._start_bot(model)
            await self._kill_run(model, bot)

    async def _kill_run(self, model: BatchingOpenAIServer, bot: BotProcess) -> None:
        """A wave of photos; SIGKILL once answers stream; more photos and button presses
        while the bot is down; start it again; count."""
        self._begin("kill")
        unrated = self._unrated_telegram_answers()
        if len(unrated) < KILL_PRESSES:  # answers whose buttons to press while down
            first = [p for p in self.people if p.platform == "telegram"][:KILL_PRESSES]
            await asyncio.gather(*(self._ask_in_turn(person, 1) for person in first))
            unrated = self._unrated_telegram_answers()
        wave = self.people[: max(4, len(self.people) // 2)]
        asking = [asyncio.create_task(self._wave_photo(p)) for p in wave]
        try:
            await self._until(lambda: model.answered >= 1 and model.in_flight >= 2, 60.0)
        except TimeoutError:
            self.figures.notes.append("kill: no answers were streaming; killed anyway")
        self.tracker.bot_down = True  # from the moment the signal is sent
        self._discord_unreachable = True
        await bot.kill()
        down = [p for p in self.people if p.platform == "telegram"][: max(2, len(wave) // 4)]
        for person in down:
            person.send_photo(self.photos.next(), "sent while the bot was down")
        for question in unrated[-KILL_PRESSES:]:
            person = next(p for p in self.people if p.name == question.person)
            self._rate(person, question, up=True)
        await asyncio.sleep(1.0)
        self.tracker.bot_down = False
        started = time.monotonic()
        restarted = await self._start_bot(model)  # polling, and connected to Discord
        self._discord_unreachable = False
        self.figures.restart_s = time.monotonic() - started
        try:
            await asyncio.gather(*asking)
            await self._settle(self.tracker.of_phase("kill"))
            self.figures.peak_rss_mb = max(self.figures.peak_rss_mb, restarted.memory_mb()[1])
            result = await self._end("kill")
            self.figures.ratings["kill"] = self._ratings()
        finally:
            await self._stop(restarted)
        if result.lost_count and not (REPO / "bot" / "core" / "recovery.py").exists():
            self.figures.notes.append(
                "kill: bot/core/recovery.py is absent: a restarted bot does not yet answer or "
                "apologise for what the killed one accepted"
            )

    async def _wave_photo(self, person: Person) -> None:
        """One photo, not waited for: what becomes of it is counted once all is settled."""
        await asyncio.sleep(self.rng.uniform(0, 2.0))
        if self._discord_unreachable and person.platform == "discord":
            return  # Discord does not replay to a new session what a dead client missed
        person.send_photo(self.photos.next(), None)

    @staticmethod
    async def _until(condition: Callable[[], bool], guard_s: float) -> None:
        async def poll() -> None:
            while not condition():  # noqa: ASYNC110 - the model server's counters have no event
                await asyncio.sleep(0.02)

        await asyncio.wait_for(poll(), guard_s)


# -- the report ---------------------------------------------------------------------------


def report(figures: Figures, options: Options) -> int:
    """Print the figures as tables, then the last line; the total lost."""
    print()
    header = f"{'phase':<11}{'sent':>7}{'refused':>9}{'dropped':>9}{'accepted':>10}"
    header += f"{'answered':>10}{'apologised':>12}{'lost':>6}{'twice':>7}"
    print(header)
    for t in figures.tallies:
        print(
            f"{t.phase:<11}{t.sent:>7}{sum(t.refused.values()):>9}{t.dropped:>9}"
            f"{t.accepted:>10}{t.answered:>10}{sum(t.apologised.values()):>12}"
            f"{t.lost_count:>6}{t.twice:>7}"
        )
    for t in figures.tallies:
        for title, counts in (
            ("refused", t.refused),
            ("apologised", t.apologised),
            ("LOST", t.lost),
            ("not a photo", t.not_photos),
        ):
            if counts:
                listed = ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())
                print(f"  {t.phase} {title}: {listed}")
        for example in t.lost_examples:
            print(f"    lost: {example}")
        if t.sent_while_down:
            print(f"  {t.phase}: {t.sent_while_down} sent while the bot was down")
    for phase, (pressed, stored) in figures.ratings.items():
        print(f"  {phase} ratings: {pressed} buttons pressed, {stored} ratings stored")
    print()
    _print_figures(figures)
    for note in figures.notes:
        print(f"note: {note}")
    return sum(t.lost_count for t in figures.tallies)


def _print_figures(figures: Figures) -> None:
    load = next((t for t in figures.tallies if t.phase == "load"), None)
    rows: list[tuple[str, str]] = []
    if load is not None and load.latencies:
        rows.append(("update to final answer, p50", f"{percentile(load.latencies, 0.5):.2f} s"))
        rows.append(("update to final answer, p95", f"{percentile(load.latencies, 0.95):.2f} s"))
    if figures.cpu_ms_per_question is not None:
        per_core = 1000 / figures.cpu_ms_per_question
        rows.append(
            ("bot CPU per question (instant model)", f"{figures.cpu_ms_per_question:.1f} ms")
        )
        rows.append(("questions/s one bot core sustains", f"{per_core:.0f}"))
        rows.append(("questions/s seen (wall clock)", f"{figures.throughput_wall_qps:.1f}"))
    if figures.peak_rss_mb:
        rows.append(("bot peak RSS", f"{figures.peak_rss_mb:.0f} MB"))
    if len(figures.rss_by_round) >= 2:
        shown = " ".join(f"{mb:.0f}" for mb in figures.rss_by_round)
        rows.append(("bot RSS after each round", f"{shown} MB"))
    growth = rss_growth(figures.rss_by_round)
    if growth is not None:
        rows.append(("RSS growth, round 2 to last", f"{growth:+.1f} MB"))
    if figures.restart_s is not None:
        rows.append(("restart after SIGKILL, to polling", f"{figures.restart_s:.1f} s"))
    for phase, (telegram, discord, wall) in figures.api_calls.items():
        rows.append(
            (
                f"platform API calls ({phase})",
                f"Telegram {telegram} ({telegram / wall:.1f}/s), "
                f"Discord {discord} ({discord / wall:.1f}/s) over {wall:.0f} s",
            )
        )
    for phase, (share, lag) in figures.bench_load.items():
        own = f"{share:.0%} of a core, loop lag p99 {lag * 1000:.0f} ms"
        rows.append((f"bench process ({phase})", own))
    width = max(len(name) for name, _ in rows) if rows else 0
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def rss_growth(by_round: Sequence[float]) -> float | None:
    return by_round[-1] - by_round[1] if len(by_round) >= 3 else None


def last_line(figures: Figures, lost: int) -> str:
    pairs: dict[str, Any] = {"lost": lost}
    for t in figures.tallies:
        pairs[f"{t.phase}_accepted"] = t.accepted
        pairs[f"{t.phase}_answered"] = t.answered
        pairs[f"{t.phase}_lost"] = t.lost_count
        pairs[f"{t.phase}_twice"] = t.twice
    load = next((t for t in figures.tallies if t.phase == "load"), None)
    if load is not None and load.latencies:
        pairs["p50_s"] = f"{percentile(load.latencies, 0.5):.2f}"
        pairs["p95_s"] = f"{percentile(load.latencies, 0.95):.2f}"
        pairs["refused"] = sum(load.refused.values())
    if figures.cpu_ms_per_question is not None:
        pairs["bot_cpu_ms_per_question"] = f"{figures.cpu_ms_per_question:.1f}"
        pairs["questions_per_s_per_core"] = f"{1000 / figures.cpu_ms_per_question:.0f}"
    if figures.peak_rss_mb:
        pairs["peak_rss_mb"] = f"{figures.peak_rss_mb:.0f}"
    growth = rss_growth(figures.rss_by_round)
    if growth is not None:
        pairs["rss_growth_mb"] = f"{growth:.1f}"
    return " ".join(f"{name}={value}" for name, value in pairs.items())


async def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    print(DEFINITIONS)
    print(
        f"users={options.users} (Discord {options.discord_share:.0%}) photos={options.photos} "
        f"abusive={options.abusive}x{options.flood} model: {options.capacity} slots, "
        f"prefill {options.prefill_ms:g} ms, {options.token_ms:g} ms/token, "
        f"{options.answer_tokens} tokens; rate limit {options.rate_limit}/min; "
        f"phases: {', '.join(options.phases)}",
        flush=True,
    )
    with contextlib.ExitStack() as cleanup:
        if options.keep is not None:
            options.keep.mkdir(parents=True, exist_ok=True)
            workdir = options.keep
        else:
            workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="load-")))
        figures = await Bench(options, workdir).run()
        lost = report(figures, options)
        errors = _logged_errors(workdir)
        if errors:
            print(f"the bot logged {errors} ERROR line(s); --keep DIR keeps the logs")
    print(last_line(figures, lost))
    return 1 if lost else 0


def _logged_errors(workdir: Path) -> int:
    return sum(
        line.count(" ERROR ")
        for log in workdir.glob("dishbot-*.log")
        for line in log.read_text(errors="replace").splitlines()
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
