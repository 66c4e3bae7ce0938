"""Image ingest: dishbot's decode-and-tile path against the naive one, on a 12 MP photo.

Run by hand: ``python bench/image_ingest.py [--runs N]``. It writes a photo-like 4000×3000
JPEG (quality 90), then measures each path in its own fresh Python process:

* ``dishbot``: what the transformers backend does with a photo: `decode_image` (draft-mode
  JPEG decoding at half scale, the smallest libjpeg scale that still covers six tiles), then
  `torch_pixels.pixel_values` (the tile grid resampled once with torch's vectorised 8-bit
  bicubic, the thumbnail from the grid), with Pillow keeping freed image memory
  (`keep_image_memory`, as the engine sets when it starts).
* ``dishbot-1-thread``: the same with torch on one thread, which is what a busy machine gives.
* ``dishbot-numpy``: `engine.images.pixel_values`, the numpy/Pillow tiling for installs
  without torch (bands resampled by Pillow on two threads).
* ``naive``: what InternVL's reference code does: ``Image.open(...).convert("RGB")`` at full
  size, resize to the tile grid, crop each tile, thumbnail from the full image, and
  normalise tile by tile.
* Two more for attribution only: ``naive+kept-memory``, the naive path with Pillow keeping
  freed memory as dishbot's does, showing what that setting alone is worth; and
  ``full+fast-tiles``, the full-size decode with dishbot's tiling, showing how much of the
  gain is the decoding rather than the tiling.

Every worker imports torch first, as the serving process has before any photo arrives.
Time is the median of several runs after a warm-up. Peak memory is the growth of the
process's peak resident set size (``ru_maxrss``) during the first run, in a process that
has done nothing but import and read the file: Pillow and numpy allocate outside Python's
allocator, so ``tracemalloc`` would miss most of the pixels, while ``ru_maxrss`` sees every
page the process touched. A fresh process per path keeps one path's high-water mark from
hiding the other's. The last line is ``name=value`` pairs for scripts.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, ImageDraw

from engine.backends import torch_pixels
from engine.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TILE_SIZE,
    decode_image,
    grid_for,
    keep_image_memory,
    pixel_values,
)

MAX_TILES = 6
PHOTO_SIZE = (4000, 3000)


def make_photo_jpeg(path: Path) -> None:
    """A 12 MP photo-like JPEG: gradients, shapes and sensor-like noise, quality 90."""
    width, height = PHOTO_SIZE
    rng = np.random.default_rng(0)
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    pixels = np.empty((height, width, 3), dtype=np.float32)
    pixels[..., 0] = 180 * x + 60 * y
    pixels[..., 1] = 120 + 90 * np.sin(9 * x + 4 * y)
    pixels[..., 2] = 200 * y * (1 - x) + 30
    # Noise defeats the JPEG encoder's easy wins, as real sensor noise and texture do.
    pixels += rng.normal(0.0, 6.0, size=(height, width, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        left, top = int(rng.integers(0, width - 600)), int(rng.integers(0, height - 600))
        size = int(rng.integers(100, 600))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.ellipse((left, top, left + size, top + size), fill=colour)
    image.save(path, format="JPEG", quality=90)


def dishbot_path(data: bytes) -> npt.NDArray[np.float32]:
    """dishbot as the transformers backend runs it: reduced-scale decode, then torch tiling."""
    decoded = decode_image(data, max_tiles=MAX_TILES)
    return torch_pixels.pixel_values(decoded.image, MAX_TILES).numpy()


def dishbot_numpy_path(data: bytes) -> npt.NDArray[np.float32]:
    """dishbot without torch: the same decode, then the numpy/Pillow tiling on two threads."""
    decoded = decode_image(data, max_tiles=MAX_TILES)
    return pixel_values(decoded.image, MAX_TILES)


def naive_path(data: bytes) -> npt.NDArray[np.float32]:
    """InternVL's reference pipeline, with numpy standing in for torchvision."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    columns, rows = grid_for(image.width, image.height, MAX_TILES)
    resized = image.resize((columns * TILE_SIZE, rows * TILE_SIZE), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * TILE_SIZE, r * TILE_SIZE, (c + 1) * TILE_SIZE, (r + 1) * TILE_SIZE))
        for r in range(rows)
        for c in range(columns)
    ]
    if len(tiles) > 1:
        tiles.append(image.resize((TILE_SIZE, TILE_SIZE), Image.Resampling.BICUBIC))
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    normalised = [
        ((np.asarray(tile, dtype=np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
        for tile in tiles
    ]
    return np.stack(normalised)


def full_decode_fast_tiles_path(data: bytes) -> npt.NDArray[np.float32]:
    """Full-size decode, dishbot's tiling: isolates what reduced-scale decoding buys."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return torch_pixels.pixel_values(image, MAX_TILES).numpy()


PATHS: dict[str, Callable[[bytes], npt.NDArray[np.float32]]] = {
    "dishbot": dishbot_path,
    "dishbot-1-thread": dishbot_path,
    "dishbot-numpy": dishbot_numpy_path,
    "naive": naive_path,
    "naive+kept-memory": naive_path,
    "full+fast-tiles": full_decode_fast_tiles_path,
}
# How each worker's process is set up before it measures: what the serving process has done.
KEEPS_IMAGE_MEMORY = frozenset(PATHS) - {"naive"}
ONE_TORCH_THREAD = frozenset({"dishbot-1-thread"})


def max_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure_in_this_process(name: str, photo: Path, runs: int) -> dict[str, float]:
    """Peak memory of the first run, then the median time of ``runs`` more after a warm-up."""
    data = photo.read_bytes()
    path = PATHS[name]
    if name in KEEPS_IMAGE_MEMORY:
        keep_image_memory()
    if name in ONE_TORCH_THREAD:
        torch.set_num_threads(1)
    baseline = max_rss_bytes()
    result = path(data)
    peak_growth = max_rss_bytes() - baseline
    del result
    path(data)  # warm-up: caches, lazily loaded plugins
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        path(data)
        times.append(time.perf_counter() - start)
    return {
        "median_ms": statistics.median(times) * 1000,
        "min_ms": min(times) * 1000,
        "peak_mb": peak_growth / (1024 * 1024),
    }


def compare_paths(photo: Path) -> dict[str, float]:
    """How many tiles, and how far apart the dishbot and naive pixel values are."""
    data = photo.read_bytes()
    dishbot, naive = dishbot_path(data), naive_path(data)
    # The two paths must feed the model the same thing, or the comparison is meaningless.
    return {"tiles": dishbot.shape[0], "difference": float(np.abs(dishbot - naive).mean())}


def in_fresh_process(*arguments: str) -> dict[str, float]:
    """Run this script with ``arguments`` in a new interpreter and read its JSON answer.

    Linux carries a process's peak RSS across fork and exec, so the parent does no heavy
    work itself (not even making the photo): its peak stays at what the imports cost, which
    the child reaches anyway before measuring.
    """
    completed = subprocess.run(
        [sys.executable, __file__, *arguments], check=True, capture_output=True, text=True
    )
    answer: dict[str, float] = json.loads(completed.stdout.strip().splitlines()[-1])
    return answer


def main() -> None:
    """Build the photo, measure every path in its own process, print a table and a summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9, help="timed runs per path")
    parser.add_argument(
        "--worker", choices=[*PATHS, "make-photo", "compare"], help=argparse.SUPPRESS
    )
    parser.add_argument("--photo", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "make-photo":
        make_photo_jpeg(args.photo)
        print("{}")
    elif args.worker == "compare":
        print(json.dumps(compare_paths(args.photo)))
    elif args.worker:
        print(json.dumps(measure_in_this_process(args.worker, args.photo, args.runs)))
    else:
        run_benchmark(args.runs)


def run_benchmark(runs: int) -> None:
    """The parent: orchestrate the workers and print the results."""
    with tempfile.TemporaryDirectory() as directory:
        photo = Path(directory) / "photo.jpg"
        in_fresh_process("--worker", "make-photo", "--photo", str(photo))
        size_mb = photo.stat().st_size / (1024 * 1024)
        comparison = in_fresh_process("--worker", "compare", "--photo", str(photo))
        results = {
            name: in_fresh_process("--worker", name, "--photo", str(photo), "--runs", str(runs))
            for name in PATHS
        }

    width, height = PHOTO_SIZE
    print(
        f"{width}×{height} JPEG, {size_mb:.1f} MB, max_tiles={MAX_TILES} -> "
        f"{int(comparison['tiles'])} tiles; median of {runs} runs; peak = RSS growth"
    )
    print(
        f"mean |dishbot - naive| pixel value: {comparison['difference']:.4f} "
        "(normalised units, where one 8-bit step is about 0.017)"
    )
    print(f"{'path':<19}{'median ms':>11}{'min ms':>9}{'peak MB':>9}")
    for name, measured in results.items():
        print(
            f"{name:<19}{measured['median_ms']:>11.1f}{measured['min_ms']:>9.1f}"
            f"{measured['peak_mb']:>9.1f}"
        )
    dishbot, one_thread, naive = results["dishbot"], results["dishbot-1-thread"], results["naive"]
    numpy_only = results["dishbot-numpy"]
    summary = {
        "dishbot_ms": f"{dishbot['median_ms']:.1f}",
        "dishbot_1thread_ms": f"{one_thread['median_ms']:.1f}",
        "naive_ms": f"{naive['median_ms']:.1f}",
        "speedup": f"{naive['median_ms'] / dishbot['median_ms']:.2f}",
        "speedup_1thread": f"{naive['median_ms'] / one_thread['median_ms']:.2f}",
        "dishbot_numpy_ms": f"{numpy_only['median_ms']:.1f}",
        "speedup_numpy": f"{naive['median_ms'] / numpy_only['median_ms']:.2f}",
        "speedup_vs_naive_kept_memory": (
            f"{results['naive+kept-memory']['median_ms'] / dishbot['median_ms']:.2f}"
        ),
        "dishbot_peak_mb": f"{dishbot['peak_mb']:.1f}",
        "naive_peak_mb": f"{naive['peak_mb']:.1f}",
        "memory_ratio": f"{naive['peak_mb'] / max(dishbot['peak_mb'], 0.1):.2f}",
    }
    print(" ".join(f"{key}={value}" for key, value in summary.items()))


if __name__ == "__main__":
    main()
