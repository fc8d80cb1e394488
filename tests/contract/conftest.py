"""The buf binary (PyPI buf-bin, installed by `make setup`) and the contract's paths, for the contract tests."""

from __future__ import annotations

import pathlib

import pytest

from tests.tools import require_tool

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
RELEASED_IMAGE = PROTOS / "released" / "roundtable.binpb"


@pytest.fixture(scope="session")
def buf() -> str:
    """Path of the buf binary; skips (or fails under ROUNDTABLE_REQUIRE_TOOLS=1) without it."""
    return require_tool("buf")
