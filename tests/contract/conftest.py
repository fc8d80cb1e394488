"""The buf binary (PyPI buf-bin, installed by `make setup`) for the contract tests."""

from __future__ import annotations

import pathlib
import shutil
import sys

import pytest

from tests.tools import require

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
RELEASED_IMAGE = PROTOS / "released" / "roundtable.binpb"
MISSING_BUF = "buf not found: make setup (or .venv/bin/pip install buf-bin==1.75.0)"


def find_buf() -> str | None:
    """The buf beside this interpreter (the venv's, from buf-bin), else the one on PATH."""
    beside = pathlib.Path(sys.executable).parent / "buf"
    return str(beside) if beside.exists() else shutil.which("buf")


@pytest.fixture(scope="session")
def buf() -> str:
    """Path of the buf binary; skips (or fails under ROUNDTABLE_REQUIRE_TOOLS=1) without it."""
    return require(find_buf(), MISSING_BUF)
