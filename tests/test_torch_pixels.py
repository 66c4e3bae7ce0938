"""The transformers backend's tiling in torch gives the model what the numpy/Pillow tiling
gives it: the same tiles in the same order, within two grey levels of each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.backends import torch_pixels
from engine.images import IMAGENET_MEAN, IMAGENET_STD, TILE_SIZE, decode_image, pixel_values
from tests.test_images import BLUE, RED, encoded, internvl_reference, photo_like

# One grey level in normalised units is 1 / (255 × std): 0.017 for red, 0.0175 for blue.
LARGEST_STEP = 1 / (255 * min(IMAGENET_STD))
SMALLEST_STEP = 1 / (255 * max(IMAGENET_STD))


def tiling_differences(image: Image.Image, max_tiles: int) -> np.ndarray:
    """How far torch's tiles are from numpy's, in normalised units; same shape, same type."""
    from_torch = torch_pixels.pixel_values(image, max_tiles)
    from_numpy = pixel_values(image, max_tiles)
    assert from_torch.dtype == torch.float32
    assert tuple(from_torch.shape) == from_numpy.shape
    return np.abs(from_torch.numpy() - from_numpy)


@pytest.mark.parametrize(
    ("width", "height", "max_tiles"),
    [
        (2000, 1500, 6),  # a 12 MP photo as draft decoding leaves it: shrunk to 3×2 tiles
        (300, 200, 6),  # a small photo: enlarged to its grid
        (1000, 300, 6),  # enlarged one way, shrunk the other
        (448, 448, 1),  # exactly one tile: nothing to resample
        (37, 1001, 12),  # tall and thin
        (5, 3, 6),
    ],
)
def test_torch_tiles_are_numpys_tiles_within_two_grey_levels(
    width: int, height: int, max_tiles: int
) -> None:
    differences = tiling_differences(photo_like(width, height), max_tiles)

    # Both are Pillow's bicubic filter and round differently now and then, by a level or two
    # (measured: under 0.6% of the values here); a tile out of place would differ everywhere.
    assert differences.max() <= 2 * LARGEST_STEP + 1e-5
    assert (differences > 0.5 * SMALLEST_STEP).mean() < 0.01


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 700),
    height=st.integers(1, 700),
    max_tiles=st.integers(1, 12),
    seed=st.integers(0, 3),
)
def test_any_size_is_tiled_like_numpy_tiles_it(
    width: int, height: int, max_tiles: int, seed: int
) -> None:
    differences = tiling_differences(photo_like(width, height, seed), max_tiles)

    # Enlarged one way and shrunk the other, the two filters round the in-between image
    # differently: one level on up to a sixth of the values, a few levels here and there
    # (measured up to 4). Still the same picture: the mean stays under a fifth of a level.
    assert differences.max() <= 6 * LARGEST_STEP
    assert differences.mean() < 0.2 * SMALLEST_STEP


def test_torch_tiles_of_a_large_jpeg_match_internvls_own_preprocessing() -> None:
    data = encoded(photo_like(4000, 3000), "JPEG", quality=90)

    values = torch_pixels.pixel_values(decode_image(data, max_tiles=6).image, 6).numpy()

    expected = internvl_reference(data, 6)
    assert values.shape == expected.shape == (7, 3, TILE_SIZE, TILE_SIZE)
    # The same bounds the numpy tiling is held to against InternVL's full-size pipeline.
    differences = np.abs(values - expected)
    assert differences.mean() < 0.6 * SMALLEST_STEP
    assert differences.mean(axis=(1, 2, 3)).max() < SMALLEST_STEP


def test_tiles_come_in_row_major_order_then_the_thumbnail() -> None:
    image = Image.new("RGB", (2 * TILE_SIZE, TILE_SIZE), RED)
    image.paste(BLUE, (TILE_SIZE, 0, 2 * TILE_SIZE, TILE_SIZE))

    values = torch_pixels.pixel_values(image, max_tiles=2)

    def normalised(colour: tuple[int, int, int]) -> torch.Tensor:
        channels = (np.asarray(colour) / 255 - IMAGENET_MEAN) / IMAGENET_STD
        return torch.tensor(channels, dtype=torch.float32)

    assert values.shape == (3, 3, TILE_SIZE, TILE_SIZE)
    # The middle of each tile, away from where the filter blends red into blue.
    centre = TILE_SIZE // 2
    assert torch.allclose(values[0, :, centre, centre], normalised(RED), atol=1e-5)
    assert torch.allclose(values[1, :, centre, centre], normalised(BLUE), atol=1e-5)
    # The thumbnail squeezes both halves into one tile: red on its left, blue on its right.
    assert torch.allclose(values[2, :, centre, TILE_SIZE // 8], normalised(RED), atol=1e-5)
    assert torch.allclose(values[2, :, centre, TILE_SIZE - 8], normalised(BLUE), atol=1e-5)


def test_one_tile_means_no_thumbnail() -> None:
    values = torch_pixels.pixel_values(photo_like(600, 500), max_tiles=1)

    assert values.shape == (1, 3, TILE_SIZE, TILE_SIZE)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_images_that_are_not_rgb_are_tiled_as_their_rgb_version(mode: str) -> None:
    image = photo_like(900, 500).convert(mode)

    values = torch_pixels.pixel_values(image, max_tiles=4)

    expected = torch_pixels.pixel_values(image.convert("RGB"), max_tiles=4)
    assert torch.equal(values, expected)
