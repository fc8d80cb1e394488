"""Fixtures of the hostile-input fuzz: its own suite, a monitor to poison, and the servers' error log.

The fuzz gets a suite of its own rather than the shared `suite`: it leaves thousands of
discussions, agent sets and monitor reports behind, which other tests must not see.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import pytest
from prometheus_client import CollectorRegistry

from services.monitor.service import MonitorService
from services.monitor.settings import MonitorSettings
from services.shared.server import ServiceHost
from tests.fuzz.harness import RPCS, ErrorLog
from tests.fuzz.plans import ProbeSource
from tests.fuzz.plans import probe_source as start_probe_source
from tests.suite import Suite, start_suite

# Few slots, so the valid CreateDiscussion requests among the generated ones mostly wait or are
# turned away (RESOURCE_EXHAUSTED) instead of each running a whole discussion at once on 2 cores.
FUZZ_SESSION_SETTINGS = {"max_concurrent_sessions": 16}


def pytest_configure(config: pytest.Config) -> None:
    # Part of the normal run; `-m "not fuzz"` leaves it out when iterating on something else.
    config.addinivalue_line("markers", "fuzz: hostile-input fuzz of every RPC (tests/fuzz)")


@pytest.fixture(scope="package")
def error_log() -> Iterator[ErrorLog]:
    """Every ERROR record logged in the process while the fuzz runs (servers run in-process)."""
    handler = ErrorLog()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


@pytest.fixture(scope="package")
async def fuzz_suite(tmp_path_factory: pytest.TempPathFactory, error_log: ErrorLog) -> AsyncIterator[Suite]:
    running = await start_suite(tmp_path_factory.mktemp("fuzz"), session=FUZZ_SESSION_SETTINGS)
    yield running
    await running.stop()


@pytest.fixture(scope="package")
async def report_monitor() -> AsyncIterator[ServiceHost]:
    """A monitor of its own for the ReportInstance fuzz, whose reports are garbage by design.

    Instances go stale after a few seconds, so whatever the fuzz reported leaves its fleet view soon.
    """
    settings = MonitorSettings(port=0, metrics_port=-1, stale_after_seconds=3.0)
    host = ServiceHost(settings, MonitorService(settings, registry=CollectorRegistry()))
    await host.start()
    yield host
    await host.stop(grace_seconds=0)


@pytest.fixture(scope="package")
def probe_source() -> Iterator[ProbeSource]:
    """Generated probes for every RPC, drawn in another process ahead of the tests that send them."""
    with start_probe_source(list(RPCS)) as source:
        yield source
