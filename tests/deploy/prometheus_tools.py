"""System tools the deploy tests run: found on PATH, else skipped (or failed under ROUNDTABLE_REQUIRE_TOOLS=1)."""

from __future__ import annotations

import shutil

from tests.tools import require

# Debian's `prometheus` package ships both binaries.
DEBIAN_PACKAGE = {"promtool": "prometheus", "prometheus": "prometheus"}


def require_tool(name: str) -> str:
    """The binary's path; skips the test when it is missing, or fails it when ROUNDTABLE_REQUIRE_TOOLS=1."""
    message = f"{name} not found: install the Debian package with `apt-get install {DEBIAN_PACKAGE[name]}`"
    return require(shutil.which(name), message)
