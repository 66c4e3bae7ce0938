"""Safe image decoding and InternVL tiling: untrusted bytes in, model-ready pixels out.

Photos come from strangers, so every limit is checked before any pixel is decoded: the byte
size first, then the file's structure (a JPEG's scans and segments, a PNG's chunks, counted
from the markers alone), then the width and height the header declares. Decoding itself has a
time budget: Pillow's decoders cannot be interrupted, but they ask for input a chunk at a
time, and the input stops (`BadImage`) once the budget is spent. Large JPEGs are decoded at a
reduced scale directly (libjpeg's DCT scaling: 1/2, 1/4 or 1/8, the smallest that still covers
the tile grid), which is most of the speed and memory saving; other formats are shrunk to
what InternVL's dynamic tiling can use right after decoding.

Tiling follows InternVL's ``dynamic_preprocess``: pick the grid of 448-pixel tiles whose
aspect ratio is closest to the image's, resize to that grid with BICUBIC, cut the tiles in
row-major order and, when there is more than one tile, add a thumbnail of the whole image.
Each tile is resampled once, straight from the decoded photo, and the thumbnail from the
tile grid; how far that lands from InternVL's own pipeline is measured in the tests. This
module needs no torch; the transformers backend, which has it, makes the same tiles faster
with `engine.backends.torch_pixels`.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import io
import re
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image, UnidentifiedImageError, _imaging

from engine.errors import BadImage

MAX_IMAGE_BYTES = 20 * 1024 * 1024
# 50 megapixels is above any phone camera (a 48 MP sensor is 8064×6048) and well under
# Pillow's own bomb limit, so a real photo passes and a bomb is refused by the header alone.
MAX_IMAGE_PIXELS = 50_000_000
# Encoders write few scans: libjpeg's default progression has 10 for a colour photo (18 for
# CMYK), mozjpeg's and cameras' fewer. libjpeg walks every block of the image for each scan,
# however small, so thousands of 26-byte scans cost minutes of CPU for under a megabyte.
MAX_JPEG_SCANS = 100
# A photo has tens of segments (APPn, COM, tables); even 20 MB of full 64 KB ones is 320.
# Pillow parses each in Python: a million empty ones cost seconds and hundreds of MB.
MAX_JPEG_SEGMENTS = 1000
# A PNG has a handful of metadata chunks plus its data in chunks of usually 8 to 64 KB, so a
# 20 MB one has at most a few thousand; a flood of tiny ones costs 20 to 50 µs each in Pillow.
# Animations count all their frames' chunks: over 10,000 is thousands of frames, not a photo.
MAX_PNG_CHUNKS = 10_000
# Seconds one photo may take to decode: a 50 MP progressive JPEG takes well under one.
DECODE_TIME_BUDGET_S = 5.0
TILE_SIZE = 448
# Bands of the tile grid `pixel_values` resamples at once (Pillow resamples without the GIL).
RESAMPLE_THREADS = 2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NOT_AN_ACCEPTED_IMAGE = "the file is not a JPEG, PNG, WebP or HEIC image"
CORRUPT_IMAGE = "the image data is truncated or corrupt"
HEIC_NOT_SUPPORTED = "HEIC photos are not supported here; please send it as a JPEG"
TOO_MANY_SCANS = "the JPEG has too many progressive scans to decode safely"
TOO_MANY_PARTS = "the file is made of too many parts to decode safely"
TOO_SLOW_TO_DECODE = "the image took too long to decode"
TOO_MUCH_METADATA = "the image carries more metadata than allowed"

_WHITE = (255, 255, 255)
_BASE_FORMATS = ("JPEG", "PNG", "WEBP")
# Pillow reports a phone's multi-picture JPEG as "MPO"; to a user it is a JPEG.
_FORMAT_NAMES = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WEBP", "HEIF": "HEIF"}
_DRAFTABLE_FORMATS = frozenset({"JPEG", "MPO"})
# ISO base media "ftyp" brands of HEIF still images and sequences (iPhone photos are "heic").
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_RESIZE_WITH_ALPHA = frozenset({"RGBA", "LA"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# EXIF orientation -> the transpose that shows the photo upright (EXIF 2.3, tag 0x0112).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})
# The next marker after a segment or in a scan's data, as libjpeg finds it: 0xFF (the last of
# any 0xFF fill) then a byte that is not 0 (the 0xFF was a data byte) nor a restart marker
# (which has no segment). One literal byte first, so the search runs in C at memchr speed.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_SOS = 0xDA
_JPEG_EOI = 0xD9
_JPEG_WITHOUT_LENGTH = frozenset({0x01, 0xD8})  # TEM and SOI
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The names of PngImagePlugin's limits on inflated metadata, which its errors mention.
_PNG_METADATA_LIMITS = ("MAX_TEXT_CHUNK", "MAX_TEXT_MEMORY")
# libjpeg decodes everything it is handed in one call: 16 KB at a time lets the time budget
# be checked often (every 0.1 s or so for a scan bomb of a 16 MP image) at no measurable cost
# to an ordinary photo.
_JPEG_FEED_BYTES = 16 * 1024

# ToTensor divides by 255, Normalize subtracts the mean and divides by the std; folded into
# one multiply and one subtract per channel.
PIXEL_SCALE = (1.0 / (255.0 * np.asarray(IMAGENET_STD, dtype=np.float64))).astype(np.float32)
PIXEL_OFFSET = (np.asarray(IMAGENET_MEAN) / np.asarray(IMAGENET_STD)).astype(np.float32)

# Pillow allocates image memory in blocks of up to 16 MB and by default gives each freed block
# straight back, so every photo pays again for the page faults of fresh memory: about 9 ms of
# a 12 MP photo's ingest on the benchmark machine. Pillow's PILLOW_BLOCKS_MAX keeps some.
KEPT_IMAGE_BLOCKS = 4

_heif_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """A photo ready for tiling.

    ``image`` is RGB, upright (EXIF orientation applied) and sized for tiling with the
    ``max_tiles`` it was decoded for: a large JPEG at the reduced scale libjpeg decoded it at
    (under twice what tiling uses per side, e.g. 2000×1500 for a 12 MP photo and six tiles),
    anything else no larger than tiling uses. ``source_format`` is "JPEG", "PNG", "WEBP" or
    "HEIF"; ``source_size`` is the original (width, height), after orientation.
    """

    image: Image.Image
    source_format: str
    source_size: tuple[int, int]


def decode_image(
    data: bytes,
    *,
    max_tiles: int,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_jpeg_scans: int = MAX_JPEG_SCANS,
    time_budget_s: float = DECODE_TIME_BUDGET_S,
) -> DecodedImage:
    """Decode untrusted image bytes into an upright RGB image sized for ``max_tiles`` tiles.

    Raises `BadImage` with a reason a user can be told when the data is empty, larger than
    ``max_bytes``, is a JPEG of more than ``max_jpeg_scans`` scans or a file of too many
    segments or chunks, declares more than ``max_pixels`` pixels, is not a JPEG, PNG, WebP or
    (when pillow-heif is installed) HEIC/HEIF image, carries more (decompressed) metadata
    than Pillow's limits, is truncated or corrupt, or takes over ``time_budget_s`` seconds to
    decode (the decode then stops itself, freeing its thread).
    """
    _check_max_tiles(max_tiles)
    if not data:
        raise BadImage("the file is empty")
    if len(data) > max_bytes:
        raise BadImage(f"the photo is larger than {max_bytes / (1024 * 1024):g} MB")
    if data.startswith(b"\xff\xd8"):
        _check_jpeg_structure(data, max_jpeg_scans)
    elif data.startswith(_PNG_SIGNATURE):
        _check_png_structure(data)
    stream = _BudgetedBytes(data, time_budget_s)
    try:
        with Image.open(stream, formats=_accepted_formats()) as opened:
            if opened.format in _DRAFTABLE_FORMATS:
                stream.hand_out_at_most(_JPEG_FEED_BYTES)
            return _decode_opened(opened, max_tiles, max_pixels)
    except BadImage:
        raise
    except UnidentifiedImageError as exc:
        # Without pillow-heif an iPhone photo is not unidentifiable, just unsupported: say so.
        reason = HEIC_NOT_SUPPORTED if _looks_like_heif(data) else NOT_AN_ACCEPTED_IMAGE
        raise BadImage(reason) from exc
    except Image.DecompressionBombError as exc:
        raise BadImage(f"the image has more than the {_megapixels(max_pixels)} allowed") from exc
    except ValueError as exc:
        # Pillow inflates a PNG's compressed text and ICC profile only up to its limits
        # (MAX_TEXT_CHUNK each, MAX_TEXT_MEMORY in all) and names the limit when it stops.
        too_much = any(name in str(exc) for name in _PNG_METADATA_LIMITS)
        raise BadImage(TOO_MUCH_METADATA if too_much else CORRUPT_IMAGE) from exc
    except Exception as exc:
        # Image parsers fail in many ways on hostile input (OSError, SyntaxError, struct and
        # zlib errors, ValueError...); to the user they all mean the same thing.
        raise BadImage(CORRUPT_IMAGE) from exc


async def load_image(
    data: bytes,
    *,
    max_tiles: int,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_jpeg_scans: int = MAX_JPEG_SCANS,
    time_budget_s: float = DECODE_TIME_BUDGET_S,
) -> DecodedImage:
    """`decode_image` in a worker thread, so decoding never blocks the event loop.

    A thread cannot be cancelled: if the caller gives up, the decode still runs to its end,
    which ``time_budget_s`` bounds.
    """
    return await asyncio.to_thread(
        functools.partial(
            decode_image,
            data,
            max_tiles=max_tiles,
            max_bytes=max_bytes,
            max_pixels=max_pixels,
            max_jpeg_scans=max_jpeg_scans,
            time_budget_s=time_budget_s,
        )
    )


def keep_image_memory(blocks: int = KEPT_IMAGE_BLOCKS) -> None:
    """Let Pillow keep up to ``blocks`` freed blocks of image memory for the next photo.

    Pillow has one allocator per process, so this is process-wide; the engine calls it as it
    starts. At most ``blocks`` × 16 MB stays held between photos. A larger number already set
    (by ``PILLOW_BLOCKS_MAX``) is left as it is.
    """
    if blocks < 0:
        raise ValueError(f"blocks must not be negative, not {blocks}")
    # _imaging is Pillow's C core (Image.core); its block allocator is what the env var sets.
    _imaging.set_blocks_max(max(blocks, _imaging.get_blocks_max()))


def grid_for(
    width: int, height: int, max_tiles: int, tile_size: int = TILE_SIZE
) -> tuple[int, int]:
    """The (columns, rows) of tiles InternVL cuts a ``width``×``height`` image into.

    The grid with 1..``max_tiles`` tiles whose aspect ratio is closest to the image's; on a
    tie the later (larger) grid wins when the image's area exceeds half the grid's area,
    exactly as InternVL's ``find_closest_aspect_ratio``.
    """
    _check_max_tiles(max_tiles)
    if width < 1 or height < 1:
        raise ValueError(f"an image must have a positive size, not {width}×{height}")
    aspect_ratio = width / height
    area = width * height
    best = (1, 1)
    best_difference = float("inf")
    for columns, rows in _candidate_grids(max_tiles):
        difference = abs(aspect_ratio - columns / rows)
        if difference < best_difference:
            best, best_difference = (columns, rows), difference
        elif difference == best_difference and area > 0.5 * tile_size * tile_size * columns * rows:
            best = (columns, rows)
    return best


def tile_image(image: Image.Image, max_tiles: int, tile_size: int = TILE_SIZE) -> list[Image.Image]:
    """The tiles of ``image`` in row-major order, then a thumbnail if there are several.

    InternVL's ``dynamic_preprocess`` with ``use_thumbnail=True`` (``tile_size`` is the vision
    tower's input size, 448 for every InternVL2/3 model), resampled as `pixel_values` does.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    columns, rows = grid_for(rgb.width, rgb.height, max_tiles, tile_size)
    grid = Image.new("RGB", (columns * tile_size, rows * tile_size))
    edges = _band_edges(rows, tile_size)
    source = _band_source(rgb, grid.size)
    for top, bottom in pairwise(edges):
        grid.paste(_resample_band(source, grid.size, top, bottom), (0, top))
    tiles = [
        grid.crop((left, top, left + tile_size, top + tile_size))
        for top in range(0, grid.height, tile_size)
        for left in range(0, grid.width, tile_size)
    ]
    if len(tiles) == 1:
        return tiles
    return [*tiles, grid.resize((tile_size, tile_size), Image.Resampling.BICUBIC)]


