"""Photo files on disk: content-addressed by sha256, written atomically, stored once."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

# Image formats as Pillow names them, and the file extension each is stored under.
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "HEIF": "heic", "GIF": "gif"}
PHOTOS_DIR = "photos"
PHOTO_FILE_MODE = 0o644  # readable by a training job or backup running as another user


def sha256_hex(data: bytes) -> str:
    """The key a photo is stored under."""
    return hashlib.sha256(data).hexdigest()


def extension_for(image_format: str) -> str:
    """The file extension for a Pillow format name; `ValueError` for a format not kept."""
    try:
        return EXTENSIONS[image_format.upper()]
    except KeyError:
        raise ValueError(f"photo format {image_format!r} is not one dishbot stores") from None


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PhotoFiles:
    """The ``photos/`` tree under the data directory: ``photos/ab/<sha256>.<ext>``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def relative_path(self, sha256: str, image_format: str) -> str:
        """Where a photo lives, relative to the data directory (what the database stores)."""
        return f"{PHOTOS_DIR}/{sha256[:2]}/{sha256}.{extension_for(image_format)}"

    def absolute(self, relative_path: str) -> Path:
        """The file for a stored relative path."""
        return self.data_dir / relative_path

    def write(self, data: bytes, image_format: str) -> tuple[str, str]:
        """Store ``data`` unless an identical photo is already there.

        Returns ``(sha256, relative_path)``. The file appears whole or not at all: it is
        written to a temporary file in the same directory, flushed, then renamed.
        """
        digest = sha256_hex(data)
        relative = self.relative_path(digest, image_format)
        target = self.absolute(relative)
        if target.is_file() and target.stat().st_size == len(data):
            return digest, relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as temp:
                os.fchmod(temp.fileno(), PHOTO_FILE_MODE)  # mkstemp makes it owner-only
                temp.write(data)
                temp.flush()
                os.fsync(temp.fileno())
            os.replace(temp_name, target)
            _fsync_directory(target.parent)  # so the rename itself survives a power cut
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise
        return digest, relative

    def remove(self, relative_path: str) -> bool:
        """Delete a photo file; False if it was already gone."""
        try:
            self.absolute(relative_path).unlink()
        except FileNotFoundError:
            return False
        return True
