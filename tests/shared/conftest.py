"""Fixtures for the shared-layer tests: monitor hosts, the smallest real service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from services.monitor.service import MonitorService
from services.monitor.settings import MonitorSettings
from services.shared.server import ServiceHost


def monitor_settings(**overrides: Any) -> MonitorSettings:
    """Monitor settings on a free port, metrics off unless overridden."""
    return MonitorSettings(**{"port": 0, "metrics_port": -1, **overrides})


@pytest.fixture
async def start_monitor() -> AsyncIterator[Callable[[MonitorSettings], Awaitable[ServiceHost]]]:
    """Start monitors with these settings; each is stopped at the end of the test."""
    hosts: list[ServiceHost] = []

    async def start(settings: MonitorSettings) -> ServiceHost:
        # Its own registry, so its fleet gauges don't clash with other monitors in this process.
        host = ServiceHost(settings, MonitorService(settings, registry=CollectorRegistry()))
        await host.start()
        hosts.append(host)
        return host

    yield start
    for host in hosts:
        await host.stop(grace_seconds=0)
