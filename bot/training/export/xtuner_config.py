"""The XTuner config written next to the data: XTuner's InternVL2-2B LoRA recipe, filled in.

It follows ``xtuner/configs/internvl/v2/internvl_v2_internlm2_2b_lora_finetune.py`` part by
part and keeps the variable names XTuner's tools look for (``path``, ``data_root``,
``data_path``, ``image_folder``, ``model``, ``train_dataloader``, ...), so that
``xtuner train`` and ``convert_to_official.py`` take it as they take the recipe. What
differs: the paths point into the export, and the hyper-parameters come from dishbot's
``[training]`` settings, each with a comment saying why.
"""

from __future__ import annotations

import math
from pathlib import Path

from bot.settings import TrainingSettings

CONFIG_NAME = "xtuner_config.py"
TRAIN_FILE = "train.jsonl"
DATALOADER_WORKERS = 4


def iterations_per_run(samples: int, training: TrainingSettings, gpus: int = 1) -> int:
    """How many iterations XTuner will run over ``samples`` (its last checkpoint's number).

    XTuner's length-grouped sampler rounds each GPU's share up to whole groups of
    ``batch_size * accumulative_counts`` samples, and one iteration is one batch.
    """
    group = training.batch_size * training.accumulative_counts
    groups_per_gpu = math.ceil(samples / gpus / group)
    return training.epochs * groups_per_gpu * training.accumulative_counts


def _python_str(text: str) -> str:
    # repr() of a str is a valid Python literal, whatever the path holds.
    return repr(text)


