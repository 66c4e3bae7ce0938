"""The export directory: written beside its final place, hashed as written, swapped in whole.

An export is written into a hidden sibling of the output directory and renamed into place
only when complete, so a failed or interrupted export leaves the previous one untouched.
Only a directory a previous export wrote (its manifest says so) is ever replaced; anything
else that is not empty is refused.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from bot.training.export.errors import ExportError

MANIFEST_NAME = "manifest.json"
EXPORT_FORMAT = "dishbot-training-export/1"
IMAGES_DIR = "images"
FILE_MODE = 0o644
_COPY_CHUNK_BYTES = 1024 * 1024
# Errors of os.link that mean "not here": another file system, or one without hard links.
_LINK_UNAVAILABLE = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES})


class ImagePlacement(enum.StrEnum):
    """How a photo came into the export."""

    LINKED = "linked"
    COPIED = "copied"


class PhotoUnavailable(Exception):
    """A photo file is missing, unreadable, or not the bytes the database says."""


def check_output_dir(out_dir: Path) -> None:
    """Refuse an output directory the export must not write to, with the reason."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_previous_export(out_dir):
        raise ExportError(
            f"{out_dir} is not empty and was not written by `dishbot export`; "
            "give a new or empty directory"
        )


def is_previous_export(directory: Path) -> bool:
    """Whether ``directory`` holds an export that dishbot wrote (and may replace)."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == EXPORT_FORMAT


class HashingWriter:
    """A text file being written as UTF-8, its sha256 computed on the way."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._hash = hashlib.sha256()

    def write(self, text: str) -> None:
        """Append ``text``."""
        data = text.encode("utf-8")
        self._hash.update(data)
        self._file.write(data)

    def hexdigest(self) -> str:
        """The sha256 of everything written so far."""
        return self._hash.hexdigest()


class ExportDirectory:
    """An export under construction; `commit` puts it in place of ``out_dir``.

    Used as a context manager: leaving it without `commit` (an error, an interruption)
    removes everything written.
    """

    def __init__(self, out_dir: Path) -> None:
        check_output_dir(out_dir)
        self.out_dir = out_dir.absolute()
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self._staging = Path(
                tempfile.mkdtemp(dir=self.out_dir.parent, prefix=f".{self.out_dir.name}.export-")
            )
            (self._staging / IMAGES_DIR).mkdir()
        except OSError as exc:
            raise ExportError(f"cannot write under {self.out_dir.parent}: {exc.strerror}") from None
        self.file_hashes: dict[str, str] = {}
        # Image names and hashes, one "name\tsha256" a line, in the order written: kept on
        # disk rather than in memory, however many photos there are.
        self._image_list = tempfile.TemporaryFile(mode="w+", encoding="utf-8")  # noqa: SIM115
        self._committed = False

    def __enter__(self) -> ExportDirectory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._image_list.close()
        if not self._committed:
            shutil.rmtree(self._staging, ignore_errors=True)

    @contextlib.contextmanager
    def text_file(self, name: str) -> Iterator[HashingWriter]:
        """Write the file ``name`` (relative to the export) through a `HashingWriter`."""
        with open(self._staging / name, "wb") as file:
            writer = HashingWriter(file)
            yield writer
            os.fchmod(file.fileno(), FILE_MODE)
        self.file_hashes[name] = writer.hexdigest()

    def write_text(self, name: str, text: str) -> None:
        """Write the whole file ``name`` at once."""
        with self.text_file(name) as writer:
            writer.write(text)

    def add_image(self, source: Path, name: str, sha256: str, size: int) -> ImagePlacement:
        """Put the photo ``source`` at ``images/<name>``: a hard link if possible, else a copy.

        Raises `PhotoUnavailable` when the file is missing or is not ``size`` bytes (or, when
        copied, does not hash to ``sha256``).
        """
        target = self._staging / IMAGES_DIR / name
        try:
            placement = _link_or_copy(source, target, sha256)
            if target.stat().st_size != size:
                target.unlink()
                raise PhotoUnavailable(f"{source} is not the {size} bytes stored")
        except OSError as exc:
            raise PhotoUnavailable(f"{source}: {exc.strerror or exc}") from None
        self._image_list.write(f"{IMAGES_DIR}/{name}\t{sha256}\n")
        return placement

    def write_manifest(self, header: dict[str, Any]) -> None:
        """Write ``manifest.json``: ``header``, then the sha256 of every file written.

        Files are listed in name order; the images, already in order, are streamed from
        disk rather than held in memory.
        """
        body = json.dumps(header, indent=2, ensure_ascii=False)
        assert body.endswith("\n}")
        with self.text_file(MANIFEST_NAME) as writer:
            writer.write(body[: -len("\n}")] + ',\n  "files": {')
            separator = "\n"
            for name, digest in self._files_in_order():
                writer.write(f"{separator}    {json.dumps(name)}: {json.dumps(digest)}")
                separator = ",\n"
            writer.write("\n  }\n}\n")
        del self.file_hashes[MANIFEST_NAME]  # a file cannot list its own hash

    def _files_in_order(self) -> Iterator[tuple[str, str]]:
        images_prefix = f"{IMAGES_DIR}/"
        others = sorted(self.file_hashes.items())
        yield from ((n, d) for n, d in others if n < images_prefix)
        self._image_list.seek(0)
        for line in self._image_list:
            name, digest = line.rstrip("\n").split("\t")
            yield name, digest
        yield from ((n, d) for n, d in others if n > images_prefix)

    def commit(self) -> None:
        """Put the finished export at ``out_dir``, replacing a previous export there."""
        check_output_dir(self.out_dir)  # it may have changed while we wrote
        self._staging.chmod(0o755)  # mkdtemp makes it private to us
        replaced: Path | None = None
        if self.out_dir.is_dir() and any(self.out_dir.iterdir()):
            replaced = Path(
                tempfile.mkdtemp(dir=self.out_dir.parent, prefix=f".{self.out_dir.name}.old-")
            )
            os.replace(self.out_dir, replaced / "export")
        elif self.out_dir.is_dir():
            self.out_dir.rmdir()
        os.replace(self._staging, self.out_dir)
        self._committed = True
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)


def _link_or_copy(source: Path, target: Path, sha256: str) -> ImagePlacement:
    try:
        os.link(source, target)
        return ImagePlacement.LINKED
    except OSError as exc:
        if exc.errno not in _LINK_UNAVAILABLE:
            raise
    _copy_checked(source, target, sha256)
    return ImagePlacement.COPIED


def _copy_checked(source: Path, target: Path, sha256: str) -> None:
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(_COPY_CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
        os.fchmod(writer.fileno(), FILE_MODE)
    if digest.hexdigest() != sha256:
        target.unlink()
        raise PhotoUnavailable(f"{source} does not hash to its name")
