"""What serves the model: torch and its GPU, lmdeploy, or a remote OpenAI-compatible server."""

from __future__ import annotations

from bot.doctor.context import Context
from bot.doctor.findings import Finding, fail, ok, warn, with_fix
from bot.doctor.http import Unreachable, get_json
from bot.doctor.probes import GIB, CudaDevice, LMDeployInfo, TorchInfo
from bot.settings import EngineSettings

CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
GPU_EXTRA = 'pip install "dishbot[gpu]"'
# Less free GPU memory than this and even the 1-2B InternVL checkpoints may not load.
LOW_GPU_MEMORY_BYTES = 4 * GIB
USE_TRANSFORMERS = "DISHBOT_ENGINE__BACKEND=transformers"


async def check_torch(context: Context) -> Finding:
    """torch: installed and importable when the backend needs it; what CUDA it sees."""
    return torch_finding(await context.torch(), context.settings.engine)


def torch_finding(info: TorchInfo, engine: EngineSettings) -> Finding:
    """The torch line for ``info`` (what torch said) under the ``engine`` settings."""
    needed = engine.backend != "openai"
    if info.version is None:
        if not needed:
            return ok("torch", "not installed: the openai backend does not need it")
        return fail("torch", with_fix(f"not installed; {_needs_torch(engine)}", _torch_fix(engine)))
    if info.import_error is not None:
        problem = f"installed, but `import torch` fails: {info.import_error}"
        fix = f"reinstall it: {CPU_TORCH.replace('install', 'install --force-reinstall', 1)}"
        return fail("torch", with_fix(problem, fix)) if needed else warn("torch", problem)
    if info.cuda:
        return _on_cuda(info.version, info.cuda_devices, needed)
    wants_cuda = engine.device.startswith("cuda") and engine.backend in ("auto", "transformers")
    if wants_cuda:
        return fail(
            "torch",
            with_fix(
                f"{info.version} sees no CUDA GPU, but engine.device = {engine.device}",
                "set DISHBOT_ENGINE__DEVICE=auto (or cpu), or install a CUDA build of torch",
            ),
        )
    if info.cuda_problem is not None:
        return warn(
            "torch",
            with_fix(
                f"{info.version}, CPU only: CUDA is unusable ({info.cuda_problem})",
                "update the NVIDIA driver, or keep the transformers backend on CPU (slow)",
            ),
        )
    if engine.backend in ("lmdeploy", "openai"):  # the next line says what that means
        return ok("torch", f"{info.version}, CPU only")
    return ok("torch", f"{info.version}, CPU only: the transformers backend runs on CPU, slowly")


def _needs_torch(engine: EngineSettings) -> str:
    if engine.backend == "lmdeploy":
        return "the lmdeploy backend needs it"
    return "the transformers backend needs it (lmdeploy is the other choice, on a CUDA GPU)"


def _torch_fix(engine: EngineSettings) -> str:
    if engine.backend == "lmdeploy":
        return f"{GPU_EXTRA} on a CUDA machine"
    return f"{CPU_TORCH} (CPU), or {GPU_EXTRA} on a CUDA machine"


def _on_cuda(version: str, devices: tuple[CudaDevice, ...], needed: bool) -> Finding:
    shown = "; ".join(
        f"GPU {d.index} {d.name}, {d.free_bytes / GIB:.1f} of {d.total_bytes / GIB:.1f} GiB free"
        for d in devices
    )
    line = f"{version}, CUDA: {shown}"
    roomiest = max(devices, key=lambda device: device.free_bytes)
    if needed and roomiest.free_bytes < LOW_GPU_MEMORY_BYTES:
        return warn(
            "torch",
            with_fix(
                f"{line}: little free GPU memory, loading the model may fail",
                "stop what else uses the GPU (nvidia-smi lists it)",
            ),
        )
    return ok("torch", line)


async def check_serving(context: Context) -> Finding:
    """lmdeploy (or, with the openai backend, the server): usable for the configured backend."""
    engine = context.settings.engine
    if engine.backend == "openai":
        return await openai_finding(engine)
    if engine.backend == "transformers":
        return ok("lmdeploy", "not used: engine.backend = transformers")
    return lmdeploy_finding(engine, await context.lmdeploy(), await context.torch())


def lmdeploy_finding(engine: EngineSettings, info: LMDeployInfo, torch: TorchInfo) -> Finding:
    """The lmdeploy line for the ``auto`` or ``lmdeploy`` backend, given what was found."""
    configured = engine.backend == "lmdeploy"
    if not info.installed:
        if configured:
            return fail(
                "lmdeploy", with_fix("not installed, but engine.backend = lmdeploy", _fix())
            )
        return ok("lmdeploy", "not installed: auto uses the transformers backend")
    if not torch.cuda:
        if configured:
            problem = "installed, but no CUDA GPU is visible, and lmdeploy runs only on CUDA"
            return fail("lmdeploy", with_fix(problem, _fix()))
        return warn("lmdeploy", "installed, but no CUDA GPU is visible: auto uses transformers")
    if info.import_error is not None:
        # auto picks lmdeploy too when it is installed and a GPU is there: the import decides.
        problem = f"installed, but `import lmdeploy` fails: {info.import_error}"
        return fail("lmdeploy", with_fix(problem, _fix(reinstall=True)))
    how = "engine.backend = lmdeploy" if configured else "auto uses the lmdeploy backend"
    return ok("lmdeploy", f"{info.version} on CUDA: {how}")


def _fix(*, reinstall: bool = False) -> str:
    install = 'pip install --force-reinstall "dishbot[gpu]"' if reinstall else GPU_EXTRA
    return f"{install} on a CUDA machine, or set {USE_TRANSFORMERS}"


async def openai_finding(engine: EngineSettings) -> Finding:
    """The openai line: the server at engine.openai.base_url lists the model to ask for."""
    base_url = engine.openai.base_url.rstrip("/")
    headers = {}
    if engine.openai.api_key is not None:
        headers["Authorization"] = f"Bearer {engine.openai.api_key.get_secret_value()}"
    set_url = "set DISHBOT_ENGINE__OPENAI__BASE_URL to the server's /v1 URL"
    try:
        answer = await get_json(f"{base_url}/models", headers)
    except Unreachable as exc:
        problem = f"{base_url} does not answer: {exc}"
        return fail(
            "openai",
            with_fix(problem, f"start the server (lmdeploy serve api_server), or {set_url}"),
        )
    if answer.status in (401, 403):
        problem = f"{base_url} refused the API key ({answer.status})"
        return fail("openai", with_fix(problem, "set DISHBOT_ENGINE__OPENAI__API_KEY"))
    if answer.status != 200:
        problem = f"{base_url} answered GET /models with {answer.status}"
        return fail("openai", with_fix(problem, f"check the server's log, or {set_url}"))
    models = _model_ids(answer.body)
    if not models:
        problem = f"{base_url} lists no models"
        return fail("openai", with_fix(problem, f"start the server with a model, or {set_url}"))
    served = ", ".join(models)
    wanted = engine.openai.model
    if wanted is not None and wanted not in models:
        problem = f"{base_url} serves {served}, not {wanted}"
        return fail(
            "openai", with_fix(problem, "set DISHBOT_ENGINE__OPENAI__MODEL to one of those")
        )
    return ok("openai", f"{base_url} answers, serving {served}")


def _model_ids(body: object) -> list[str]:
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return []
    return [e["id"] for e in body["data"] if isinstance(e, dict) and isinstance(e.get("id"), str)]
