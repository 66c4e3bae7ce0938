"""Whether a model directory a trainer wrote has what loading it needs, checked without
loading it (a trained model that would not load must fail its run, not the bot's swap)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

CONFIG_FILE = "config.json"
# SentencePiece (InternLM2), fast tokenizers, byte-level BPE (Qwen2).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def loading_problem(model_dir: Path, *, model_type: str | None = None) -> str | None:
    """Why transformers could not load ``model_dir``, or None when it has what loading needs.

    Checked without loading: the directory, config.json parses (and names ``model_type``
    when one is asked for), the remote code its ``auto_map`` names is there, a tokenizer
    (config and vocabulary), and the weights (every shard an index lists).
    """
    if not model_dir.is_dir():
        return "the directory does not exist"
    try:
        config = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {CONFIG_FILE}"
    except (OSError, ValueError) as error:
        return f"{CONFIG_FILE} does not parse: {error}"
    if not isinstance(config, dict):
        return f"{CONFIG_FILE} is not a JSON object"
    if model_type is not None and config.get("model_type") != model_type:
        return f"{CONFIG_FILE} is not a {model_type} model's"
    missing_code = sorted(
        f"{module}.py"
        for module in _auto_map_modules(config)
        if not (model_dir / f"{module}.py").is_file()
    )
    if missing_code:
        return f"the remote code {', '.join(missing_code)} is missing"
    if not (model_dir / "tokenizer_config.json").is_file():
        return "no tokenizer_config.json"
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return f"no tokenizer vocabulary ({' or '.join(TOKENIZER_FILES)})"
    return _weights_problem(model_dir)


def _auto_map_modules(config: dict[str, object]) -> set[str]:
    """The modules ``auto_map`` loads classes from ("modeling_x.ClassName" -> "modeling_x")."""
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict):
        return set()
    references: list[str] = []
    for value in auto_map.values():
        values: Sequence[object] = value if isinstance(value, list) else [value]
        references += [item for item in values if isinstance(item, str)]
    # "repo--module.Class" points at another repository: not a file of this directory.
    return {ref.rsplit(".", 1)[0] for ref in references if "--" not in ref and "." in ref}


def _weights_problem(model_dir: Path) -> str | None:
    for index_name in WEIGHT_INDEXES:
        index = model_dir / index_name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = set(weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            return f"{index_name} does not parse: {error}"
        missing = sorted(shard for shard in shards if not (model_dir / shard).is_file())
        if missing:
            return f"weight shards missing: {', '.join(missing)}"
        return None
    weights = [p for pattern in WEIGHT_PATTERNS for p in model_dir.glob(pattern) if p.is_file()]
    if not weights:
        return "no weights (*.safetensors or *.bin)"
    return None
