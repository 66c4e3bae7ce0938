"""The Python that runs dishbot: its version, dishbot's required packages, the settings."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bot.doctor.context import Context
from bot.doctor.findings import Finding, fail, ok, warn, with_fix
from bot.settings import CONFIG_ENV_VAR, DEFAULT_CONFIG_FILE

if TYPE_CHECKING:
    from packaging.requirements import Requirement

MIN_PYTHON = (3, 11)


async def check_python(context: Context) -> Finding:
    """Python 3.11 or newer."""
    version = context.probes.python_version()
    shown = ".".join(str(part) for part in version)
    needed = ".".join(str(part) for part in MIN_PYTHON)
    if version[:2] >= MIN_PYTHON:
        return ok("python", f"{shown} (needs {needed}+)")
    return fail(
        "python",
        with_fix(
            f"{shown}, but dishbot needs {needed}+",
            f"install Python {needed} or newer and dishbot into it (python{needed} -m venv .venv)",
        ),
    )


@dataclass(frozen=True)
class _Installed:
    name: str
    version: str


async def check_packages(context: Context) -> Finding:
    """Every distribution dishbot requires (not its extras) is installed, new enough and
    importable."""
    requirements = context.probes.requirements()
    if requirements is None:
        return warn(
            "packages",
            with_fix(
                "dishbot is not installed as a package, so its requirements are unknown",
                'install it: pip install -e . (in its source folder) or pip install "dishbot"',
            ),
        )
    try:  # not one of dishbot's requirements, though nearly every environment has it
        import packaging.requirements  # noqa: F401
    except ImportError:
        return warn(
            "packages",
            with_fix("cannot compare versions without packaging", "pip install packaging"),
        )
    needed = [req for req in _parsed(requirements) if _applies(req)]
    installed: list[_Installed] = []
    problems: list[str] = []
    fixes: list[str] = []
    for requirement in needed:
        problem = _problem(requirement)
        if problem is None:
            installed.append(_Installed(requirement.name, _version(requirement.name) or "?"))
            continue
        problems.append(problem)
        fixes.append(_pip_argument(requirement))
    if problems:
        return fail(
            "packages",
            with_fix("; ".join(problems), "pip install " + " ".join(fixes)),
        )
    listed = ", ".join(f"{found.name} {found.version}" for found in installed)
    return ok("packages", f"all {len(installed)} required installed: {listed}")


def _parsed(requirements: list[str]) -> list[Requirement]:
    from packaging.requirements import InvalidRequirement, Requirement

    parsed = []
    for text in requirements:
        try:
            parsed.append(Requirement(text))
        except InvalidRequirement:
            continue  # metadata dishbot did not write; nothing to check against
    return parsed


def _applies(requirement: Requirement) -> bool:
    """Whether a requirement is one of dishbot's own (not an extra's, not another Python's)."""
    return requirement.marker is None or requirement.marker.evaluate({"extra": ""})


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _problem(requirement: Requirement) -> str | None:
    version = _version(requirement.name)
    if version is None:
        return f"{requirement.name} is missing"
    if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
        return f"{requirement.name} {version} does not fit {requirement.specifier}"
    modules = _top_level_modules(importlib.metadata.distribution(requirement.name))
    if modules and not any(_findable(module) for module in modules):
        return f"{requirement.name} {version} is installed but cannot be imported"
    return None


def _top_level_modules(distribution: importlib.metadata.Distribution) -> set[str]:
    """The modules a distribution installs at the top level (``telegram`` for
    python-telegram-bot), from its top_level.txt or else its list of files."""
    listed = distribution.read_text("top_level.txt")
    if listed:
        return {line.strip() for line in listed.splitlines() if line.strip()}
    modules = set()
    for file in distribution.files or ():
        top = file.parts[0]
        if len(file.parts) == 1 and top.endswith(".py"):
            modules.add(top.removesuffix(".py"))
        elif len(file.parts) > 1 and top.isidentifier():
            modules.add(top)
    return modules


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _pip_argument(requirement: Requirement) -> str:
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    return f'"{requirement.name}{extras}{requirement.specifier}"'


def settings_sources() -> str:
    """Where the settings came from, for the settings line."""
    variables = sorted(
        name
        for name in os.environ
        if name.startswith("DISHBOT_")
        and name != CONFIG_ENV_VAR
        and not name.startswith("DISHBOT_TEST_")
    )
    sources = ["defaults"]
    if variables:
        sources.append(
            f"{len(variables)} DISHBOT_* environment variable{'s' * (len(variables) > 1)}"
        )
    named = os.environ.get(CONFIG_ENV_VAR)
    config_file = Path(named) if named else DEFAULT_CONFIG_FILE
    if config_file.is_file():
        sources.append(str(config_file.resolve()))
    return " + ".join(sources)


def settings_ok() -> Finding:
    """The settings were read."""
    return ok("settings", f"read from {settings_sources()}")


def settings_failed(problem: str) -> Finding:
    """The settings could not be read: `dishbot run` stops at once."""
    return fail(
        "settings",
        with_fix(
            problem,
            "fix it in the environment (DISHBOT_SECTION__NAME) or in dishbot.toml "
            "(`dishbot config` shows the effective settings)",
        ),
    )
