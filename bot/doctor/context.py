"""What every check is given: the settings (when they could be read) and the probes, each
probe run at most once however many checks ask."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from bot.doctor.blocking import in_thread
from bot.doctor.probes import LMDeployInfo, Probes, TorchInfo
from bot.logs import REDACTED
from bot.settings import Settings

# lmdeploy's import pulls in torch, triton and its kernels: slow on a cold disk.
LMDEPLOY_IMPORT_TIMEOUT_S = 50.0


class Context:
    """The doctor's view of this machine and its settings, shared by the checks."""

    def __init__(self, probes: Probes, settings: Settings | None = None) -> None:
        self.probes = probes
        self._settings = settings
        self._secrets: Sequence[str] = settings.secret_values() if settings else ()
        self._torch: asyncio.Future[TorchInfo] | None = None
        self._lmdeploy: asyncio.Future[LMDeployInfo] | None = None

    @property
    def settings(self) -> Settings:
        """The settings; only checks that need them run, and only once they were read."""
        if self._settings is None:
            raise RuntimeError("this check needs the settings, which could not be read")
        return self._settings

    def with_settings(self, settings: Settings) -> Context:
        """This context, now with the settings the later checks need."""
        return Context(self.probes, settings)

    async def torch(self) -> TorchInfo:
        """torch and its CUDA devices, probed once."""
        if self._torch is None:
            self._torch = asyncio.ensure_future(in_thread(self.probes.torch))
        return await asyncio.shield(self._torch)

    async def lmdeploy(self) -> LMDeployInfo:
        """Whether lmdeploy imports, probed once."""
        if self._lmdeploy is None:
            probe = self.probes.lmdeploy
            self._lmdeploy = asyncio.ensure_future(
                in_thread(lambda: probe(LMDEPLOY_IMPORT_TIMEOUT_S))
            )
        return await asyncio.shield(self._lmdeploy)

    def scrub(self, text: str) -> str:
        """``text`` with every secret of the settings hidden (the doctor never prints one)."""
        for secret in sorted(set(self._secrets), key=len, reverse=True):
            text = text.replace(secret, REDACTED)
        return text
