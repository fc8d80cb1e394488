"""Shared fixtures: one suite of real servers for the session, and a factory for tests that need their own."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from bench import peer_autogen_system
from services.agents import local_model
from services.shared.tools import IGNORE_SYSTEM_TOOLS_ENV, system_tools_ignored
from tests.suite import Suite, start_suite
from tests.tools import REQUIRE_TOOLS_ENV, missing_tools_notice, tools_required


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Once, at the top of the run: the tools (and the local model) this machine lacks and how to install them."""
    lines = missing_tools_notice()
    if system_tools_ignored():
        lines.append(f"  ({IGNORE_SYSTEM_TOOLS_ENV}=1: tools on PATH are ignored, as on a fresh machine)")
    model_missing = local_model.missing()
    if model_missing is not None:
        lines.append(f"{model_missing} (its tests skip)")
    if peer_autogen_system.peers_python() is None:
        lines.append(f"{peer_autogen_system.missing_message()} (its benchmark smoke test skips)")
    return lines


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under ROUNDTABLE_REQUIRE_TOOLS=1 (CI, every tool installed) a skipped test fails the run: all must run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not tools_required() or exitstatus != pytest.ExitCode.OK or reporter is None:
        return
    skipped = len(reporter.stats.get("skipped", []))
    if skipped:
        reporter.write_line(f"{REQUIRE_TOOLS_ENV}=1 but {skipped} test(s) skipped: every test must run here", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
async def suite(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    """The whole suite with default test settings, shared by the tests that don't change settings."""
    running = await start_suite(tmp_path_factory.mktemp("suite"))
    yield running
    await running.stop()


@pytest.fixture
async def make_suite(tmp_path: pathlib.Path) -> AsyncIterator[Callable[..., Awaitable[Suite]]]:
    """Start a suite with overridden settings; stopped at the end of the test."""
    started: list[Suite] = []

    async def make(**overrides: Any) -> Suite:
        running = await start_suite(tmp_path, **overrides)
        started.append(running)
        return running

    yield make
    for running in started:
        await running.stop()
