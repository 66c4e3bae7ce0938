"""Stand-in for ``python -m xtuner.tools.train`` (XTuner 0.2.0): see ../../README.md.

The arguments are XTuner's; the files and log lines are mmengine 0.10.6's
(``runner/log_processor.py``, ``hooks/logger_hook.py``, ``hooks/checkpoint_hook.py``,
``visualization/vis_backend.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from xtuner._standin import config_settings, record

LOG_INTERVAL = 10  # the recipe's LoggerHook(interval=10)
OOM_MESSAGE = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.53 GiB. GPU 0 has a "
    "total capacity of 79.15 GiB of which 1.07 GiB is free. Including non-PyTorch memory, "
    "this process has 78.07 GiB memory in use. Of the allocated memory 75.10 GiB is allocated "
    "by PyTorch, and 1.43 GiB is reserved by PyTorch but unallocated. If reserved but "
    "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
    "to avoid fragmentation.  See documentation for Memory Management  "
    "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train LLM")
    parser.add_argument("config")
    parser.add_argument("--work-dir")
    parser.add_argument("--deepspeed", type=str, default=None)
    parser.add_argument("--resume", type=str, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--cfg-options", nargs="+", default=[])
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    return parser.parse_args()


def option_value(text: str) -> Any:
    """A --cfg-options value as mmengine's DictAction reads a scalar."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def log(message: str) -> None:
    stamp = time.strftime("%m/%d %H:%M:%S")
    print(f"{stamp} - mmengine - INFO - {message}", flush=True)


def out_of_memory() -> None:
    print("Traceback (most recent call last):", file=sys.stderr)
    print('  File "xtuner/tools/train.py", line 360, in <module>', file=sys.stderr)
    print("    main()", file=sys.stderr)
    print(OOM_MESSAGE, file=sys.stderr, flush=True)
    sys.exit(1)


def crash() -> None:
    print("Traceback (most recent call last):", file=sys.stderr)
    print('  File "xtuner/dataset/internvl_dataset.py", line 318, in __getitem__', file=sys.stderr)
    print("RuntimeError: stand-in crash: the data loader failed", file=sys.stderr, flush=True)
    sys.exit(1)


def hang(work_dir: Path) -> None:
    # A data loader worker in the same process group, as a real run has.
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    iteration = 0
    while True:
        iteration += 1
        log(f"Iter(train) [{iteration}/1000000]  lr: 1.0000e-05  loss: 1.0000")
        time.sleep(0.2)


def main() -> None:
    args = parse_args()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = Path(args.config)
    work_dir = Path(args.work_dir or Path("work_dirs") / config.stem).absolute()
    record(work_dir / f"standin-train-rank{rank}.json")
    if rank != 0:
        return  # only rank 0 writes logs and checkpoints, as mmengine's main process does

    settings = config_settings(config)
    options = {
        key: option_value(value) for key, value in (o.split("=", 1) for o in args.cfg_options)
    }
    batch = options.get("train_dataloader.batch_size", settings["batch_size"])
    accumulation = options.get("optim_wrapper.accumulative_counts", settings["accumulative_counts"])
    failure = os.environ.get("XTUNER_STANDIN_FAIL", "")
    per_iteration_s = float(os.environ.get("XTUNER_STANDIN_ITER_S", "0"))

    timestamp = time.strftime("%Y%m%d_%H%M%S")
    log_dir = work_dir / timestamp
    vis_dir = log_dir / "vis_data"
    vis_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config, work_dir / config.name)  # mmengine dumps the config it ran
    log(f"Config:\nbatch_size = {batch}\naccumulative_counts = {accumulation}")

    if failure == "hang":
        hang(work_dir)
    if failure == "oom_always" or (failure == "oom" and batch > 1):
        out_of_memory()
    if failure == "oom_caught":  # a worker's OOM that was caught: training goes on
        print(f"Warning: caught {OOM_MESSAGE}", file=sys.stderr, flush=True)

    with open(settings["data_path"], encoding="utf-8") as data:
        samples = sum(1 for line in data if line.strip())
    group = batch * accumulation
    max_iters = settings["max_epochs"] * math.ceil(samples / world / group) * accumulation
    save_steps = settings.get("save_steps", 500)
    keep = settings.get("save_total_limit", -1)

    saved: list[Path] = []
    started = time.monotonic()
    for iteration in range(1, max_iters + 1):
        time.sleep(per_iteration_s)
        if failure == "crash" and iteration == 3:
            crash()
        if iteration % LOG_INTERVAL == 0 or iteration == max_iters:
            elapsed = time.monotonic() - started
            seconds = elapsed / iteration
            loss = 2.0 / (1 + iteration / 10)
            lr = settings.get("lr", 3e-5) * min(1.0, iteration / 10)
            log_iteration(vis_dir, timestamp, iteration, max_iters, seconds, loss, lr)
        if (iteration % save_steps == 0 or iteration == max_iters) and failure != "no_checkpoint":
            saved.append(save_checkpoint(work_dir, iteration, batch, accumulation))
            if keep > 0:
                for old in saved[:-keep]:
                    old.unlink(missing_ok=True)
                saved = saved[-keep:]


def log_iteration(
    vis_dir: Path,
    timestamp: str,
    iteration: int,
    max_iters: int,
    seconds: float,
    loss: float,
    lr: float,
) -> None:
    eta = datetime.timedelta(seconds=int(seconds * (max_iters - iteration)))
    memory = 15321
    width = len(str(max_iters))
    log(
        f"Iter(train) [{str(iteration).rjust(width)}/{max_iters}]  lr: {lr:.4e}  eta: {eta}  "
        f"time: {seconds:.4f}  data_time: 0.0247  memory: {memory}  loss: {loss:.4f}"
    )
    scalars = {
        "lr": lr,
        "data_time": 0.0247,
        "loss": loss,
        "time": seconds,
        "iter": iteration,
        "memory": memory,
        "step": iteration,
    }
    for name in ("scalars.json", f"{timestamp}.json"):
        with open(vis_dir / name, "a+", encoding="utf-8") as handle:
            json.dump(scalars, handle)
            handle.write("\n")


def save_checkpoint(work_dir: Path, iteration: int, batch: int, accumulation: int) -> Path:
    checkpoint = work_dir / f"iter_{iteration}.pth"
    # A real one is torch.save({'state_dict': ..., 'meta': ...}); nobody here unpickles it.
    meta = {"iter": iteration, "batch_size": batch, "accumulative_counts": accumulation}
    checkpoint.write_text(json.dumps({"meta": meta, "state_dict": {}}), encoding="utf-8")
    log(f"Saving checkpoint at {iteration} iterations")
    # mmengine's CheckpointHook writes the path with no newline.
    (work_dir / "last_checkpoint").write_text(str(checkpoint), encoding="utf-8")
    return checkpoint


if __name__ == "__main__":
    main()
