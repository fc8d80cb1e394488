"""System tools the tests run (redis-server, Envoy, promtool, h2load, kubectl…): skipped when missing, failed under
ROUNDTABLE_REQUIRE_TOOLS=1 (CI, where a skip would hide an untested path)."""

from __future__ import annotations

import os

import pytest

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
