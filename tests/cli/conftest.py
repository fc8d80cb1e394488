"""Fixtures of the CLI tests, and the same local_model marker as the agent tests."""

import pytest

from services.cli.launcher import Addresses
from services.shared.processes import free_ports
from tests.agents.conftest import pytest_configure

__all__ = ["pytest_configure"]


@pytest.fixture
def free_addresses() -> Addresses:
    """Where a suite started by start_suite would listen: free loopback ports for every service and metrics."""
    session, agents, monitor, simulator, m1, m2, m3 = free_ports(7)
    return Addresses(
        session=f"127.0.0.1:{session}",
        agents=f"127.0.0.1:{agents}",
        monitor=f"127.0.0.1:{monitor}",
        simulator_port=simulator,
        metrics_ports=(m1, m2, m3),
    )
