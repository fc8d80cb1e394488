"""Shared fixtures: one suite of real servers for the session, and a factory for tests that need their own."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.suite import Suite, start_suite


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
