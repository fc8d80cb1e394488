"""Markers of the agent tests."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Register the local_model marker: tests that run the real local model (select with -m local_model)."""
    config.addinivalue_line(
        "markers", "local_model: runs the real local model (SmolLM2 on llama-cpp-python); skipped when not installed"
    )
