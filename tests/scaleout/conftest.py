"""Fixtures of the scale-out tests: a fleet of real replicas behind a real Envoy, state in a real Redis."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.cli.replicas import Fleet, FleetOptions
from tests.tools import require_tool

LEASE_TTL_SECONDS = 3.0


def require_tools() -> None:
    """Skip (fail under ROUNDTABLE_REQUIRE_TOOLS=1) unless Envoy and redis-server are installed."""
    require_tool("envoy")
    require_tool("redis-server")


def fleet_options(tmp_path: pathlib.Path, **overrides: Any) -> FleetOptions:
    """2 session + 2 agent replicas on free ports, a private Redis that fsyncs every write, a slow-ish simulator."""
    settings: dict[str, Any] = {
        "session_replicas": 2,
        "agent_replicas": 2,
        "store": "redis",
        # Every acknowledged write is on disk before the reply: a kill -9 of Redis loses none of them.
        "redis_appendfsync": "always",
        "llm": "sim",
        "max_tokens": 16,
        "session_port": 0,
        "agents_port": 0,
        "envoy_admin_port": 0,
        "monitor_port": 0,
        "monitor_metrics_port": -1,
        "simulator_port": 0,
        "state_dir": tmp_path / "state",
        "log_dir": tmp_path / "log",
        "cwd": tmp_path,
        "session_args": (
            "--lease-ttl-seconds", str(LEASE_TTL_SECONDS),
            "--shutdown-grace-seconds", "1",
            "--report-interval-seconds", "2",
            "--max-concurrent-sessions", "500",
            "--max-concurrent-sessions-per-principal", "500",
            "--session-log-dir", "",
        ),
        "agents_args": ("--shutdown-grace-seconds", "1", "--report-interval-seconds", "2"),
        "simulator_args": ("--first-token-latency-ms", "200", "--tokens-per-second", "80"),
    }  # fmt: skip
    settings.update(overrides)
    return FleetOptions(**settings)


@pytest.fixture
async def fleet(tmp_path: pathlib.Path) -> AsyncIterator[Fleet]:
    """A fresh fleet for one test that kills replicas or Redis."""
    require_tools()
    async with Fleet.start(fleet_options(tmp_path)) as running:
        yield running


@pytest.fixture(scope="module")
async def shared_fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    """One fleet for the tests that leave it as they found it."""
    require_tools()
    async with Fleet.start(fleet_options(tmp_path_factory.mktemp("fleet"))) as running:
        yield running
