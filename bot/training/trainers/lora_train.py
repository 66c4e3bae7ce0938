"""dishbot's trainer subprocess: LoRA fine-tuning of an HF-native InternVL on an export.

    python -m bot.training.trainers.lora_train JOB.json

``JOB.json`` (`bot.training.trainers.transformers.LoraJob`) names the export, the base model,
the system prompt the model will be served with and the training settings.

What is trained is what is served: each record's photo is decoded and tiled by the engine's
own code (`engine.images`, `engine.backends.torch_pixels`) with the engine's ``max_tiles``,
and its conversation is rendered and tokenized as the transformers backend renders a prompt
(`engine.prompts`, `engine.backends.transformers`): the system prompt, ChatML, one image
context token per tile token, user text never read as control tokens.

The recipe, measured on a tiny model and following XTuner's: LoRA adapters on every linear
layer of the language model, its output head included (with the head frozen the loss
stalls near chance), and not on the vision tower, which has ``q_proj`` layers too; the
multimodal projector fully trained; the loss on the answers and the ``<|im_end|>`` ending
each (labels unshifted: the model shifts them); AdamW with XTuner's betas, weight decay,
clipping and warm-up and cosine schedule; a fixed seed. float32 on the CPU, where bfloat16
is five times slower; bfloat16 on CUDA.

Progress: one JSON line per iteration (one batch) in ``<work_dir>/progress.jsonl``, in the
shape of XTuner's ``scalars.json``. At the end the adapters are merged into the weights
and the full model is saved with its tokenizer (and the base model's processor and chat
template files) to the output directory, which appears only once complete.

Any error ends the process with status 1 and a last log line saying what went wrong.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    InternVLForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

from bot.training.export.export_dir import IMAGES_DIR
from bot.training.export.records import GPT, HUMAN
from bot.training.export.writer import TRAIN_FILE
from bot.training.trainers.transformers import PROGRESS_FILE, LoraJob
from engine.backends import torch_pixels
from engine.backends.transformers import (
    END_OF_TURN_TOKEN,
    control_tokens,
    image_prompt_text,
    image_tokens_per_tile,
    prompt_part_ids,
)
from engine.errors import BadImage
from engine.images import decode_image, grid_for
from engine.prompts import (
    IMAGE_PLACEHOLDER,
    ChatMessage,
    build_messages,
    neutralise_control_tokens,
    render_chatml_parts,
)
from engine.types import Turn

log = logging.getLogger("dishbot.lora_train")

# Label of a token the loss ignores (transformers' convention).
IGNORE_INDEX = -100
# XTuner's InternVL LoRA recipe: AdamW's decay rates and weight decay, the gradient norm
# clipped to, and a linear warm-up from almost zero over this share of the iterations.
ADAM_BETAS = (0.9, 0.999)
WEIGHT_DECAY = 0.05
MAX_GRAD_NORM = 1.0
WARMUP_RATIO = 0.03
WARMUP_START_FACTOR = 1e-5
# Human log lines: every iteration of a short training, else every this many.
LOG_EVERY = 10
# Files beside the weights that make a model directory whole (processor, chat template,
# generation settings), copied from a local base model when the save did not write them.
COMPANION_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")


class TrainingError(Exception):
    """The training cannot go on; the message says where and why."""


@dataclass(frozen=True, slots=True)
class PromptLayout:
    """How the served model's prompts are built: what the backend derives from a checkpoint."""

    tokenizer: Any
    tokens_per_tile: int
    tile_size: int
    image_context_token: str
    control_tokens: tuple[str, ...]
    end_of_turn_id: int
    pad_token_id: int


@dataclass(frozen=True, slots=True)
class Sample:
    """One record, tokenized: ``labels`` are the answers' tokens, IGNORE_INDEX elsewhere."""

    image: Path
    tiles: int
    input_ids: list[int]
    labels: list[int]


