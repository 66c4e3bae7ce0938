"""Small builders for tests: a photo (or a hostile file), a user, an answered question."""

from __future__ import annotations

import io
import struct
import zlib
from datetime import datetime
from itertools import count

from PIL import Image

from bot.store import ExchangeRecord, PhotoRecord, Store, UserRecord

_message_ids = count(1000)


def jpeg_bytes(
    color: tuple[int, int, int] = (200, 80, 40), size: tuple[int, int] = (64, 48)
) -> bytes:
    """A real, decodable JPEG; a different colour gives different bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` RGB pixels but carries almost no data."""

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def progressive_jpeg_scan_bomb(scans: int, size: tuple[int, int] = (2048, 2048)) -> bytes:
    """A valid progressive JPEG followed by ``scans`` copies of a tiny (26-byte) scan.

    The copy is the photo's own DC refinement scan header with a few bytes of data: libjpeg
    walks every block of the image for each one, so a bigger ``size`` costs more per scan
    (about 0.4 ms at 2048×2048 and 3.5 ms at 4096×4096 on the benchmark machine).
    """
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 80, 40)).save(buffer, format="JPEG", progressive=True)
    data = buffer.getvalue()
    refinement = next(
        header for header in _scan_headers(data) if header[-3:-1] == b"\0\0" and header[-1] >> 4
    )
    end_of_image = data.rindex(b"\xff\xd9")
    return data[:end_of_image] + (refinement + b"\0" * 12) * scans + b"\xff\xd9"


def _scan_headers(jpeg: bytes) -> list[bytes]:
    """The SOS segments (marker, length and header, no data) of a JPEG Pillow wrote."""
    headers = []
    position = 2
    while jpeg[position + 1] != 0xD9:
        (length,) = struct.unpack(">H", jpeg[position + 2 : position + 4])
        segment = jpeg[position : position + 2 + length]
        position += 2 + length
        if segment[1] != 0xDA:
            continue
        headers.append(segment)
        # Skip the scan's data: a 0xFF in it is followed by 0 (stuffing) or a restart marker.
        while jpeg[(position := jpeg.index(b"\xff", position)) + 1] in (0, *range(0xD0, 0xD8)):
            position += 2
    return headers


def jpeg_with_segments(marker: int, payload: bytes, count: int) -> bytes:
    """A small JPEG with ``count`` extra ``marker`` segments (APPn, COM) right after its SOI."""
    segment = bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload
    photo = jpeg_bytes()
    return photo[:2] + segment * count + photo[2:]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body and CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_chunks(chunks: bytes, color: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    """A 64×48 PNG of one ``color`` with ``chunks`` (see `png_chunk`) just after its header."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, format="PNG")
    data = buffer.getvalue()
    end_of_header = 8 + 25  # signature, then IHDR: length, type, 13 bytes, CRC
    return data[:end_of_header] + chunks + data[end_of_header:]


async def add_photo(store: Store, color: tuple[int, int, int] = (200, 80, 40)) -> PhotoRecord:
    return await store.add_photo(jpeg_bytes(color), image_format="JPEG", width=64, height=48)


async def add_user(store: Store, platform_user_id: str, platform: str = "telegram") -> UserRecord:
    return await store.upsert_user(
        platform, platform_user_id, display_name=f"user {platform_user_id}"
    )


async def answered(
    store: Store,
    user: UserRecord,
    *,
    photo: PhotoRecord | None = None,
    question: str = "这是什么菜？",
    answer: str = "叉烧 (char siu)",
    parent_id: int | None = None,
    chat_id: str = "42",
) -> ExchangeRecord:
    """A question by ``user`` that the bot answered, as the dialog would store it."""
    exchange = await store.start_exchange(
        user_id=user.id,
        platform=user.platform,
        chat_id=chat_id,
        question=question,
        question_message_id=str(next(_message_ids)),
        photo_sha256=photo.sha256 if photo else None,
        parent_id=parent_id,
    )
    return await store.finish_exchange(
        exchange.id,
        answer=answer,
        model_version="internvl2-2b",
        latency_ms=850,
        reply_message_id=str(next(_message_ids)),
    )


async def set_trust(store: Store, user: UserRecord, trust: int) -> None:
    """Mark how far a user's feedback is trusted (there is no admin flow for it yet)."""
    from sqlalchemy import update

    from bot.store.models import User

    async with store.engine.begin() as connection:
        await connection.execute(update(User).where(User.id == user.id).values(trust=trust))


async def backdate(store: Store, exchange: ExchangeRecord, when: datetime) -> None:
    """Pretend a question was asked at ``when``."""
    from sqlalchemy import update

    from bot.store.models import Exchange

    async with store.engine.begin() as connection:
        await connection.execute(
            update(Exchange).where(Exchange.id == exchange.id).values(created_at=when)
        )