def render_xtuner_config(out_dir: Path, training: TrainingSettings, train_samples: int) -> str:
    """The text of ``xtuner_config.py`` for an export at ``out_dir`` (an absolute path)."""
    data_root = str(out_dir).rstrip("/") + "/"
    iterations = iterations_per_run(train_samples, training)
    return f"""\
# XTuner config for fine-tuning on dishbot's exported feedback, written by `dishbot export`.
# Based on XTuner's InternVL2-2B LoRA recipe,
# xtuner/configs/internvl/v2/internvl_v2_internlm2_2b_lora_finetune.py.
#
#   xtuner train {CONFIG_NAME} --deepspeed {training.deepspeed}
#
# XTuner trains InternLM2-based InternVL models under its own fixed system prompt; serve
# the fine-tuned model with it (manifest.json records it).
from mmengine.hooks import (
    CheckpointHook,
    DistSamplerSeedHook,
    IterTimerHook,
    LoggerHook,
    ParamSchedulerHook,
)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoTokenizer

from xtuner.dataset import InternVL_V1_5_Dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.samplers import LengthGroupedSampler
from xtuner.engine.hooks import DatasetInfoHook
from xtuner.engine.runner import TrainLoop
from xtuner.model import InternVL_V1_5
from xtuner.utils import PROMPT_TEMPLATE

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
# The base checkpoint to fine-tune (training.base_model): an InternLM2-based InternVL2.
path = {_python_str(training.base_model)}

# Data
# The export this config was written with; edit data_root if you move the directory.
data_root = {_python_str(data_root)}
# One JSON record per line: the photo, then the conversation (see the dataset card).
data_path = data_root + {_python_str(TRAIN_FILE)}
# Record "image" paths are relative to this folder.
image_folder = data_root + 'images'
# InternLM2's chat template; the dataset swaps in InternVL's exact one for InternLM2 models.
prompt_template = PROMPT_TEMPLATE.internlm2_chat
# Tokens per sample, image tokens included (training.max_length); the export left out
# samples estimated not to fit, since the loader would cut them short.
max_length = {training.max_length}

# Scheduler & Optimizer
# Samples per GPU per iteration (training.batch_size): the recipe's 8 did not fit in memory.
batch_size = {training.batch_size}
# Iterations whose gradients add up before each optimizer step
# (training.accumulative_counts); the effective batch is batch_size * this * GPUs.
accumulative_counts = {training.accumulative_counts}
# Worker processes that load and tile the photos while the GPU trains.
dataloader_num_workers = {DATALOADER_WORKERS}
# Passes over the data (training.epochs): feedback data is small, so it takes many.
# About {iterations} iterations on one GPU.
max_epochs = {training.epochs}
# The optimizer, as in the recipe.
optim_type = AdamW
# Peak learning rate (training.learning_rate), for LoRA on small data.
lr = {training.learning_rate!r}
# AdamW's decay rates for its moment estimates, as in the recipe.
betas = (0.9, 0.999)
# AdamW's weight decay, as in the recipe.
weight_decay = 0.05
# Gradients are clipped to this norm.
max_norm = 1
# Share of training over which the learning rate warms up before its cosine decay.
warmup_ratio = 0.03

# Save
# Iterations between checkpoints (training.save_steps): small data trains in few of them.
save_steps = {training.save_steps}
# Checkpoints kept on disk (-1 keeps them all); the final one is saved whatever the step.
save_total_limit = 1

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
# LoRA adapters on the language model; the vision encoder and base weights stay frozen.
model = dict(
    type=InternVL_V1_5,
    model_path=path,
    freeze_llm=True,
    freeze_visual_encoder=True,
    llm_lora=dict(
        type=LoraConfig,
        r={training.lora_r},  # adapter rank (training.lora_r)
        lora_alpha={training.lora_alpha},  # adapter scale (training.lora_alpha)
        lora_dropout={training.lora_dropout!r},  # (training.lora_dropout)
        target_modules=None,
        task_type='CAUSAL_LM',
    ),
)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
# XTuner's InternVL dataset reads the records, tiles each photo and builds the prompt.
llava_dataset = dict(
    type=InternVL_V1_5_Dataset,
    model_path=path,
    data_paths=data_path,
    image_folders=image_folder,
    template=prompt_template,
    max_length=max_length,
)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=llava_dataset,
    # Samples of similar length go into the same batch, estimated from each record's
    # image_wh and text, so little of a batch is padding.
    sampler=dict(
        type=LengthGroupedSampler,
        length_property='modality_length',
        per_device_batch_size=batch_size * accumulative_counts,
    ),
    collate_fn=dict(type=default_collate_fn),
)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
# Mixed precision (float16 with a dynamic loss scale), clipping, accumulation.
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale='dynamic',
    dtype='float16',
)

# Linear warm-up from almost zero, then a cosine decay to zero, counted in iterations.
param_scheduler = [
    dict(
        type=LinearLR,
        start_factor=1e-5,
        by_epoch=True,
        begin=0,
        end=warmup_ratio * max_epochs,
        convert_to_iter_based=True,
    ),
    dict(
        type=CosineAnnealingLR,
        eta_min=0.0,
        by_epoch=True,
        begin=warmup_ratio * max_epochs,
        end=max_epochs,
        convert_to_iter_based=True,
    ),
]

# Training only: the validation split is for evaluating the converted model afterwards.
train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
# The tokenizer XTuner's dataset-info hook uses to print a decoded sample at the start.
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=path,
    trust_remote_code=True,
)

custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
]

default_hooks = dict(
    # Time each iteration.
    timer=dict(type=IterTimerHook),
    # Log every 10 iterations.
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=10),
    # Step the learning-rate schedule.
    param_scheduler=dict(type=ParamSchedulerHook),
    # Save the weights (not the optimizer state) every save_steps iterations.
    checkpoint=dict(
        type=CheckpointHook,
        save_optimizer=False,
        by_epoch=False,
        interval=save_steps,
        max_keep_ckpts=save_total_limit,
    ),
    # Reseed the sampler each epoch when training on several GPUs.
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    # Data-loading processes fork; OpenCV inside them stays single-threaded.
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # NCCL between GPUs.
    dist_cfg=dict(backend='nccl'),
)

visualizer = None
log_level = 'INFO'
# Start from the base model, not from an earlier checkpoint.
load_from = None
resume = False
# A fresh random seed each run.
randomness = dict(seed=None, deterministic=False)
# Log progress by iteration rather than by epoch.
log_processor = dict(by_epoch=False)
"""
