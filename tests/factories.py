"""Small builders for tests: a photo (or a decompression bomb), a user, an answered question."""

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

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


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
