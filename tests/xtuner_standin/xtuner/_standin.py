"""What the stand-in's entry points share: reading a config, recording a call."""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path
from typing import Any


def config_settings(config: Path) -> dict[str, Any]:
    """The config's top-level settings that plain Python can work out without its imports.

    mmengine runs the whole file; here the assignments built from literals and earlier
    settings are enough (``batch_size``, ``data_path``, ``path``, ``max_epochs``, ...).
    """
    settings: dict[str, Any] = {}
    for node in ast.parse(config.read_text(encoding="utf-8")).body:
        if not (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            continue
        try:
            expression = compile(ast.Expression(node.value), str(config), "eval")
            settings[node.targets[0].id] = eval(expression, {"__builtins__": {}}, dict(settings))
        except Exception:
            continue  # built from an import (dict(type=InternVL_V1_5, ...)): not needed here
    return settings


def record(path: Path, **extra: Any) -> None:
    """Write how this process was started to ``path`` for a test to read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        "argv": sys.argv[1:],
        "executable": sys.executable,
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        **extra,
    }
    path.write_text(json.dumps(entry, indent=1), encoding="utf-8")
