"""Image ingest: hostile files are refused with a reason, photos come out upright and RGB,
large photos are shrunk only to what tiling can use, and tiles match InternVL's."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps, _imaging

from engine import images
from engine.errors import BadImage
from engine.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    KEPT_IMAGE_BLOCKS,
    MAX_IMAGE_BYTES,
    TILE_SIZE,
    DecodedImage,
    decode_image,
    encode_jpeg,
    grid_for,
    keep_image_memory,
    load_image,
    pixel_values,
    tile_image,
)
from tests.factories import (
    jpeg_with_segments,
    png_chunk,
    png_declaring,
    png_with_chunks,
    progressive_jpeg_scan_bomb,
)

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
GREY = (128, 128, 128)
NOT_AN_IMAGE = "the file is not a JPEG, PNG, WebP or HEIC image"
# The smallest 8-bit step (one grey level) in normalised units: 1 / (255 × 0.229) ≈ 0.017.
ONE_STEP = 1 / (255 * max(IMAGENET_STD))
CORRUPT = "the image data is truncated or corrupt"
TOO_MANY_SCANS = "the JPEG has too many progressive scans to decode safely"
TOO_MANY_PARTS = "the file is made of too many parts to decode safely"
TOO_SLOW = "the image took too long to decode"
TOO_MUCH_METADATA = "the image carries more metadata than allowed"
# Generous bounds for hostile files: the unguarded decodes they stand against take 5 to 50 s
# or hundreds of MB (bench/hostile_images.py prints the figures).
QUICKLY_S = 5.0
BOUNDED_PYTHON_MEMORY = 100 * 1024 * 1024


def encoded(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients, a few shapes and mild noise: compresses and resizes like a photo."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    pixels = np.empty((height, width, 3), dtype=np.float32)
    pixels[..., 0] = 200 * x + 40 * y
    pixels[..., 1] = 120 + 100 * np.sin(6 * x + 3 * y)
    pixels[..., 2] = 220 * y
    pixels += rng.normal(0.0, 4.0, size=(height, width, 1)).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.2, height * 0.2, width * 0.6, height * 0.7), fill=(240, 230, 200))
    draw.rectangle((width * 0.65, height * 0.3, width * 0.9, height * 0.8), fill=(90, 40, 20))
    return image


def with_red_top_left(width: int, height: int) -> Image.Image:
    """Grey, with a red block in the top-left corner, to see where rotation puts it."""
    image = Image.new("RGB", (width, height), GREY)
    ImageDraw.Draw(image).rectangle((0, 0, width // 4, height // 4), fill=RED)
    return image


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(image, "JPEG", quality=95, exif=exif)


def corner_colours(image: Image.Image) -> dict[str, tuple[int, ...]]:
    width, height = image.size
    points = {
        "top-left": (2, 2),
        "top-right": (width - 3, 2),
        "bottom-left": (2, height - 3),
        "bottom-right": (width - 3, height - 3),
    }
    return {name: tuple(image.getpixel(point)) for name, point in points.items()}  # type: ignore[arg-type]


def is_close(colour: tuple[int, ...], expected: tuple[int, int, int], tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(colour, expected, strict=True))


def internvl_reference(data: bytes, max_tiles: int) -> np.ndarray:
    """InternVL's ``load_image``: full-size decode, resize to the grid, crop, thumbnail of the
    whole photo, ToTensor and Normalize (numpy standing in for torchvision)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    columns, rows = grid_for(image.width, image.height, max_tiles)
    resized = image.resize((columns * TILE_SIZE, rows * TILE_SIZE), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * TILE_SIZE, r * TILE_SIZE, (c + 1) * TILE_SIZE, (r + 1) * TILE_SIZE))
        for r in range(rows)
        for c in range(columns)
    ]
    if len(tiles) > 1:
        tiles.append(image.resize((TILE_SIZE, TILE_SIZE), Image.Resampling.BICUBIC))
    normalised = [
        (np.asarray(tile, dtype=np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD for tile in tiles
    ]
    return np.stack(normalised).transpose(0, 3, 1, 2)


def decode_reason(data: bytes, **limits: int) -> str:
    with pytest.raises(BadImage) as caught:
        decode_image(data, max_tiles=6, **limits)
    return caught.value.reason


# --- refused files -------------------------------------------------------------------------


def test_an_empty_file_is_refused() -> None:
    assert decode_reason(b"") == "the file is empty"


def test_a_photo_over_the_byte_limit_is_refused_before_decoding() -> None:
    # Not an image at all: only a check made before decoding can answer about the size.
    oversized = b"\xff\xd8" + b"\0" * MAX_IMAGE_BYTES

    assert decode_reason(oversized) == "the photo is larger than 20 MB"


def test_the_byte_limit_can_be_lowered() -> None:
    data = encoded(photo_like(64, 64), "JPEG") + b"\0" * (1024 * 1024)

    assert decode_reason(data, max_bytes=1024 * 1024) == "the photo is larger than 1 MB"


def test_a_header_declaring_a_pixel_bomb_is_refused_without_decoding() -> None:
    # The file holds no pixel data: decoding it would fail as corrupt, not as too large.
    reason = decode_reason(png_declaring(100_000, 100_000))

    assert "pixels" in reason
    assert "allowed" in reason


def test_an_image_over_the_pixel_limit_is_refused_with_its_size() -> None:
    reason = decode_reason(png_declaring(10_000, 8_000))

    assert reason == "the image is 10000×8000 pixels, more than the 50 megapixels allowed"


def test_the_pixel_limit_does_not_depend_on_pillows_global_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)

    assert "10000×8000" in decode_reason(png_declaring(10_000, 8_000))
    assert "more than the 0.001 megapixels" in decode_reason(
        encoded(photo_like(64, 64), "PNG"), max_pixels=1_000
    )


def test_a_truncated_jpeg_is_refused_as_corrupt() -> None:
    data = encoded(photo_like(640, 480), "JPEG", quality=90)

    assert decode_reason(data[: len(data) // 2]) == CORRUPT


def test_a_truncated_png_is_refused_as_corrupt() -> None:
    data = encoded(photo_like(320, 240), "PNG")

    assert decode_reason(data[: len(data) // 2]) == CORRUPT


def test_a_png_with_scrambled_image_data_is_refused_as_corrupt() -> None:
    data = bytearray(encoded(photo_like(320, 240), "PNG"))
    image_data = data.index(b"IDAT") + 4
    data[image_data + 10 : image_data + 400] = bytes(range(195)) * 2

    assert decode_reason(bytes(data)) == CORRUPT


def test_random_bytes_are_not_an_image() -> None:
    noise = np.random.default_rng(1).integers(0, 256, size=4096, dtype=np.uint8).tobytes()

    assert decode_reason(noise) == NOT_AN_IMAGE


def test_a_text_file_is_not_an_image() -> None:
    assert decode_reason("红烧肉 recipe: pork belly, soy sauce\n".encode()) == NOT_AN_IMAGE


@pytest.mark.parametrize("image_format", ["GIF", "BMP", "TIFF", "ICO"])
def test_other_image_formats_are_refused(image_format: str) -> None:
    assert decode_reason(encoded(photo_like(64, 64), image_format)) == NOT_AN_IMAGE


# --- hostile structure: bounded before decoding, and while decoding ------------------------


def outcome_within_bounds(decode: Callable[[], object]) -> tuple[object, float, int]:
    """What ``decode`` returned or raised, its seconds, and the peak Python memory it took."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        outcome = decode()
    except BadImage as refused:
        outcome = refused
    finally:
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return outcome, elapsed, peak


def test_a_progressive_jpeg_with_thousands_of_scans_is_refused_at_once() -> None:
    bomb = progressive_jpeg_scan_bomb(20_000)  # about 9 s of libjpeg's time unguarded

    outcome, elapsed, _ = outcome_within_bounds(lambda: decode_image(bomb, max_tiles=6))

    assert isinstance(outcome, BadImage)
    assert outcome.reason == TOO_MANY_SCANS
    assert elapsed < QUICKLY_S


def test_a_jpeg_decode_that_runs_past_its_time_budget_stops_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With the scan and segment limits lifted, only the time budget stands between this file
    # and a minute of one decode thread's CPU (4096×4096: about 3.5 ms a scan).
    monkeypatch.setattr(images, "MAX_JPEG_SEGMENTS", 1_000_000)
    bomb = progressive_jpeg_scan_bomb(20_000, size=(4096, 4096))

    outcome, elapsed, _ = outcome_within_bounds(
        lambda: decode_image(bomb, max_tiles=6, max_jpeg_scans=1_000_000, time_budget_s=0.5)
    )

    assert isinstance(outcome, BadImage)
    assert outcome.reason == TOO_SLOW
    assert elapsed < QUICKLY_S


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_ordinary_baseline_and_progressive_jpegs_still_decode(progressive: bool) -> None:
    photo = photo_like(1600, 1200)
    data = encoded(photo, "JPEG", quality=90, progressive=progressive)

    decoded = decode_image(data, max_tiles=6)

    assert decoded.source_size == (1600, 1200)
    reference = photo.resize(decoded.image.size, Image.Resampling.BICUBIC)
    difference = np.abs(np.asarray(decoded.image, np.int16) - np.asarray(reference, np.int16))
    assert difference.mean() < 4


def test_a_phones_multi_picture_jpeg_with_progressive_frames_still_decodes() -> None:
    buffer = io.BytesIO()
    photo_like(640, 480).save(
        buffer,
        format="MPO",
        save_all=True,
        append_images=[photo_like(320, 240, seed=2)],
        progressive=True,
    )

    decoded = decode_image(buffer.getvalue(), max_tiles=6)

    assert decoded.source_format == "JPEG"
    assert decoded.image.size == (640, 480)


def test_scan_markers_inside_a_metadata_segment_or_after_the_picture_are_not_counted() -> None:
    # 98,000 bytes that look like scan headers: in a comment's body, then after the end of
    # the picture (where a phone's MPO keeps its second one), libjpeg never reads them.
    fake_scans = b"\xff\xda" * 16_000
    data = jpeg_with_segments(0xFE, fake_scans, 1) + fake_scans * 2

    decoded = decode_image(data, max_tiles=6)

    assert is_close(decoded.image.getpixel((0, 0)), (200, 80, 40), tolerance=4)  # type: ignore[arg-type]


def test_a_jpeg_padded_with_a_million_empty_segments_is_refused_at_once() -> None:
    flood = jpeg_with_segments(0xFE, b"", 1_000_000)  # 4 MB of empty comments

    outcome, elapsed, peak = outcome_within_bounds(lambda: decode_image(flood, max_tiles=6))

    assert isinstance(outcome, BadImage)
    assert outcome.reason == TOO_MANY_PARTS
    assert elapsed < QUICKLY_S
    assert peak < BOUNDED_PYTHON_MEMORY


@pytest.mark.parametrize("marker", [0xE1, 0xE9, 0xFE], ids=["APP1", "APP9", "COM"])
def test_a_jpeg_with_19_mb_of_full_size_metadata_segments_decodes_in_bounds(marker: int) -> None:
    data = jpeg_with_segments(marker, b"x" * 65_533, 300)

    outcome, elapsed, peak = outcome_within_bounds(lambda: decode_image(data, max_tiles=6))

    assert isinstance(outcome, DecodedImage)
    assert is_close(outcome.image.getpixel((0, 0)), (200, 80, 40), tolerance=4)  # type: ignore[arg-type]
    assert elapsed < QUICKLY_S
    assert peak < BOUNDED_PYTHON_MEMORY


def test_a_png_padded_with_a_flood_of_empty_chunks_is_refused_at_once() -> None:
    flood = png_with_chunks(png_chunk(b"teXt", b"") * 200_000)  # 2.4 MB; about 6 s unguarded

    outcome, elapsed, peak = outcome_within_bounds(lambda: decode_image(flood, max_tiles=6))

    assert isinstance(outcome, BadImage)
    assert outcome.reason == TOO_MANY_PARTS
    assert elapsed < QUICKLY_S
    assert peak < BOUNDED_PYTHON_MEMORY


def test_a_png_whose_pixels_come_in_a_flood_of_empty_data_chunks_is_refused_at_once() -> None:
    pixels = b"".join(b"\0" + bytes((10, 200, 30)) * 64 for _ in range(48))
    header = png_with_chunks(b"")[:33]
    flood = (
        header
        + png_chunk(b"IDAT", zlib.compress(pixels))
        + png_chunk(b"IDAT", b"") * 500_000  # 6 MB; about 11 s unguarded
        + png_chunk(b"IEND", b"")
    )

    outcome, elapsed, _ = outcome_within_bounds(lambda: decode_image(flood, max_tiles=6))

    assert isinstance(outcome, BadImage)
    assert outcome.reason == TOO_MANY_PARTS
    assert elapsed < QUICKLY_S


def test_a_png_with_a_15_mb_text_chunk_decodes_in_bounds() -> None:
    data = png_with_chunks(png_chunk(b"tEXt", b"Comment\0" + b"a" * 15_000_000))

    outcome, elapsed, peak = outcome_within_bounds(lambda: decode_image(data, max_tiles=6))

    assert isinstance(outcome, DecodedImage)
    assert outcome.image.getpixel((0, 0)) == (10, 200, 30)
    assert elapsed < QUICKLY_S
    assert peak < BOUNDED_PYTHON_MEMORY


GIGABYTE_OF_A = zlib.compress(b"a" * 1_000_000_000, 9)  # 1 MB that inflates to 1 GB


@pytest.mark.parametrize(
    "chunk",
    [
        png_chunk(b"zTXt", b"Comment\0\0" + GIGABYTE_OF_A),
        png_chunk(b"iTXt", b"Comment\0\1\0\0\0" + GIGABYTE_OF_A),
        png_chunk(b"iCCP", b"icc\0\0" + GIGABYTE_OF_A),
        png_chunk(b"zTXt", b"C\0\0" + zlib.compress(b"a" * 1_000_000, 9)) * 100,
    ],
    ids=["zTXt", "iTXt", "iCCP", "100 zTXt of 1 MB"],
)
def test_compressed_png_metadata_bombs_are_refused_as_too_much_metadata(chunk: bytes) -> None:
    bomb = png_with_chunks(chunk)

    outcome, elapsed, peak = outcome_within_bounds(lambda: decode_image(bomb, max_tiles=6))

    assert isinstance(outcome, BadImage)
    assert outcome.reason == TOO_MUCH_METADATA
    assert elapsed < QUICKLY_S
    assert peak < BOUNDED_PYTHON_MEMORY


def exif_of_absurd_ifds(entries: int, shared_bytes: int) -> bytes:
    """TIFF-structured EXIF whose IFD0 has ``entries`` tags all pointing at one big block."""
    data_at = 8 + 2 + 12 * entries + 4
    tags = b"".join(
        struct.pack("<HHII", 0x1000 + tag, 1, shared_bytes, data_at) for tag in range(entries)
    )
    orientation = struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0)  # rotate 90° clockwise to view
    return (
        b"II*\0"
        + struct.pack("<IH", 8, entries + 1)
        + orientation
        + tags
        + b"\0\0\0\0"
        + b"\1" * shared_bytes
    )[: data_at + 12 + shared_bytes]


def test_a_png_whose_exif_has_thousands_of_tags_over_one_big_block_decodes_in_bounds() -> None:
    exif = exif_of_absurd_ifds(entries=60_000, shared_bytes=10_000_000)
    data = encoded(with_red_top_left(80, 40), "PNG", exif=exif)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about every tag it skips
        outcome, elapsed, peak = outcome_within_bounds(lambda: decode_image(data, max_tiles=6))

    assert isinstance(outcome, DecodedImage)
    assert outcome.image.size == (40, 80)  # the orientation still applied
    assert elapsed < QUICKLY_S
    assert peak < BOUNDED_PYTHON_MEMORY


def animation(image_format: str, frames: int) -> bytes:
    """``frames`` frames of 320×240, the first red and every later one blue."""
    first = Image.new("RGB", (320, 240), RED)
    later = [Image.new("RGB", (320, 240), BLUE) for _ in range(frames - 1)]
    return encoded(first, image_format, save_all=True, append_images=later)


@pytest.mark.parametrize("image_format", ["PNG", "WEBP"])
def test_only_the_first_frame_of_a_long_animation_is_decoded(image_format: str) -> None:
    data = animation(image_format, 500)

    outcome, elapsed, peak = outcome_within_bounds(lambda: decode_image(data, max_tiles=6))

    assert isinstance(outcome, DecodedImage)
    assert is_close(outcome.image.getpixel((160, 120)), RED, tolerance=8)  # type: ignore[arg-type]
    assert elapsed < QUICKLY_S
    assert peak < BOUNDED_PYTHON_MEMORY


def test_an_animated_gif_is_refused_like_any_gif() -> None:
    assert decode_reason(animation("GIF", 20)) == NOT_AN_IMAGE


# --- accepted formats ----------------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP"])
def test_jpeg_png_and_webp_photos_are_accepted(image_format: str) -> None:
    decoded = decode_image(encoded(photo_like(320, 240), image_format), max_tiles=6)

    assert decoded.source_format == image_format
    assert decoded.source_size == (320, 240)
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (320, 240)


def test_a_phones_multi_picture_jpeg_counts_as_jpeg() -> None:
    buffer = io.BytesIO()
    photo_like(320, 240).save(
        buffer, format="MPO", save_all=True, append_images=[photo_like(160, 120, seed=2)]
    )

    decoded = decode_image(buffer.getvalue(), max_tiles=6)

    assert decoded.source_format == "JPEG"
    assert decoded.image.size == (320, 240)


def test_heic_photos_are_accepted_when_pillow_heif_is_installed() -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    data = encoded(photo_like(320, 240), "HEIF", quality=90)

    decoded = decode_image(data, max_tiles=6)

    assert decoded.source_format == "HEIF"
    assert decoded.image.size == (320, 240)
    assert decoded.image.mode == "RGB"


def test_without_pillow_heif_a_heic_photo_is_refused_with_a_hint_to_send_jpeg(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("engine.images._heif_registered", lambda: False)
    iphone_header = b"\x00\x00\x00\x1cftypheic\x00\x00\x00\x00mif1heic" + b"\0" * 512

    assert decode_reason(iphone_header) == (
        "HEIC photos are not supported here; please send it as a JPEG"
    )


# --- orientation ---------------------------------------------------------------------------

# Where the stored top-left corner is once the photo is shown as EXIF says.
ORIENTED_CORNER = {3: "bottom-right", 6: "top-right", 8: "bottom-left"}


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_photo_is_turned_upright_as_its_exif_orientation_says(orientation: int) -> None:
    data = jpeg_with_orientation(with_red_top_left(300, 200), orientation)

    decoded = decode_image(data, max_tiles=6)

    expected_size = (200, 300) if orientation in (6, 8) else (300, 200)
    assert decoded.image.size == expected_size
    assert decoded.source_size == expected_size
    corners = corner_colours(decoded.image)
    assert is_close(corners[ORIENTED_CORNER[orientation]], RED)
    assert sum(is_close(colour, RED) for colour in corners.values()) == 1


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_large_rotated_jpeg_is_upright_after_reduced_scale_decoding(orientation: int) -> None:
    data = jpeg_with_orientation(with_red_top_left(2400, 1800), orientation)

    decoded = decode_image(data, max_tiles=1)

    # One tile needs a 448-pixel short side: libjpeg's quarter scale is the smallest that has it.
    expected = (450, 600) if orientation in (6, 8) else (600, 450)
    assert decoded.image.size == expected
    assert decoded.source_size == ((1800, 2400) if orientation in (6, 8) else (2400, 1800))
    assert is_close(corner_colours(decoded.image)[ORIENTED_CORNER[orientation]], RED)


def test_an_upright_photo_is_not_rotated_again_by_a_later_exif_transpose() -> None:
    decoded = decode_image(jpeg_with_orientation(with_red_top_left(300, 200), 6), max_tiles=6)

    again = ImageOps.exif_transpose(decoded.image)

    assert again.size == decoded.image.size == (200, 300)


# --- colour modes --------------------------------------------------------------------------


def test_transparent_pixels_of_an_rgba_png_become_white_not_black() -> None:
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(image).rectangle((0, 0, 31, 63), fill=(*RED, 255))

    decoded = decode_image(encoded(image, "PNG"), max_tiles=1)

    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((10, 10)) == RED
    assert decoded.image.getpixel((50, 10)) == (255, 255, 255)


def test_a_half_transparent_grey_and_alpha_png_is_blended_over_white() -> None:
    image = Image.new("LA", (32, 32), (0, 128))

    decoded = decode_image(encoded(image, "PNG"), max_tiles=1)

    assert is_close(decoded.image.getpixel((5, 5)), (127, 127, 127), tolerance=2)  # type: ignore[arg-type]


def test_a_palette_png_with_a_transparent_colour_becomes_rgb_on_white() -> None:
    image = Image.new("P", (32, 32), 0)
    image.putpalette([*BLUE, *GREEN])
    ImageDraw.Draw(image).rectangle((16, 0, 31, 31), fill=1)

    decoded = decode_image(encoded(image, "PNG", transparency=0), max_tiles=1)

    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((5, 5)) == (255, 255, 255)
    assert decoded.image.getpixel((25, 5)) == GREEN


def test_a_cmyk_jpeg_becomes_rgb_with_the_right_colours() -> None:
    red_in_cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))

    decoded = decode_image(encoded(red_in_cmyk, "JPEG", quality=95), max_tiles=1)

    assert decoded.image.mode == "RGB"
    assert is_close(decoded.image.getpixel((32, 32)), RED)  # type: ignore[arg-type]


def test_a_16_bit_greyscale_png_keeps_its_tones_instead_of_turning_white() -> None:
    ramp = np.repeat(np.linspace(0, 65535, 64).astype(np.uint16)[None, :], 16, axis=0)
    data = encoded(Image.fromarray(ramp), "PNG")

    decoded = decode_image(data, max_tiles=1)

    pixels = np.asarray(decoded.image)
    assert decoded.image.mode == "RGB"
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[0, -1].tolist() == [255, 255, 255]
    assert 120 <= pixels[0, 32, 0] <= 136


def test_a_greyscale_jpeg_becomes_rgb() -> None:
    decoded = decode_image(encoded(Image.new("L", (64, 64), 200), "JPEG"), max_tiles=1)

    assert decoded.image.mode == "RGB"
    assert is_close(decoded.image.getpixel((10, 10)), (200, 200, 200), tolerance=3)  # type: ignore[arg-type]


# --- size ----------------------------------------------------------------------------------


def test_a_12_megapixel_jpeg_is_decoded_at_the_smallest_scale_that_covers_six_tiles() -> None:
    data = encoded(photo_like(4000, 3000), "JPEG", quality=90)

    decoded = decode_image(data, max_tiles=6)

    # 4:3 is closest to a 3×2 grid, which tiling resizes to 1344×896. libjpeg decodes at 1/2,
    # 1/4 or 1/8 scale; a quarter (1000×750) would have to be enlarged, so half it is, kept as
    # decoded for tiling to resample once.
    assert grid_for(4000, 3000, 6) == (3, 2)
    assert decoded.image.size == (2000, 1500)
    assert decoded.source_size == (4000, 3000)


@pytest.mark.parametrize(
    ("width", "height", "max_tiles"), [(4000, 3000, 6), (3000, 4000, 12), (6000, 2000, 6)]
)
def test_tiles_of_a_large_jpeg_match_internvls_own_preprocessing(
    width: int, height: int, max_tiles: int
) -> None:
    data = encoded(photo_like(width, height), "JPEG", quality=90)

    values = pixel_values(decode_image(data, max_tiles=max_tiles).image, max_tiles)

    expected = internvl_reference(data, max_tiles)
    assert values.shape == expected.shape  # the same grid, so the same number of tiles
    # Decoding at reduced scale and resampling once from there lands on average 0.005-0.009
    # from InternVL's full-size pipeline on these photos, about what JPEG compression at
    # quality 90 moves InternVL's own input (next test), and under a grey level in every
    # tile; a tile out of place or cut from the wrong part of the photo is off by 0.3 or more.
    differences = np.abs(values - expected)
    assert differences.mean() < 0.6 * ONE_STEP
    assert differences.mean(axis=(1, 2, 3)).max() < ONE_STEP


def test_a_12_mp_photo_moves_less_from_internvls_input_than_jpeg_compression_moves_it() -> None:
    photo = photo_like(4000, 3000)
    data = encoded(photo, "JPEG", quality=90)

    values = pixel_values(decode_image(data, max_tiles=6).image, 6)

    expected = internvl_reference(data, 6)
    lossless = internvl_reference(encoded(photo, "PNG", compress_level=1), 6)
    # The yardstick for "the same picture": the phone's own JPEG compression, which the model
    # sees in every photo anyway (measured 0.0084 here; dishbot's shortcuts 0.0051).
    assert np.abs(values - expected).mean() < np.abs(lossless - expected).mean()


def test_shrinking_a_large_photo_barely_changes_what_the_model_sees() -> None:
    original = photo_like(3000, 2000)
    decoded = decode_image(encoded(original, "PNG"), max_tiles=6)

    shrunk = pixel_values(decoded.image, 6)
    full = pixel_values(original, 6)

    assert decoded.image.size < original.size
    assert shrunk.shape == full.shape
    assert float(np.abs(shrunk - full).mean()) < 0.02


def test_a_small_photo_is_never_enlarged() -> None:
    decoded = decode_image(encoded(photo_like(300, 200), "JPEG"), max_tiles=12)

    assert decoded.image.size == (300, 200)


@pytest.mark.parametrize(
    ("width", "height", "max_tiles"),
    [(1280, 1024, 6), (5000, 4000, 6), (2560, 1600, 12), (4032, 3024, 12), (1000, 9000, 6)],
)
def test_a_shrunk_photo_is_cut_into_the_same_grid_as_the_original(
    width: int, height: int, max_tiles: int
) -> None:
    data = encoded(Image.new("RGB", (width, height), GREY), "JPEG")

    decoded = decode_image(data, max_tiles=max_tiles)

    assert grid_for(*decoded.image.size, max_tiles) == grid_for(width, height, max_tiles)


# --- tiling --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "max_tiles", "grid"),
    [
        (800, 800, 1, (1, 1)),
        (800, 800, 6, (2, 2)),  # a tie with 1×1, won by the larger grid for a large image
        (300, 300, 6, (1, 1)),  # the same tie, kept small for a small image
        (1600, 800, 6, (2, 1)),
        (800, 1600, 6, (1, 2)),
        (400, 4000, 6, (1, 6)),
        (400, 4000, 12, (1, 10)),
        (4000, 3000, 6, (3, 2)),
        (4000, 3000, 12, (4, 3)),
        (1920, 1080, 6, (2, 1)),
    ],
)
def test_the_tile_grid_follows_internvls_closest_aspect_ratio_rule(
    width: int, height: int, max_tiles: int, grid: tuple[int, int]
) -> None:
    assert grid_for(width, height, max_tiles) == grid


def test_one_tile_means_no_thumbnail() -> None:
    tiles = tile_image(photo_like(600, 500), max_tiles=1)

    assert [tile.size for tile in tiles] == [(TILE_SIZE, TILE_SIZE)]


def test_several_tiles_come_in_row_major_order_followed_by_a_thumbnail() -> None:
    # Four quadrants of different colours on a 2×2 grid.
    image = Image.new("RGB", (896, 896), RED)
    draw = ImageDraw.Draw(image)
    draw.rectangle((448, 0, 895, 447), fill=GREEN)
    draw.rectangle((0, 448, 447, 895), fill=BLUE)
    draw.rectangle((448, 448, 895, 895), fill=GREY)

    tiles = tile_image(image, max_tiles=4)

    assert len(tiles) == 5
    assert all(tile.size == (TILE_SIZE, TILE_SIZE) for tile in tiles)
    centres = [tile.getpixel((224, 224)) for tile in tiles[:4]]
    assert centres == [RED, GREEN, BLUE, GREY]
    thumbnail = tiles[4]
    assert [thumbnail.getpixel(point) for point in [(50, 50), (400, 50), (50, 400)]] == [
        RED,
        GREEN,
        BLUE,
    ]


def test_a_wide_photo_is_cut_into_two_tiles_and_a_thumbnail() -> None:
    tiles = tile_image(photo_like(1600, 800), max_tiles=6)

    assert len(tiles) == 3


@pytest.mark.parametrize(
    ("width", "height", "max_tiles"),
    [(2000, 1500, 6), (3001, 2251, 6), (700, 700, 12), (1000, 300, 6), (37, 1001, 12)],
)
def test_tiles_resampled_band_by_band_are_cuts_of_the_grid_resized_whole(
    width: int, height: int, max_tiles: int
) -> None:
    image = photo_like(width, height)

    tiles = tile_image(image, max_tiles=max_tiles)

    columns, rows = grid_for(width, height, max_tiles)
    grid_size = (columns * TILE_SIZE, rows * TILE_SIZE)
    grid = np.asarray(image.resize(grid_size, Image.Resampling.BICUBIC))
    for index, tile in enumerate(tiles[: columns * rows]):
        row, column = divmod(index, columns)
        top, left = row * TILE_SIZE, column * TILE_SIZE
        cut = grid[top : top + TILE_SIZE, left : left + TILE_SIZE]
        # Pillow's box resamples from the pixels around a band too: no seams, at most a
        # rounding of one 8-bit step where a band's edge is not a whole source pixel.
        difference = np.abs(np.asarray(tile, dtype=np.int16) - cut)
        assert difference.max() <= 1
        assert (difference > 0).mean() < 0.001


def test_tiling_in_threads_gives_exactly_the_same_pixel_values() -> None:
    image = photo_like(2000, 1500)

    one_thread = pixel_values(image, max_tiles=6, threads=1)

    for threads in (2, 3, 8):
        np.testing.assert_array_equal(pixel_values(image, max_tiles=6, threads=threads), one_thread)


def test_pixel_values_are_the_normalised_tiles_channels_first() -> None:
    image = photo_like(1000, 700)

    values = pixel_values(image, max_tiles=6)

    tiles = tile_image(image, max_tiles=6)
    expected = np.stack(
        [
            (np.asarray(tile, dtype=np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
            for tile in tiles
        ]
    ).transpose(0, 3, 1, 2)
    assert values.dtype == np.float32
    assert values.shape == (len(tiles), 3, TILE_SIZE, TILE_SIZE)
    np.testing.assert_allclose(values, expected, atol=1e-5)


def test_a_white_image_normalises_to_one_minus_mean_over_std() -> None:
    values = pixel_values(Image.new("RGB", (448, 448), (255, 255, 255)), max_tiles=6)

    assert values.shape == (1, 3, TILE_SIZE, TILE_SIZE)
    for channel in range(3):
        expected = (1 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        np.testing.assert_allclose(values[0, channel], expected, rtol=1e-5)


def test_jpeg_encoding_for_remote_backends_round_trips() -> None:
    image = photo_like(500, 300)

    data = encode_jpeg(image)

    decoded = decode_image(data, max_tiles=6)
    assert decoded.source_format == "JPEG"
    assert decoded.image.size == (500, 300)


# --- off the event loop --------------------------------------------------------------------


async def test_load_image_decodes_in_a_worker_thread_while_the_event_loop_keeps_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop_thread = threading.get_ident()
    loop_ran_meanwhile = threading.Event()
    decoding_threads: list[int] = []
    real_decode = decode_image

    def observed_decode(data: bytes, **limits: int) -> DecodedImage:
        decoding_threads.append(threading.get_ident())
        # Only a decode off the loop can see the loop run a callback before it finishes;
        # the timeout just keeps a regression from hanging the suite.
        loop_ran_meanwhile.wait(timeout=10)
        return real_decode(data, **limits)

    monkeypatch.setattr("engine.images.decode_image", observed_decode)
    asyncio.get_running_loop().call_soon(loop_ran_meanwhile.set)

    decoded = await load_image(encoded(photo_like(320, 240), "JPEG"), max_tiles=6)

    assert isinstance(decoded, DecodedImage)
    assert decoded.image.size == (320, 240)
    assert decoding_threads
    assert decoding_threads[0] != loop_thread
    assert loop_ran_meanwhile.is_set()


async def test_load_image_refuses_bad_data_like_decode_image() -> None:
    with pytest.raises(BadImage, match="the file is empty"):
        await load_image(b"", max_tiles=6)


@pytest.fixture
def pillow_blocks() -> Iterator[None]:
    """Pillow's block cache is process-wide: put back what it was after the test."""
    before = _imaging.get_blocks_max()
    yield
    _imaging.set_blocks_max(before)


@pytest.mark.usefixtures("pillow_blocks")
def test_freed_image_memory_is_kept_for_the_next_photo() -> None:
    data = encoded(photo_like(2000, 1500), "JPEG", quality=90)
    _imaging.set_blocks_max(0)

    keep_image_memory()
    _imaging.reset_stats()
    for _ in range(3):
        decode_image(data, max_tiles=6)

    assert _imaging.get_blocks_max() == KEPT_IMAGE_BLOCKS
    # The second and third photos were decoded into the memory the first one gave back.
    assert _imaging.get_stats()["reused_blocks"] >= 2


@pytest.mark.usefixtures("pillow_blocks")
def test_a_larger_block_cache_set_by_the_operator_is_left_as_it_is() -> None:
    _imaging.set_blocks_max(KEPT_IMAGE_BLOCKS + 10)

    keep_image_memory()

    assert _imaging.get_blocks_max() == KEPT_IMAGE_BLOCKS + 10
    with pytest.raises(ValueError, match="negative"):
        keep_image_memory(-1)
