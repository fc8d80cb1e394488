"""Markers of the CLI tests: the same local_model marker as the agent tests."""

from tests.agents.conftest import pytest_configure

__all__ = ["pytest_configure"]
