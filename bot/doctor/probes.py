"""What the doctor looks at on this machine, each behind a function the checks are given, so
that tests can describe a machine this one is not (a GPU, an old Python, a full disk)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bot.doctor.blocking import run_command
from bot.model_source import free_memory

GIB = 1024**3


@dataclass(frozen=True)
class CudaDevice:
    """One GPU torch can use, and its memory now."""

    index: int
    name: str
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class TorchInfo:
    """torch in this Python: its version (None: not installed) and the CUDA devices it sees."""

    version: str | None
    import_error: str | None = None
    cuda_devices: tuple[CudaDevice, ...] = ()
    cuda_problem: str | None = None  # why CUDA is unusable, when torch says so

    @property
    def usable(self) -> bool:
        return self.version is not None and self.import_error is None

    @property
    def cuda(self) -> bool:
        return bool(self.cuda_devices)


@dataclass(frozen=True)
class LMDeployInfo:
    """lmdeploy in this Python: absent, importable (its version), or broken (the error)."""

    installed: bool
    version: str | None = None
    import_error: str | None = None


@dataclass(frozen=True)
class DiskSpace:
    """A filesystem's size and what is free on it, in bytes."""

    total_bytes: int
    free_bytes: int


def probe_torch() -> TorchInfo:
    """Import torch here (as the transformers backend will) and ask it about CUDA."""
    if importlib.util.find_spec("torch") is None:
        return TorchInfo(version=None)
    try:
        import torch
    except Exception as exc:
        return TorchInfo(version="?", import_error=f"{type(exc).__name__}: {exc}")
    version = str(torch.__version__)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available:
        # torch warns instead of failing when a driver is there but unusable (too old).
        said = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
        return TorchInfo(version=version, cuda_problem=said[0] if said else None)
    devices = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        devices.append(CudaDevice(index, torch.cuda.get_device_name(index), free, total))
    return TorchInfo(version=version, cuda_devices=tuple(devices))


LMDEPLOY_IMPORT = "import lmdeploy; print(lmdeploy.__version__)"


def probe_lmdeploy(timeout_s: float) -> LMDeployInfo:
    """Whether lmdeploy imports, in a child Python: it is heavy, and a broken one may hang."""
    if importlib.util.find_spec("lmdeploy") is None:
        return LMDeployInfo(installed=False)
    try:
        done = run_command([sys.executable, "-c", LMDEPLOY_IMPORT], timeout_s)
    except subprocess.TimeoutExpired:
        return LMDeployInfo(installed=True, import_error=f"importing it took over {timeout_s:g} s")
    if done.returncode != 0:
        return LMDeployInfo(installed=True, import_error=last_line(done.stderr))
    return LMDeployInfo(installed=True, version=done.stdout.strip() or "?")


def probe_disk(path: Path) -> DiskSpace:
    """The space on the filesystem ``path`` (which must exist) is on."""
    usage = shutil.disk_usage(path)
    return DiskSpace(total_bytes=usage.total, free_bytes=usage.free)


def nearest_existing(path: Path) -> Path:
    """``path``, or the closest folder above it that exists."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def last_line(text: str) -> str:
    """The last non-empty line of a child's stderr: where Python says what went wrong."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "it exited without saying why"


def dishbot_requirements() -> list[str] | None:
    """The requirements in dishbot's installed metadata (None: dishbot is not installed)."""
    try:
        return importlib.metadata.requires("dishbot") or []
    except importlib.metadata.PackageNotFoundError:
        return None


def running_python() -> tuple[int, int, int]:
    return (sys.version_info.major, sys.version_info.minor, sys.version_info.micro)


@dataclass(frozen=True)
class Probes:
    """The probing functions the checks call; the defaults look at this machine."""

    python_version: Callable[[], tuple[int, int, int]] = running_python
    requirements: Callable[[], list[str] | None] = dishbot_requirements
    torch: Callable[[], TorchInfo] = probe_torch
    lmdeploy: Callable[[float], LMDeployInfo] = probe_lmdeploy
    disk: Callable[[Path], DiskSpace] = probe_disk
    free_memory: Callable[[str], int | None] = free_memory
