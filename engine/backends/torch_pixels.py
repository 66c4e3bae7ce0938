"""InternVL pixel values made with torch, for the backends that already run it.

The same tiles, in the same order and layout, as `engine.images.pixel_values`: the photo
resized once to the whole tile grid with BICUBIC, cut in row-major order, a thumbnail of the
grid when there is more than one tile, ImageNet normalisation, channels first. Only the
resampling differs: torch's antialiased bicubic on 8-bit channels-last pixels, which is
vectorised (AVX2) and was written to reproduce Pillow's filter (a = -0.5, the support
widened by the shrink factor). Shrinking a photo, it lands within 2 of 255 levels of Pillow's
on under 1% of the values; enlarging one way while shrinking the other, it rounds the
in-between image differently, one level on up to a sixth of the values (the mean stays
under a fifth of a level; `tests/test_torch_pixels.py` holds it to both). It takes about a
quarter of Pillow's time, which on a 12 MP photo is most of what tiling costs.

Importing this module imports torch; `engine.images` stays free of it for the backends that
never need model inputs (lmdeploy tiles by itself, the OpenAI-compatible one sends JPEG).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image

from engine import images

# Below this many pixels on a side, torch's filter strays from Pillow's where a sliver is
# both enlarged one way and shrunk the other (up to 22 levels on a 2-pixel-wide image, a few
# from 10 pixels up). Such an image costs nothing to tile with Pillow anyway.
MIN_SIDE_FOR_TORCH = 32

# torch warns, once per process, that a tensor over Pillow's read-only bytes could be written
# to. These tensors are only ever read (every resize writes a new one), so the one warning is
# spent here, where nothing else can be running yet, rather than in the log at the first photo.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    torch.frombuffer(b"\0", dtype=torch.uint8)

_SCALE = torch.from_numpy(images.PIXEL_SCALE).view(1, 3, 1, 1)
_OFFSET = torch.from_numpy(images.PIXEL_OFFSET).view(1, 3, 1, 1)


def pixel_values(
    image: Image.Image, max_tiles: int, tile_size: int = images.TILE_SIZE
) -> torch.Tensor:
    """The model input for ``image``: float32 (tiles, 3, tile_size, tile_size) on the CPU.

    Tiles as InternVL's ``dynamic_preprocess`` cuts them (see `engine.images.tile_image`),
    then a thumbnail when there is more than one, normalised with the ImageNet mean and
    standard deviation. The thumbnail is shrunk from the grid rather than from the photo:
    fewer pixels to read for the same picture, as in `engine.images.pixel_values`.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if min(rgb.size) < MIN_SIDE_FOR_TORCH:
        return torch.from_numpy(images.pixel_values(rgb, max_tiles, tile_size))
    columns, rows = images.grid_for(rgb.width, rgb.height, max_tiles, tile_size)
    grid = _bicubic(_channels_last(rgb), rows * tile_size, columns * tile_size)
    count = columns * rows
    # numpy asks the kernel for huge pages for large arrays, so the 17 MB of a six-tile
    # photo costs a few page faults rather than thousands; torch shares the memory.
    shape = (count + (count > 1), 3, tile_size, tile_size)
    out = torch.from_numpy(np.empty(shape, dtype=np.float32))
    # (3, rows·tile, columns·tile) → (rows, columns, 3, tile, tile): tiles in row-major order.
    tiles = grid[0, :3].view(3, rows, tile_size, columns, tile_size).permute(1, 3, 0, 2, 4)
    _normalise(tiles, out[:count].view(rows, columns, 3, tile_size, tile_size))
    if count > 1:
        _normalise(_bicubic(grid, tile_size, tile_size)[:, :3], out[count:])
    return out


def _channels_last(image: Image.Image) -> torch.Tensor:
    """An RGB image's pixels as an 8-bit (1, 4, height, width) tensor, channels last.

    RGBX is how Pillow holds RGB in memory, so this is a copy rather than a repacking, and
    torch's vectorised 8-bit resampling works on four channels as they are (with three it
    unpacks them first); the padding channel is dropped after resampling.
    """
    data = image.tobytes("raw", "RGBX")
    pixels = torch.frombuffer(data, dtype=torch.uint8)
    return pixels.view(1, image.height, image.width, 4).permute(0, 3, 1, 2)


def _bicubic(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """8-bit (1, channels, h, w) pixels resized to ``height``×``width`` as Pillow's BICUBIC."""
    if pixels.shape[-2:] == (height, width):
        return pixels
    return torch.nn.functional.interpolate(
        pixels, size=(height, width), mode="bicubic", antialias=True
    )


def _normalise(pixels: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` = 8-bit ``pixels`` (..., 3, h, w) with ImageNet normalisation, in two passes."""
    # Multiplying straight from uint8 into out converts and scales in one pass.
    torch.mul(pixels, _SCALE, out=out)
    out.sub_(_OFFSET)