def main(argv: Sequence[str] | None = None) -> int:
    """Train the job named on the command line; 0 when the model is saved, else 1 (or 2)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout
    )
    if len(arguments) != 1:
        log.error("usage: python -m bot.training.trainers.lora_train JOB.json")
        return 2
    try:
        job = LoraJob.from_json(Path(arguments[0]).read_text(encoding="utf-8"))
        train(job)
    except Exception as error:
        log.exception("the training failed")
        # The last line of the log, which an admin is shown: what went wrong, in one line.
        log.error("training failed: %s", _first_line(error))
        return 1
    return 0


def train(job: LoraJob) -> None:
    """Fine-tune ``job.base_model`` on the export and save the merged model (see above)."""
    torch.set_num_threads(job.threads)
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    log.info(
        "pid %d, device %s, %s, torch threads %d",
        os.getpid(),
        device,
        str(dtype).removeprefix("torch."),
        torch.get_num_threads(),
    )
    hf_config = AutoConfig.from_pretrained(job.base_model)
    if hf_config.model_type != "internvl":
        raise TrainingError(
            f"{job.base_model} holds a {hf_config.model_type!r} model, not an HF-native InternVL"
        )
    tokenizer = AutoTokenizer.from_pretrained(job.base_model)
    layout = prompt_layout(hf_config, tokenizer)
    samples = read_samples(job, layout)
    # Any: transformers' stubs are too loose to use (as in the transformers backend).
    model: Any = InternVLForConditionalGeneration.from_pretrained(job.base_model, dtype=dtype)
    saved_dtype = _config_dtype(hf_config) or dtype
    model.to(device)
    trained = _with_adapters(model, job)
    _train_loop(trained, samples, layout, job, device, dtype)
    save_model(trained, tokenizer, job, saved_dtype)
    log.info("saved the model to %s", job.output_dir)


def prompt_layout(hf_config: Any, tokenizer: Any) -> PromptLayout:
    """The prompt layout of a checkpoint, as the transformers backend derives it."""
    image_context_token = tokenizer.convert_ids_to_tokens(hf_config.image_token_id)
    if not isinstance(image_context_token, str):
        raise TrainingError(f"the tokenizer has no image token (id {hf_config.image_token_id})")
    end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    if not isinstance(end_of_turn_id, int) or end_of_turn_id == tokenizer.unk_token_id:
        raise TrainingError(f"the tokenizer has no {END_OF_TURN_TOKEN}: it is not a ChatML model")
    pad_token_id = tokenizer.pad_token_id
    return PromptLayout(
        tokenizer=tokenizer,
        tokens_per_tile=image_tokens_per_tile(hf_config),
        tile_size=int(hf_config.vision_config.image_size[0]),
        image_context_token=image_context_token,
        control_tokens=control_tokens(tokenizer),
        end_of_turn_id=end_of_turn_id,
        pad_token_id=int(pad_token_id) if pad_token_id is not None else end_of_turn_id,
    )


# -- data ------------------------------------------------------------------------------------


def read_samples(job: LoraJob, layout: PromptLayout) -> list[Sample]:
    """Every record of the export's train.jsonl that fits in ``max_length``, tokenized.

    Every photo is decoded once here, so a missing or corrupt one stops the training before
    it starts, with the record's line and the photo's name.
    """
    path = job.export_dir / TRAIN_FILE
    if not path.is_file():
        raise TrainingError(f"the export has no {TRAIN_FILE} (looked for {path})")
    samples: list[Sample] = []
    too_long = 0
    with path.open(encoding="utf-8", newline="\n") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                sample = _sample(json.loads(line), job, layout)
            except (ValueError, KeyError, TypeError, BadImage, OSError) as error:
                raise TrainingError(f"{TRAIN_FILE} line {number}: {error}") from error
            if len(sample.input_ids) > job.max_length:
                too_long += 1
                continue
            samples.append(sample)
    if too_long:
        log.warning("left out %d samples longer than %d tokens", too_long, job.max_length)
    if not samples:
        raise TrainingError(f"the export's {TRAIN_FILE} has no sample to train on")
    log.info("%d samples to train on", len(samples))
    return samples


def _sample(record: Any, job: LoraJob, layout: PromptLayout) -> Sample:
    if not isinstance(record, dict):
        raise ValueError("the record is not a JSON object")
    turns = conversation_turns(record["conversations"])
    name = record["image"]
    if not isinstance(name, str) or not name:
        raise ValueError("the record names no image")
    image = job.export_dir / IMAGES_DIR / name
    try:
        data = image.read_bytes()
    except OSError as error:
        raise OSError(f"cannot read the photo {IMAGES_DIR}/{name}: {error.strerror}") from error
    try:
        decoded = decode_image(data, max_tiles=job.max_tiles)
    except BadImage as error:
        raise BadImage(f"the photo {IMAGES_DIR}/{name}: {error}") from error
    tiles = tile_count(decoded.image.width, decoded.image.height, job.max_tiles, layout.tile_size)
    input_ids, labels = conversation_ids(layout, job.system_prompt, turns, tiles)
    return Sample(image=image, tiles=tiles, input_ids=input_ids, labels=labels)


def conversation_turns(conversations: Any) -> list[tuple[str, str]]:
    """A record's (question, answer) turns, the photo's ``<image>`` marker taken out."""
    if not isinstance(conversations, list):
        raise ValueError("conversations is not a list")
    values = [turn["value"] for turn in conversations]
    roles = [turn["from"] for turn in conversations]
    pairs = len(values) // 2  # a trailing question without an answer is not trained on
    if pairs == 0 or roles[: 2 * pairs] != [HUMAN, GPT] * pairs:
        raise ValueError("conversations must alternate human and gpt turns, human first")
    if not all(isinstance(value, str) for value in values):
        raise ValueError("a turn's value is not text")
    first = values[0]
    if not first.startswith(IMAGE_PLACEHOLDER):
        raise ValueError(f"the first question does not start with {IMAGE_PLACEHOLDER}")
    values[0] = first.removeprefix(IMAGE_PLACEHOLDER).removeprefix("\n")
    turns = [(values[2 * n], values[2 * n + 1]) for n in range(pairs)]
    if not all(answer for _, answer in turns):
        raise ValueError("an answer is empty")
    return turns


def tile_count(width: int, height: int, max_tiles: int, tile_size: int) -> int:
    """Tiles the engine cuts a decoded photo of this size into: its grid, and a thumbnail
    when the grid has more than one tile."""
    columns, rows = grid_for(width, height, max_tiles, tile_size)
    return columns * rows + (columns * rows > 1)


def conversation_ids(
    layout: PromptLayout, system_prompt: str, turns: Sequence[tuple[str, str]], tiles: int
) -> tuple[list[int], list[int]]:
    """A conversation's token ids as served, and its labels: each answer and its end."""
    history = [Turn(question, answer) for question, answer in turns[:-1]]
    question, answer = turns[-1]
    messages = build_messages(system_prompt, history, question, 1, layout.control_tokens)
    messages.append(
        ChatMessage("assistant", neutralise_control_tokens(answer, layout.control_tokens))
    )
    image = image_prompt_text(layout.image_context_token, layout.tokens_per_tile * tiles)
    # The rendering ends with an open assistant turn, the one served; here it is answered.
    parts = render_chatml_parts(messages, image_text=lambda _: image)[:-1]
    # Each message is three parts: its header (with the photo), its text, its end.
    if len(parts) != 3 * len(messages):
        raise TrainingError("the chat template no longer renders a message as three parts")
    input_ids: list[int] = []
    labels: list[int] = []
    for index, ids in enumerate(prompt_part_ids(layout.tokenizer, parts)):
        input_ids.extend(ids)
        role, position = messages[index // 3].role, index % 3
        if role != "assistant" or position == 0:
            labels.extend([IGNORE_INDEX] * len(ids))
        elif position == 1:
            labels.extend(ids)
        else:  # the end: <|im_end|> is learnt (it stops the answer), the newline is not
            if not ids or ids[0] != layout.end_of_turn_id:
                raise TrainingError(f"an answer does not end with {END_OF_TURN_TOKEN}")
            labels.append(ids[0])
            labels.extend([IGNORE_INDEX] * (len(ids) - 1))
    return input_ids, labels


def epoch_order(count: int, group: int, generator: torch.Generator) -> list[int]:
    """One epoch's sample order: shuffled, then wrapped round to whole groups of ``group``
    (batch × accumulation), as XTuner's sampler does, so every optimizer step is whole."""
    order: list[int] = torch.randperm(count, generator=generator).tolist()
    length = math.ceil(count / group) * group
    return [order[n % count] for n in range(length)]


def collate(
    batch: Sequence[Sample], layout: PromptLayout, max_tiles: int
) -> dict[str, torch.Tensor]:
    """A batch as model inputs: right-padded ids, mask and labels, and every photo's tiles."""
    width = max(len(sample.input_ids) for sample in batch)
    input_ids = torch.full((len(batch), width), layout.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    tiles = []
    for row, sample in enumerate(batch):
        length = len(sample.input_ids)
        input_ids[row, :length] = torch.tensor(sample.input_ids)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(sample.labels)
        decoded = decode_image(sample.image.read_bytes(), max_tiles=max_tiles)
        pixels = torch_pixels.pixel_values(decoded.image, max_tiles, layout.tile_size)
        if pixels.shape[0] != sample.tiles:
            raise TrainingError(
                f"{sample.image.name} became {pixels.shape[0]} tiles, not the {sample.tiles}"
                " its prompt has tokens for"
            )
        tiles.append(pixels)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": torch.cat(tiles),
    }


# -- model -----------------------------------------------------------------------------------


def lora_targets(model: Any) -> list[str]:
    """Every linear layer of the language model and the output head, by full name."""
    language_model = _part(model, "language_model")
    head = model.get_output_embeddings()
    inside = {id(module) for module in language_model.modules()}
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and (id(module) in inside or module is head)
    ]


