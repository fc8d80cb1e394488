"""tests/tools.py: a missing system tool skips a test, or fails it when ROUNDTABLE_REQUIRE_TOOLS=1."""

from __future__ import annotations

import pytest

from tests.tools import REQUIRE_TOOLS_ENV, require


def test_a_present_tool_is_returned() -> None:
    assert require("/usr/bin/true", "never said") == "/usr/bin/true"


def test_a_missing_tool_skips_with_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_TOOLS_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install thing"):
        require(None, "thing not found: apt-get install thing")


def test_a_missing_tool_fails_when_tools_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_TOOLS_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=r"thing not found.*makes this a failure"):
        require(None, "thing not found")
