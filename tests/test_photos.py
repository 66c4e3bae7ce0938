"""Photo files: content-addressed, written whole or not at all, stored once."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from bot.store import Store
from bot.store.photos import PhotoFiles
from tests.factories import jpeg_bytes


async def test_a_photo_is_stored_under_its_sha256(store: Store, data_dir: Path) -> None:
    data = jpeg_bytes()
    digest = hashlib.sha256(data).hexdigest()

    photo = await store.add_photo(data, image_format="JPEG", width=64, height=48)

    assert photo.sha256 == digest
    assert photo.path == f"photos/{digest[:2]}/{digest}.jpg"
    assert (data_dir / photo.path).read_bytes() == data
    assert (photo.width, photo.height, photo.format, photo.bytes) == (64, 48, "JPEG", len(data))


async def test_the_same_photo_sent_twice_is_stored_once(store: Store, data_dir: Path) -> None:
    data = jpeg_bytes()

    first = await store.add_photo(data, image_format="JPEG", width=64, height=48)
    second = await store.add_photo(data, image_format="jpeg", width=64, height=48)

    assert second == first
    assert [p.name for p in (data_dir / "photos").rglob("*") if p.is_file()] == [
        f"{first.sha256}.jpg"
    ]


def test_a_failed_write_leaves_neither_a_partial_file_nor_a_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = PhotoFiles(tmp_path)

    def disk_full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        files.write(jpeg_bytes(), "JPEG")

    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_format_dishbot_does_not_keep_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TIFF"):
        PhotoFiles(tmp_path).write(b"II*\x00", "TIFF")