def _with_adapters(model: Any, job: LoraJob) -> Any:
    """``model`` with LoRA adapters and a trainable projector; the rest frozen."""
    _untie_output_head(model)
    targets = lora_targets(model)
    # The adapters' initial weights are random: the seed makes the training repeatable.
    torch.manual_seed(job.seed)
    config = LoraConfig(
        r=job.lora_r,
        lora_alpha=job.lora_alpha,
        lora_dropout=job.lora_dropout,
        target_modules=targets,
        bias="none",
    )
    trained = get_peft_model(model, config)
    for parameter in _part(model, "multi_modal_projector").parameters():
        parameter.requires_grad_(True)
    count = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    log.info("LoRA r%d on %d layers; %d parameters trained", job.lora_r, len(targets), count)
    return trained


def _untie_output_head(model: Any) -> None:
    """Give the output head weights of its own when it shares the input embeddings'.

    Merging LoRA into a tied head would change the embeddings too; the merged model is
    saved untied instead (a little larger, the same model).
    """
    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    if head.weight.data_ptr() == embeddings.weight.data_ptr():
        head.weight = torch.nn.Parameter(embeddings.weight.detach().clone())
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def _part(model: Any, name: str) -> Any:
    """A named part of transformers' InternVL (``language_model``, ``multi_modal_projector``)."""
    part = getattr(getattr(model, "model", None), name, None)
    if part is None:
        raise TrainingError(f"the model has no {name}: not transformers' InternVL layout")
    return part


