"""Training export at scale: 100,000 exchanges exported, time and peak memory.

Run by hand from the repository root: ``python bench/export_dataset.py [--exchanges N]``
(about a minute on a small machine, most of it building the database).

It builds an SQLite database with a realistic mix, written in bulk rather than through the
Store so that building it does not take longer than the thing measured:

* ``N`` exchanges about ``0.4 N`` photos (64x48 JPEGs, each file unique): every photo gets
  a first question; a third of them a follow-up, and a few more a second person asking the
  same question (duplicates) or a three-turn conversation;
* 2,000 users, a handful trusted and one admin; ratings on most answers (mostly 👍, some
  👎), a correction from the admin on 3% of answers, from one or two ordinary users on 6%.

Then, in a fresh Python process, `export_dataset` writes the export next to it, and the
process reports the wall time and its peak resident set size (VmHWM, which sees what
SQLite, the JSON encoder and Python allocate alike). The peak after imports alone is
printed too, so the export's own share is visible. The last line is ``name=value`` pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from PIL import Image
from sqlalchemy import insert

ADMIN = "telegram:1"
USERS = 2000
SEED = 6


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 80, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


async def build_database(data_dir: Path, exchanges: int) -> dict[str, int]:
    """Fill ``data_dir`` with a database of ``exchanges`` exchanges and their photo files."""
    from bot.store import Store
    from bot.store.models import Correction, Exchange, ExchangeStatus, Photo, Rating, User
    from bot.store.photos import PhotoFiles, sha256_hex
    from bot.store.schema import upgrade

    rng = random.Random(SEED)
    store = Store.open(f"sqlite+aiosqlite:///{data_dir / 'dishbot.db'}", data_dir)
    await upgrade(store.engine)
    files = PhotoFiles(data_dir)
    base = _jpeg()
    start = datetime(2025, 1, 1, tzinfo=UTC)
    users = [
        {
            "id": n,
            "platform": "telegram",
            "platform_user_id": str(n),
            "trust": 1 if n % 400 == 0 else 0,
            "banned": n % 997 == 0,
            "created_at": start,
            "updated_at": start,
        }
        for n in range(1, USERS + 1)
    ]
    photos: list[dict[str, object]] = []
    rows: list[dict[str, object]] = []
    ratings: list[dict[str, object]] = []
    corrections: list[dict[str, object]] = []
    dishes = ["肠粉", "叉烧", "烧鹅", "虾饺", "云吞面", "mapo tofu", "char siu bao", "egg tart"]

    def add_exchange(photo: str, user: int, question: str, parent: int | None) -> int:
        exchange_id = len(rows) + 1
        at = start + timedelta(minutes=exchange_id)
        dish = rng.choice(dishes)
        rows.append(
            {
                "id": exchange_id,
                "user_id": user,
                "platform": "telegram",
                "chat_id": str(user),
                "question_message_id": str(exchange_id),
                "photo_sha256": photo,
                "parent_id": parent,
                "question": question,
                "answer": f"这是{dish}。{dish}是一道常见的粤菜，"
                + "口感细腻，" * rng.randint(1, 12),
                "model_version": rng.choice(["internvl2-2b", "internvl2-2b-ft1"]),
                "status": ExchangeStatus.ANSWERED,
                "created_at": at,
                "finished_at": at,
            }
        )
        roll = rng.random()
        if roll < 0.60:
            ratings.append(_rating(exchange_id, user, 1, at))
        elif roll < 0.70:
            ratings.append(_rating(exchange_id, user, -1, at))
        elif roll < 0.73:
            corrections.append(_correction(exchange_id, 1, rng.choice(dishes), at))
        elif roll < 0.79:
            for corrector in rng.sample(range(2, USERS + 1), rng.choice((1, 2))):
                corrections.append(_correction(exchange_id, corrector, "肠粉", at))
        if rng.random() < 0.2:  # somebody else agrees or disagrees
            other = rng.randint(2, USERS)
            if other != user:
                ratings.append(_rating(exchange_id, other, rng.choice((1, 1, -1)), at))
        return exchange_id

    n = 0
    while len(rows) < exchanges:
        data = base + n.to_bytes(4, "big")  # bytes after the JPEG's end: unique, still valid
        sha = sha256_hex(data)
        relative = files.relative_path(sha, "JPEG")
        target = files.absolute(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        photos.append(
            {
                "sha256": sha,
                "path": relative,
                "width": 64,
                "height": 48,
                "format": "JPEG",
                "bytes": len(data),
                "created_at": start,
            }
        )
        asker = rng.randint(2, USERS)
        first = add_exchange(sha, asker, "这是什么菜？", None)
        roll = rng.random()
        if roll < 0.33:
            add_exchange(sha, asker, "辣吗？", first)
        elif roll < 0.38:
            second = add_exchange(sha, asker, "怎么做的？", first)
            add_exchange(sha, asker, "在哪里能吃到？", second)
        elif roll < 0.45:
            add_exchange(sha, rng.randint(2, USERS), "这是什么菜?", None)  # a duplicate
        n += 1
    del rows[exchanges:]
    kept = {row["id"] for row in rows}
    ratings = _unique([r for r in ratings if r["exchange_id"] in kept])
    corrections = _unique([c for c in corrections if c["exchange_id"] in kept])
    async with store.engine.begin() as connection:
        for model, batch in (
            (User, users),
            (Photo, photos),
            (Exchange, rows),
            (Rating, ratings),
            (Correction, corrections),
        ):
            for offset in range(0, len(batch), 5000):
                await connection.execute(insert(model), batch[offset : offset + 5000])
    await store.close()
    return {
        "photos": len(photos),
        "exchanges": len(rows),
        "ratings": len(ratings),
        "corrections": len(corrections),
    }


def _rating(exchange_id: int, user: int, value: int, at: datetime) -> dict[str, object]:
    return {
        "exchange_id": exchange_id,
        "user_id": user,
        "value": value,
        "created_at": at,
        "rated_at": at,
    }


def _correction(exchange_id: int, user: int, text: str, at: datetime) -> dict[str, object]:
    return {
        "exchange_id": exchange_id,
        "user_id": user,
        "text": text,
        "status": "new",
        "created_at": at,
        "updated_at": at,
    }


def _unique(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    seen: set[tuple[object, object]] = set()
    kept = []
    for row in rows:
        key = (row["exchange_id"], row["user_id"])
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB.

    Linux's VmHWM, which starts afresh at exec; ``ru_maxrss`` would also count the parent's
    memory at fork, carried across exec, and the parent held the whole database build.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _export(data_dir: Path, out_dir: Path) -> dict[str, float]:
    from bot.settings import Settings
    from bot.store import Store
    from bot.training import ExportOptions, export_dataset

    baseline = peak_rss_mb()
    settings = Settings(data_dir=data_dir, admins=[ADMIN])
    store = Store.open(settings.db_url, data_dir)
    started = time.perf_counter()
    summary = await export_dataset(store, settings, out_dir, ExportOptions())
    seconds = time.perf_counter() - started
    await store.close()
    return {
        "seconds": seconds,
        "peak_mb": peak_rss_mb(),
        "baseline_mb": baseline,
        "samples": summary.samples,
        "answers": summary.answers_considered,
        "photos": summary.photos,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=100_000)
    parser.add_argument("--child", nargs=2, metavar=("DATA_DIR", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = asyncio.run(_export(Path(args.child[0]), Path(args.child[1])))
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="dishbot-export-bench-") as folder:
        data_dir = Path(folder) / "data"
        started = time.perf_counter()
        built = asyncio.run(build_database(data_dir, args.exchanges))
        print(
            f"built {built['exchanges']:,} exchanges, {built['photos']:,} photos, "
            f"{built['ratings']:,} ratings, {built['corrections']:,} corrections "
            f"in {time.perf_counter() - started:.1f} s"
        )
        child = subprocess.run(
            [sys.executable, __file__, "--child", str(data_dir), str(Path(folder) / "export")],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(child.stdout.strip().splitlines()[-1])
    print(
        f"{'exchanges':>10} {'answers':>8} {'samples':>8} {'photos':>7} {'time':>8} "
        f"{'peak RSS':>9} {'baseline':>9}"
    )
    print(
        f"{built['exchanges']:>10,} {result['answers']:>8,} {result['samples']:>8,} "
        f"{result['photos']:>7,} {result['seconds']:>7.1f}s {result['peak_mb']:>7.0f}MB "
        f"{result['baseline_mb']:>7.0f}MB"
    )
    print(
        f"exchanges={built['exchanges']} samples={result['samples']} "
        f"seconds={result['seconds']:.2f} peak_mb={result['peak_mb']:.0f} "
        f"baseline_mb={result['baseline_mb']:.0f}"
    )


if __name__ == "__main__":
    main()