def pixel_values(
    image: Image.Image,
    max_tiles: int,
    tile_size: int = TILE_SIZE,
    *,
    threads: int = RESAMPLE_THREADS,
) -> npt.NDArray[np.float32]:
    """The model input for ``image``: float32 (tiles, 3, tile_size, tile_size), normalised.

    The tiles of `tile_image`, in the same order, channels first, with ImageNet mean and
    standard deviation. InternVL resizes the photo to the whole grid and cuts it; here the
    grid is resized in bands of half a tile row, each from the photo's pixels under and
    around it (Pillow's ``box``), which gives the same pixels (a rare rounding apart; a photo
    smaller than its grid is enlarged whole, see `_band_source`) and lets ``threads`` bands
    be resampled at once, as Pillow lets go of the GIL while it resamples; the result is the
    same for any ``threads``. The thumbnail is squeezed out of the grid rather than out of the
    whole photo again: fewer pixels to read (1344×896 rather than 2000×1500 for a 12 MP photo
    and six tiles) for the same picture.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    columns, rows = grid_for(rgb.width, rgb.height, max_tiles, tile_size)
    grid_tiles = columns * rows
    out = np.empty((grid_tiles + (grid_tiles > 1), 3, tile_size, tile_size), dtype=np.float32)
    grid = Image.new("RGB", (columns * tile_size, rows * tile_size))
    edges = _band_edges(rows, tile_size)
    source = _band_source(rgb, grid.size)

    def resample_band(band: int) -> None:
        top, bottom = edges[band], edges[band + 1]
        pixels = _resample_band(source, grid.size, top, bottom)
        grid.paste(pixels, (0, top))
        # A band lies within one row of tiles: (height, columns × tile, 3) viewed as
        # (columns, 3, height, tile) is those tiles' rows, channels first.
        tile_row, offset = divmod(top, tile_size)
        strip = np.asarray(pixels).reshape(bottom - top, columns, tile_size, 3)
        tiles = out[
            tile_row * columns : (tile_row + 1) * columns, :, offset : offset + bottom - top
        ]
        _normalise(strip.transpose(1, 3, 0, 2), tiles)

    _run_shared(resample_band, len(edges) - 1, threads)
    if grid_tiles == 1:
        return out
    thumbnail_bands = min(threads, tile_size)
    thumbnail_edges = [tile_size * band // thumbnail_bands for band in range(thumbnail_bands + 1)]

    def resample_thumbnail_band(band: int) -> None:
        # The grid is a whole number of tiles high, so every band's box lands on whole rows
        # of it and the bands join without a seam.
        top, bottom = thumbnail_edges[band], thumbnail_edges[band + 1]
        box = (0, top * rows, grid.width, bottom * rows)
        thumbnail = grid.resize((tile_size, bottom - top), Image.Resampling.BICUBIC, box=box)
        _normalise(np.asarray(thumbnail).transpose(2, 0, 1), out[grid_tiles, :, top:bottom])

    _run_shared(resample_thumbnail_band, thumbnail_bands, threads)
    return out


def _band_edges(rows: int, tile_size: int) -> list[int]:
    """Where the grid's bands start and end, top to bottom: two to a row of tiles.

    Small enough to spread over threads and to keep Pillow's working copies in cache, and
    never across two rows of tiles, so each band fills the same rows of a row of tiles.
    """
    half = tile_size // 2
    return sorted(
        {edge for row in range(rows) for edge in (row * tile_size, row * tile_size + half)}
        | {rows * tile_size}
    )


def _band_source(image: Image.Image, grid_size: tuple[int, int]) -> Image.Image:
    """What the grid's bands are resampled from: ``image``, or the whole grid if enlarging.

    When a photo is enlarged, Pillow rounds a band's fractional box differently from the
    whole image's (one level on about a tenth of the pixels), so a photo that small, cheap to
    resize whole, is resized to the grid at once and the bands are cut from that.
    """
    if image.height >= grid_size[1]:
        return image
    return image.resize(grid_size, Image.Resampling.BICUBIC)


def _resample_band(
    image: Image.Image, grid_size: tuple[int, int], top: int, bottom: int
) -> Image.Image:
    """Rows ``top``..``bottom`` of ``image`` resized to ``grid_size`` with BICUBIC, alone."""
    if image.size == grid_size:
        return image.crop((0, top, grid_size[0], bottom))
    # Multiplying before dividing keeps the last band's bottom exactly on the image's.
    box = (0, top * image.height / grid_size[1], image.width, bottom * image.height / grid_size[1])
    return image.resize((grid_size[0], bottom - top), Image.Resampling.BICUBIC, box=box)


def _run_shared(work: Callable[[int], None], count: int, threads: int) -> None:
    """``work(0)`` .. ``work(count - 1)``, ``threads`` at a time, this thread one of them.

    The calls are handed out one by one, so when another thread gets no CPU this one takes
    more of them; at worst it waits for the one call another thread is in the middle of.
    """
    helpers = min(threads, count) - 1
    if helpers < 1:
        for index in range(count):
            work(index)
        return
    pending = iter(range(count))
    handing_out = threading.Lock()

    def take_turns() -> None:
        while True:
            with handing_out:
                index = next(pending, None)
            if index is None:
                return
            work(index)

    with ThreadPoolExecutor(max_workers=helpers) as pool:
        others = [pool.submit(take_turns) for _ in range(helpers)]
        take_turns()
        for other in others:
            other.result()


def _normalise(pixels: npt.NDArray[np.uint8], out: npt.NDArray[np.float32]) -> None:
    """``out`` = 8-bit ``pixels`` (channels first) with ImageNet normalisation, in two passes."""
    # Multiplying straight from uint8 into out converts and scales in one pass, no temporary.
    np.multiply(pixels, PIXEL_SCALE[:, None, None], out=out)
    np.subtract(out, PIXEL_OFFSET[:, None, None], out=out)


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """``image`` as JPEG bytes (for backends that take images over the network)."""
    rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class _BudgetedBytes(io.BytesIO):
    """The photo's bytes, handed to Pillow only until the decode's time budget is spent.

    Pillow's decoders run in C and cannot be stopped, but `ImageFile.load` feeds them a chunk
    at a time (read, decode what was read, read again), and its parsers read header by
    header; each read checks the clock, so a decode over budget stops at its next read.
    """

    def __init__(self, data: bytes, budget_s: float) -> None:
        super().__init__(data)
        self._deadline = time.monotonic() + budget_s
        self._most: int | None = None

    def hand_out_at_most(self, size: int) -> None:
        """From now on give at most ``size`` bytes a read (only once headers are parsed:
        Pillow's header parsers take a short read for a truncated file)."""
        self._most = size

    def read(self, size: int | None = -1, /) -> bytes:
        if time.monotonic() > self._deadline:
            raise BadImage(TOO_SLOW_TO_DECODE)
        if self._most is not None and (size is None or size < 0 or size > self._most):
            size = self._most
        return super().read(size)


def _check_jpeg_structure(data: bytes, max_scans: int) -> None:
    """Refuse a JPEG of more than ``max_scans`` scans or `MAX_JPEG_SEGMENTS` segments.

    Reads only the markers, as libjpeg finds them: a segment's length skips its body (so a
    thumbnail inside EXIF is not counted), a scan's data is skipped to the next marker (see
    `_JPEG_MARKER`), and the walk ends at the first end-of-image, after which libjpeg reads
    nothing (a phone's MPO keeps its second picture there). A truncated file is left to the
    decoder, which refuses it as corrupt.
    """
    scans = segments = 0
    position = 2  # after the start-of-image marker
    while (found := _JPEG_MARKER.search(data, position)) is not None:
        marker = data[found.end() - 1]
        position = found.end()
        if marker == _JPEG_EOI:
            return
        if marker in _JPEG_WITHOUT_LENGTH:
            continue
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise BadImage(TOO_MANY_PARTS)
        if marker == _JPEG_SOS:
            scans += 1
            if scans > max_scans:
                raise BadImage(TOO_MANY_SCANS)
        if position + 2 > len(data):
            return
        position += struct.unpack_from(">H", data, position)[0]


def _check_png_structure(data: bytes) -> None:
    """Refuse a PNG of more than `MAX_PNG_CHUNKS` chunks, counted up to its IEND."""
    position = len(_PNG_SIGNATURE)
    for _ in range(MAX_PNG_CHUNKS):
        if position + 8 > len(data):
            return  # truncated: the decoder says so
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"IEND":
            return
        position += 12 + length  # length, type, body, CRC
    raise BadImage(TOO_MANY_PARTS)


def _decode_opened(opened: Image.Image, max_tiles: int, max_pixels: int) -> DecodedImage:
    """Check the declared size, then decode no more pixels than tiling needs (for a JPEG, at
    the smallest libjpeg scale that still covers the tile grid)."""
    width, height = opened.size
    if width < 1 or height < 1:
        raise BadImage(CORRUPT_IMAGE)
    if width * height > max_pixels:
        raise BadImage(
            f"the image is {width}×{height} pixels, more than the {_megapixels(max_pixels)} allowed"
        )
    source_format = _FORMAT_NAMES.get(opened.format or "")
    if source_format is None:
        raise BadImage(NOT_AN_ACCEPTED_IMAGE)

    draftable = opened.format in _DRAFTABLE_FORMATS
    if not draftable:
        # Some formats (PNG) only find their EXIF after the pixel data, so load first.
        opened.load()
    orientation = _orientation(opened)
    swaps = orientation in _SWAPS_AXES
    upright_size = (height, width) if swaps else (width, height)
    target = _decode_size(upright_size, max_tiles)
    # The stored pixels are not yet rotated: sizes before the transpose are swapped back.
    stored_target = (target[1], target[0]) if swaps else target
    if draftable:
        if stored_target != opened.size:
            # libjpeg decodes directly at 1/2, 1/4 or 1/8 scale, never below stored_target.
            opened.draft(opened.mode, stored_target)
        opened.load()

    # A photo with an alpha channel is shrunk before it is flattened onto white (Pillow
    # resizes alpha correctly), so the copies flattening makes are small ones.
    image = opened if opened.mode in _RESIZE_WITH_ALPHA else _to_rgb(opened)
    decoded_upright = (image.height, image.width) if swaps else image.size
    # A JPEG stays at libjpeg's reduced scale (under twice the target per side), so tiling
    # resamples it once, straight to the grid, instead of once here and once there. Other
    # formats were decoded at full size and are shrunk now, to keep waiting photos small.
    resampled_by_tiling = draftable and grid_for(*decoded_upright, max_tiles) == grid_for(
        *upright_size, max_tiles
    )
    if image.size != stored_target and not resampled_by_tiling:
        image = image.resize(stored_target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    image = _to_rgb(image)
    transpose = _ORIENTATION_TRANSPOSE.get(orientation)
    if transpose is not None:
        image = image.transpose(transpose)
    # The pixels are upright now; keeping the EXIF (with its orientation) would let a later
    # exif_transpose rotate the photo a second time.
    image.info = {}
    return DecodedImage(image=image, source_format=source_format, source_size=upright_size)


def _decode_size(size: tuple[int, int], max_tiles: int) -> tuple[int, int]:
    """The smallest size, same aspect ratio, that tiles like ``size`` at full quality.

    Tiling resizes to (columns × 448, rows × 448) for the grid of the original size, so
    anything covering that in both directions loses nothing. Rounding nudges the aspect ratio,
    which near a tie between two grids could change the grid, so a candidate is used only if
    it gets the same grid as the original; never larger than the original.
    """
    width, height = size
    grid = grid_for(width, height, max_tiles)
    need_width, need_height = grid[0] * TILE_SIZE, grid[1] * TILE_SIZE
    if need_width >= width or need_height >= height:
        return size
    candidates: list[tuple[int, int]] = []
    # Scale so that the tighter direction lands exactly on the need; integer arithmetic
    # keeps the other direction's floor and ceiling exact.
    if need_width * height >= need_height * width:
        for exact in (need_width, need_width + 1):
            low, high = _floor_and_ceiling(height * exact, width)
            candidates += [(exact, low), (exact, high)]
    else:
        for exact in (need_height, need_height + 1):
            low, high = _floor_and_ceiling(width * exact, height)
            candidates += [(low, exact), (high, exact)]
    for candidate_width, candidate_height in candidates:
        if (
            need_width <= candidate_width <= width
            and need_height <= candidate_height <= height
            and grid_for(candidate_width, candidate_height, max_tiles) == grid
        ):
            return candidate_width, candidate_height
    return size


def _floor_and_ceiling(numerator: int, denominator: int) -> tuple[int, int]:
    """The floor and ceiling of ``numerator / denominator``, nearest first."""
    low = numerator // denominator
    high = -(-numerator // denominator)
    return (high, low) if 2 * (numerator - low * denominator) >= denominator else (low, high)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8); 1 when absent, invalid or unreadable."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        # A damaged EXIF block should not cost the user their photo, only its rotation.
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: alpha over white, 16-bit scaled down, palettes expanded."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255 (a mostly white picture);
        # keep the top 8 bits instead.
        values = np.asarray(image)
        if values.dtype != np.uint16:  # mode "I" is int32: clip without widening further
            values = np.clip(values, 0, 65535)
        return Image.fromarray((values >> 8).astype(np.uint8)).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


@functools.cache
def _candidate_grids(max_tiles: int) -> Sequence[tuple[int, int]]:
    """Every (columns, rows) with 1..max_tiles tiles, fewest tiles first, as InternVL orders."""
    grids = [
        (columns, rows)
        for columns in range(1, max_tiles + 1)
        for rows in range(1, max_tiles // columns + 1)
    ]
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def _accepted_formats() -> tuple[str, ...]:
    """The Pillow formats `decode_image` opens: HEIF only when pillow-heif is installed."""
    return (*_BASE_FORMATS, "HEIF") if _heif_registered() else _BASE_FORMATS


def _heif_registered() -> bool:
    """Register pillow-heif's opener on first use; False when it is not installed."""
    with _heif_lock:
        return _register_heif()


@functools.cache
def _register_heif() -> bool:
    try:
        pillow_heif = importlib.import_module("pillow_heif")
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _looks_like_heif(data: bytes) -> bool:
    """Whether ``data`` starts like a HEIF file: a "ftyp" box with a HEIF brand."""
    return data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


def _check_max_tiles(max_tiles: int) -> None:
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be at least 1, not {max_tiles}")


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1_000_000:g} megapixels"