def learning_rate_at(iteration: int, total: int, peak: float) -> float:
    """XTuner's schedule: a linear warm-up from almost zero, then a cosine decay to zero."""
    warmup = int(WARMUP_RATIO * total)
    if iteration < warmup:
        return peak * (WARMUP_START_FACTOR + (1 - WARMUP_START_FACTOR) * iteration / warmup)
    span = max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * (iteration - warmup) / span))


def _train_loop(
    model: Any,
    samples: list[Sample],
    layout: PromptLayout,
    job: LoraJob,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    group = job.batch_size * job.accumulative_counts
    per_epoch = math.ceil(len(samples) / group) * job.accumulative_counts
    total = job.epochs * per_epoch
    if total != job.total_iterations:
        log.warning("%d iterations to run, not the %d expected", total, job.total_iterations)
    log.info("%d epochs of %d iterations", job.epochs, per_epoch)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=job.learning_rate, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY
    )
    model.train()
    _part(model.get_base_model(), "vision_tower").eval()  # frozen, and served as in eval
    generator = torch.Generator().manual_seed(job.seed)
    iteration = 0
    with _ProgressFile(job.work_dir / PROGRESS_FILE) as progress:
        for _epoch in range(job.epochs):
            order = epoch_order(len(samples), group, generator)
            for start in range(0, len(order), job.batch_size):
                began = time.perf_counter()
                learning_rate = learning_rate_at(iteration, total, job.learning_rate)
                for parameter_group in optimizer.param_groups:
                    parameter_group["lr"] = learning_rate
                batch = collate(
                    [samples[n] for n in order[start : start + job.batch_size]],
                    layout,
                    job.max_tiles,
                )
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
                loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
                if not torch.isfinite(loss):
                    raise TrainingError(f"the loss became {loss.item()} at iteration {iteration}")
                (loss / job.accumulative_counts).backward()
                iteration += 1
                if iteration % job.accumulative_counts == 0:
                    torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                progress.write(
                    iteration=iteration,
                    total=total,
                    loss=loss.item(),
                    learning_rate=learning_rate,
                    seconds=time.perf_counter() - began,
                    memory_mb=_memory_mb(device),
                )


