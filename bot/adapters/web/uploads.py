"""Reading a question's form: a photo and a few short fields, never more than the limits.

The photo is read in chunks and refused the moment it passes `MAX_IMAGE_BYTES` (the limit
every platform's photos have), so a huge upload costs at most that much memory. A request
that declares more than that in its Content-Length is refused before a byte is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import BodyPartReader, web

from engine.images import MAX_IMAGE_BYTES

MAX_FIELD_BYTES = 8 * 1024  # a question, a message id: far below this
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the text fields
TEXT_FIELDS = frozenset({"question", "reply_to"})
CHUNK_BYTES = 64 * 1024


class UploadTooLarge(Exception):
    """The photo (or the whole request) is over the size limit."""


class BadForm(Exception):
    """The request is not the chat page's form."""


@dataclass(frozen=True, slots=True)
class AskForm:
    """What the chat page's form sent."""

    photo: bytes | None
    filename: str | None
    content_type: str | None
    question: str
    reply_to: str | None


async def read_ask_form(request: web.Request, max_photo_bytes: int = MAX_IMAGE_BYTES) -> AskForm:
    """The question form, with its photo (if any) no bigger than ``max_photo_bytes``."""
    declared = request.content_length
    if declared is not None and declared > max_photo_bytes + FORM_OVERHEAD_BYTES:
        raise UploadTooLarge
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError) as exc:  # not multipart, or no boundary
        raise BadForm from exc
    fields: dict[str, str] = {}
    photo: bytes | None = None
    filename = content_type = None
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise BadForm  # a nested multipart is no form of ours
        if part.name == "photo" and photo is None:
            photo = await _read_bounded(part, max_photo_bytes, UploadTooLarge)
            filename, content_type = part.filename, part.headers.get("Content-Type")
        elif part.name in TEXT_FIELDS and part.name not in fields:
            raw = await _read_bounded(part, MAX_FIELD_BYTES, BadForm)
            fields[part.name] = raw.decode("utf-8", errors="replace")
        else:
            raise BadForm
    return AskForm(
        photo=photo or None,  # an empty file field is no photo
        filename=filename,
        content_type=content_type,
        question=fields.get("question", "").strip(),
        reply_to=fields.get("reply_to") or None,
    )


async def _read_bounded(part: BodyPartReader, limit: int, too_big: type[Exception]) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK_BYTES):
        data += chunk
        if len(data) > limit:
            raise too_big
    return bytes(data)
