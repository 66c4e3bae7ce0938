"""Stand-in for ``python -m xtuner.configs.internvl.v1_5.convert_to_official`` (XTuner 0.2.0).

The real script builds the model the config names, loads the checkpoint, merges the LoRA
and calls ``save_pretrained`` on the model and the tokenizer. Under transformers 4.48 that
writes the config, the weights and the tokenizer, but not the remote code (``*.py``) the
config's ``auto_map`` needs, nor ``generation_config.json``; this copies the base model the
config names in that shape.
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import shutil
import sys
from pathlib import Path

from xtuner._standin import config_settings, record

LEFT_OUT = ("*.py", "generation_config.json")


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert the pth model to HuggingFace model")
    parser.add_argument("config")
    parser.add_argument("trained_model_pth")
    parser.add_argument("save_path")
    args = parser.parse_args()
    if osp.realpath(args.trained_model_pth) == osp.realpath(args.save_path):
        raise ValueError("The trained path and save path should not be the same.")
    checkpoint = Path(args.trained_model_pth)
    record(checkpoint.parent / "standin-convert.json")
    if not checkpoint.exists():
        raise FileNotFoundError(f"Cannot find {checkpoint}")
    failure = os.environ.get("XTUNER_STANDIN_CONVERT_FAIL", "")
    if failure == "crash":
        print("RuntimeError: stand-in conversion crash", file=sys.stderr)
        sys.exit(1)
    base = Path(config_settings(Path(args.config))["path"])
    out = Path(args.save_path)
    out.mkdir(parents=True, exist_ok=True)
    for source in sorted(base.iterdir()):
        if source.is_dir() or any(source.match(pattern) for pattern in LEFT_OUT):
            continue
        if failure == "no_weights" and source.suffix in (".safetensors", ".bin"):
            continue
        shutil.copy2(source, out / source.name)
    generation_config = os.environ.get("XTUNER_STANDIN_CONVERT_GENERATION_CONFIG")
    if generation_config is not None:
        (out / "generation_config.json").write_text(generation_config, encoding="utf-8")
    print(f"InternVL_V1_5(merged from {checkpoint.name})")


if __name__ == "__main__":
    main()