class _ProgressFile:
    """``progress.jsonl``: one line per iteration, flushed, as XTuner's scalars.json; and a
    human line in the log now and then, as XTuner's logger writes it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: TextIO | None = None

    def __enter__(self) -> _ProgressFile:
        self._file = self._path.open("w", encoding="utf-8")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            self._file.close()

    def write(
        self,
        *,
        iteration: int,
        total: int,
        loss: float,
        learning_rate: float,
        seconds: float,
        memory_mb: int,
    ) -> None:
        assert self._file is not None
        entry = {
            "iter": iteration,
            "loss": round(loss, 6),
            "lr": learning_rate,
            "time": round(seconds, 4),
            "memory": memory_mb,
        }
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        if total <= 5 * LOG_EVERY or iteration % LOG_EVERY == 0 or iteration in (1, total):
            log.info(
                "Iter(train) [%*d/%d]  lr: %.4e  time: %.4f  memory: %d  loss: %.4f",
                len(str(total)),
                iteration,
                total,
                learning_rate,
                seconds,
                memory_mb,
                loss,
            )


def _memory_mb(device: torch.device) -> int:
    """The most memory used so far, in MB: the GPU's on CUDA, else the process's."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device) // 2**20)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB; bytes on macOS
    return int(peak // (2**20 if sys.platform == "darwin" else 2**10))


# -- saving ----------------------------------------------------------------------------------


def save_model(model: Any, tokenizer: Any, job: LoraJob, dtype: torch.dtype) -> None:
    """Merge the adapters and save a full model directory at ``job.output_dir``.

    It is written beside it and moved into place when complete, so that the output
    directory is either absent or whole.
    """
    merged = model.merge_and_unload()
    merged.to(device="cpu", dtype=dtype)
    output_dir = job.output_dir
    partial = output_dir.with_name(f".{output_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    _save_companions(job.base_model, partial)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(partial, output_dir)


def _save_companions(base_model: str, directory: Path) -> None:
    """The base model's processor and chat template files, where the save wrote none."""
    base = Path(base_model).expanduser()
    if not base.is_dir():  # a hub id: its processor, as transformers saves it
        try:
            processor = AutoProcessor.from_pretrained(base_model)  # type: ignore[no-untyped-call]
            processor.save_pretrained(directory)
        except Exception as error:  # a model without a processor is served all the same
            log.info("no processor saved: %s", _first_line(error))
        return
    for source in sorted(base.iterdir()):
        # The weights' index belongs to the base's weights, not the merged model's.
        if (
            source.is_file()
            and source.suffix in COMPANION_SUFFIXES
            and not source.name.endswith(".index.json")
            and not (directory / source.name).exists()
        ):
            shutil.copy2(source, directory / source.name)


def _config_dtype(hf_config: Any) -> torch.dtype | None:
    """The dtype the base model's weights were saved in, if its config says."""
    value = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
