"""A tiny random-weight InternVL checkpoint in transformers' own (HF-native) format.

It has the layout of ``OpenGVLab/InternVL3-1B-hf`` (an InternViT vision tower, a pixel-shuffle
projector and a Qwen2 language model) and a byte-level BPE tokenizer with the same special
tokens, so code written for the real model runs on it offline in about a second. Its answers
are gibberish, but deterministic: the weights come from a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from engine.prompts import DISHBOT_SYSTEM_PROMPT

# The special tokens of the InternVL3 "-hf" checkpoints, by the names transformers'
# InternVLProcessor looks them up with (tokenizer.start_image_token and so on).
PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
START_IMAGE_TOKEN = "<img>"
END_IMAGE_TOKEN = "</img>"
CONTEXT_IMAGE_TOKEN = "<IMG_CONTEXT>"
VIDEO_TOKEN = "<video>"
SPECIAL_TOKENS = (
    PAD_TOKEN,
    IM_START_TOKEN,
    IM_END_TOKEN,
    START_IMAGE_TOKEN,
    END_IMAGE_TOKEN,
    CONTEXT_IMAGE_TOKEN,
    VIDEO_TOKEN,
)

# What the tokenizer learns its merges from: the kind of text dishbot sees, in both languages.
TRAINING_TEXT = (
    "system",
    "user",
    "assistant",
    "What dish is this?",
    "This is char siu, Cantonese barbecued pork, sweet and smoky.",
    "That is cheung fun, rice noodle rolls with soy sauce.",
    "Is it spicy? How is it made? What are the ingredients?",
    "Dim sum: har gow, siu mai, egg tarts and congee.",
    "Mapo tofu is spicy and numbing, made with Sichuan pepper.",
    "这是什么菜？",
    "这是叉烧，广东的蜜汁烤猪肉，甜而带烟熏味。",
    "那是肠粉，不是叉烧。",
    "辣不辣？怎么做的？有哪些配料？",
    "点心：虾饺、烧卖、蛋挞和粥。",
    "麻婆豆腐又麻又辣，用花椒做的。",
    # With it, dishbot's default prompt is about as many tokens (~120) as with Qwen2's tokenizer.
    DISHBOT_SYSTEM_PROMPT,
)


def build_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with InternVL's special tokens; it can encode any text."""
    tokenizer = Tokenizer(models.BPE())
    # Byte-level, as Qwen2's tokenizer: Chinese characters span several tokens, so streaming
    # has to cope with partial UTF-8 just as it does with the real model.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(token, special=True) for token in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        extra_special_tokens={
            "start_image_token": START_IMAGE_TOKEN,
            "end_image_token": END_IMAGE_TOKEN,
            "context_image_token": CONTEXT_IMAGE_TOKEN,
            "video_token": VIDEO_TOKEN,
        },
    )


def build_tiny_internvl(
    directory: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 1,
    patch_size: int = 56,
    image_size: int = 448,
    seed: int = 0,
) -> Path:
    """Save a tiny random InternVL checkpoint and its tokenizer into ``directory``; return it.

    With the defaults a 448-pixel tile is 8x8 patches, which the 0.5 pixel shuffle turns into
    16 image tokens (``config.image_seq_length``). Larger sizes make a model for benchmarks.
    """
    tokenizer = build_tokenizer()
    downsample_ratio = 0.5
    patches_per_side = image_size // patch_size
    vision_config = InternVLVisionConfig(
        hidden_size=vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        intermediate_size=vision_hidden_size * 4,
        image_size=image_size,
        patch_size=patch_size,
    )
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=int(tokenizer.convert_tokens_to_ids(CONTEXT_IMAGE_TOKEN)),
        image_seq_length=int(patches_per_side**2 * downsample_ratio**2),
        downsample_ratio=downsample_ratio,
        # Untied, so the model does not just echo its last input token (see `_liven`).
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    _liven(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _liven(model: InternVLForConditionalGeneration) -> None:
    """Give every matrix unit-variance outputs, so answers depend on the question and photo.

    transformers' initialisation (std 0.02, near-zero layer scales in the vision tower) makes a
    random model's layers almost silent: it repeats one token whatever it is asked, which
    would let batching bugs pass unnoticed.
    """
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                fan_in = parameter[0].numel()
                parameter.normal_(0.0, fan_in**-0.5)
            elif "lambda" in name:  # the vision tower's layer scales
                parameter.fill_(1.0)
