"""Hostile photos: how long a progressive-JPEG scan bomb holds a decoder, guarded and not,
and how long another user waits for an answer while an attacker keeps sending bombs.

Run by hand from the repository root: ``python bench/hostile_images.py`` (about a minute).

The bomb is a 4096×4096 progressive JPEG followed by thousands of copies of a 26-byte DC
refinement scan (``tests/factories.py`` builds the same for the tests): libjpeg walks every
block of the image for each scan, 1 to 3.5 ms a scan on the machines it was run on.

1. Decoding the bomb. Unguarded: Pillow decodes a 2,000-scan bomb directly (it cannot be
   stopped, so the 20,000-scan figure is scaled from it, scans being equal work). Guarded:
   ``decode_image`` on the 20,000-scan bomb, refused from its markers; then with the scan
   and segment limits lifted, so only the time budget (1 s here) stops it.
2. Another user's latency (submit to answer) through a real `Engine` with an instant
   backend, while an attacker keeps three bombs in flight for a few seconds: with no attack,
   with the guards, and with the scan and segment limits lifted (the time budget and the
   per-user decode turn left). Unguarded, before this guard, both decode slots were held for
   a bomb's whole decode (item 1), and so was everyone else's photo.
"""

from __future__ import annotations

import asyncio
import functools
import io
import statistics
import struct
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from PIL import Image

import engine.engine as engine_module
from engine import images
from engine.engine import Engine, EngineConfig, Request
from engine.errors import BadImage
from engine.images import decode_image
from engine.types import BackendEvent, GenerationJob, JobFinished, ModelSpec

SIZE = (4096, 4096)
SCANS = 20_000
UNGUARDED_SCANS = 2_000
BUDGET_S = 1.0
ATTACK_S = 6.0


def scan_bomb(scans: int) -> bytes:
    """A valid progressive JPEG of `SIZE` followed by ``scans`` copies of a 26-byte scan."""
    buffer = io.BytesIO()
    Image.new("RGB", SIZE, (200, 80, 40)).save(buffer, format="JPEG", progressive=True)
    data = buffer.getvalue()
    position, refinement = 2, b""
    while not refinement:  # the first DC refinement scan: Ss = Se = 0, Ah > 0
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        segment = data[position : position + 2 + length]
        position += 2 + length
        if segment[1] == 0xDA:
            if segment[-3:-1] == b"\0\0" and segment[-1] >> 4:
                refinement = segment
            while data[(position := data.index(b"\xff", position)) + 1] in (0, *range(0xD0, 0xD8)):
                position += 2
    end_of_image = data.rindex(b"\xff\xd9")
    return data[:end_of_image] + (refinement + b"\0" * 12) * scans + b"\xff\xd9"


def timed(work: Any) -> tuple[float, str]:
    started = time.perf_counter()
    try:
        work()
        outcome = "decoded"
    except BadImage as refused:
        outcome = f"refused: {refused.reason}"
    return time.perf_counter() - started, outcome


def decoding() -> None:
    small = scan_bomb(UNGUARDED_SCANS)
    bomb = scan_bomb(SCANS)
    pillow_s, _ = timed(lambda: Image.open(io.BytesIO(small)).load())
    per_scan_ms = pillow_s / UNGUARDED_SCANS * 1000
    print(f"scan bomb: {SIZE[0]}×{SIZE[1]}, {SCANS} scans, {len(bomb) / 1e6:.2f} MB")
    print(
        f"  unguarded Pillow, {UNGUARDED_SCANS} scans: {pillow_s:.1f} s "
        f"({per_scan_ms:.2f} ms a scan) -> {SCANS} scans ≈ {per_scan_ms * SCANS / 1000:.0f} s"
    )
    guarded_s, outcome = timed(lambda: decode_image(bomb, max_tiles=6))
    print(f"  decode_image, guarded: {guarded_s * 1000:.1f} ms, {outcome}")
    limits = images.MAX_JPEG_SEGMENTS
    images.MAX_JPEG_SEGMENTS = 10**9
    try:
        budget_s, outcome = timed(
            lambda: decode_image(bomb, max_tiles=6, max_jpeg_scans=10**9, time_budget_s=BUDGET_S)
        )
    finally:
        images.MAX_JPEG_SEGMENTS = limits
    print(f"  decode_image, limits lifted, budget {BUDGET_S:g} s: {budget_s:.2f} s, {outcome}")


class InstantBackend:
    """Answers every job at once: only the engine's own waiting shows in the latency."""

    name = "instant"
    capacity = 4
    max_batches = 4

    async def load(self, model: ModelSpec) -> None:
        pass

    async def close(self) -> None:
        pass

    async def generate(self, jobs: Sequence[GenerationJob]) -> AsyncGenerator[BackendEvent, None]:
        for index in range(len(jobs)):
            yield JobFinished(index, "叉烧")


async def latency_under_attack(attack: bool, guarded: bool) -> tuple[list[float], int]:
    """Another user's latencies while (optionally) an attacker keeps 3 bombs in flight."""
    bomb = scan_bomb(SCANS)
    photo = io.BytesIO()
    Image.new("RGB", (1600, 1200), (90, 140, 60)).save(photo, format="JPEG", quality=90)
    config = EngineConfig(decode_time_budget_s=5.0)
    original_load, original_segments = engine_module.load_image, images.MAX_JPEG_SEGMENTS
    if not guarded:
        engine_module.load_image = functools.partial(original_load, max_jpeg_scans=10**9)  # type: ignore[assignment]
        images.MAX_JPEG_SEGMENTS = 10**9
    latencies: list[float] = []
    bombs_sent = 0
    try:
        async with Engine(InstantBackend(), ModelSpec("/none", "bench"), config) as engine:
            stop = time.perf_counter() + ATTACK_S

            async def attacker() -> None:
                nonlocal bombs_sent
                while attack and time.perf_counter() < stop:
                    request = Request(key="attacker", question="?", images=(bomb,))
                    bombs_sent += 3
                    await asyncio.gather(
                        *(engine.submit(request) for _ in range(3)), return_exceptions=True
                    )

            attacking = asyncio.create_task(attacker())
            await asyncio.sleep(0.2)  # the bombs reach the decoders first
            while time.perf_counter() < stop:
                started = time.perf_counter()
                request = Request(key="someone", question="?", images=(photo.getvalue(),))
                await (await engine.submit(request)).result()
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.1)
            await attacking
    finally:
        engine_module.load_image = original_load  # type: ignore[assignment]
        images.MAX_JPEG_SEGMENTS = original_segments
    return latencies, bombs_sent


def serving() -> None:
    print(f"another user's latency, submit to answer, over {ATTACK_S:g} s (1600×1200 JPEG):")
    for label, attack, guarded in (
        ("no attack", False, True),
        ("attack, guarded", True, True),
        ("attack, scan limits lifted", True, False),
    ):
        latencies, bombs = asyncio.run(latency_under_attack(attack, guarded))
        print(
            f"  {label:28s} requests {len(latencies):3d}  "
            f"p50 {statistics.median(latencies) * 1000:7.1f} ms  "
            f"max {max(latencies) * 1000:7.1f} ms  bombs sent {bombs}"
        )


if __name__ == "__main__":
    decoding()
    serving()
