"""Static batching on the transformers backend: 8 photo questions as one batch vs one by one.

Run by hand from the repository root: ``python bench/transformers_batching.py``.

A small random InternVL (built by `tests.tiny_model`, larger than the tests' one) answers the
same 8 requests, each one photo (one tile), both ways:

* batched: one `TransformersBackend.generate` call with all 8 jobs (one ``model.generate``);
* sequential: 8 `generate` calls of one job each, one after another.

To be fair every request generates exactly ``--new-tokens`` tokens either way: decoding is
greedy and the end-of-turn and padding tokens are suppressed (their logits set to -inf), so
no answer ends early; the script checks that every job finished with ``"length"``. Each mode
is warmed up once, then timed ``--repeats`` times, the two modes interleaved; the table shows
the medians. The last line is ``name=value`` pairs for scripts. It takes about 20 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.tiny_model

import torch
from PIL import Image

from engine.backends.transformers import TransformersBackend, TransformersConfig
from engine.images import DecodedImage
from engine.prompts import DISHBOT_SYSTEM_PROMPT
from engine.types import GenerationJob, GenerationParams, JobFailed, JobFinished, ModelSpec
from tests.tiny_model import build_tiny_internvl

QUESTIONS = (
    "What dish is this?",
    "这是什么菜？",
    "Is it spicy?",
    "辣不辣？",
    "How is it made?",
    "怎么做的？",
    "What are the ingredients?",
    "有哪些配料？",
)
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "white")


def make_jobs(count: int, new_tokens: int) -> list[GenerationJob]:
    """``count`` one-photo questions, each asking for ``new_tokens`` greedy tokens."""
    jobs = []
    for n in range(count):
        size = (448 + 32 * n, 448)
        image = DecodedImage(Image.new("RGB", size, COLOURS[n % len(COLOURS)]), "PNG", size)
        jobs.append(
            GenerationJob(
                images=(image,),
                history=(),
                question=QUESTIONS[n % len(QUESTIONS)],
                system_prompt=DISHBOT_SYSTEM_PROMPT,
                params=GenerationParams(max_new_tokens=new_tokens),
                max_tiles=1,
            )
        )
    return jobs


def suppress_end_of_answer(backend: TransformersBackend) -> None:
    """Make every answer run to its full length, whatever the random weights say."""
    loaded = backend._loaded  # a benchmark may reach inside; the backend offers no such knob
    assert loaded is not None
    stop_ids = sorted(loaded.stop_token_ids)

    def hook(module: torch.nn.Module, args: Any, logits: torch.Tensor) -> torch.Tensor:
        logits[..., stop_ids] = float("-inf")
        return logits

    loaded.model.lm_head.register_forward_hook(hook)


async def serve(backend: TransformersBackend, batches: Sequence[Sequence[GenerationJob]]) -> float:
    """Serve ``batches`` one after another; return the seconds it took."""
    started = time.perf_counter()
    for batch in batches:
        async for event in backend.generate(batch):
            if isinstance(event, JobFinished) and event.finish_reason != "length":
                raise AssertionError(f"job {event.index} ended early: {event.finish_reason}")
            if isinstance(event, JobFailed):
                raise AssertionError(f"job {event.index} failed: {event.error}")
    return time.perf_counter() - started


async def measure(model_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    backend = TransformersBackend(TransformersConfig(device="cpu", max_batch_size=args.requests))
    await backend.load(ModelSpec(path=str(model_dir), name="bench"))
    suppress_end_of_answer(backend)
    jobs = make_jobs(args.requests, args.new_tokens)
    modes = {"batched": [jobs], "sequential": [[job] for job in jobs]}
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for batches in modes.values():  # warm-up: first calls pay one-off costs
        await serve(backend, batches)
    for _ in range(args.repeats):
        for mode, batches in modes.items():  # interleaved, so load changes hit both alike
            seconds[mode].append(await serve(backend, batches))
    await backend.close()
    tokens = args.requests * args.new_tokens
    result: dict[str, float] = {}
    for mode, times in seconds.items():
        median = statistics.median(times)
        result[f"{mode}_s"] = median
        result[f"{mode}_tok_s"] = tokens / median
        result[f"{mode}_req_s"] = args.requests / median
    result["speedup"] = result["batched_tok_s"] / result["sequential_tok_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    # One torch thread by default: on a small shared box (2 cores, other processes running)
    # two intra-op threads stall on each other and made both modes ~10x slower in our runs.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        # 448 / 28 = 16 patches a side: 64 image tokens a tile, a quarter of InternVL3's 256.
        model_dir = build_tiny_internvl(
            Path(tmp) / "model",
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            vision_hidden_size=64,
            vision_layers=2,
            patch_size=28,
        )
        result = asyncio.run(measure(model_dir, args))

    tokens = args.requests * args.new_tokens
    print(
        f"\n{args.requests} requests x 1 photo x {args.new_tokens} new tokens, greedy, "
        f"hidden {args.hidden_size} x {args.layers} layers, {args.threads} CPU threads, "
        f"median of {args.repeats}"
    )
    print(f"{'mode':<24}{'seconds':>10}{'tokens/s':>12}{'requests/s':>12}")
    for mode, label in (("batched", f"one batch of {args.requests}"), ("sequential", "one by one")):
        print(
            f"{label:<24}{result[f'{mode}_s']:>10.2f}{result[f'{mode}_tok_s']:>12.1f}"
            f"{result[f'{mode}_req_s']:>12.2f}"
        )
    print(f"batched / one by one: {result['speedup']:.2f}x throughput ({tokens} tokens each way)")
    print(
        f"batched_tok_s={result['batched_tok_s']:.1f}"
        f" sequential_tok_s={result['sequential_tok_s']:.1f}"
        f" batched_req_s={result['batched_req_s']:.3f}"
        f" sequential_req_s={result['sequential_req_s']:.3f} speedup={result['speedup']:.2f}"
    )


if __name__ == "__main__":
    main()
