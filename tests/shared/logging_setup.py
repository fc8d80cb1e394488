"""The service processes' logging set-up, in a test: console captured, restored afterwards."""

from __future__ import annotations

import io
import logging
import pathlib
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from services.shared.logs import setup_logging, stop_logging
from services.shared.session_logs import SessionLogFiles, session_log_files
from services.shared.settings import ServiceSettings


class Console(io.StringIO):
    """A console that remembers which threads wrote to it."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: set[int] = set()

    def write(self, text: str) -> int:
        self.writers.add(threading.get_ident())
        return super().write(text)


@contextmanager
def service_logging(session_log_dir: pathlib.Path, **settings: Any) -> Iterator[tuple[SessionLogFiles, Console]]:
    """setup_logging as a service process runs it; yields its session files and console."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    console = Console()
    real_stderr, sys.stderr = sys.stderr, console
    try:
        setup_logging(ServiceSettings(session_log_dir=session_log_dir, **settings), "test")
    finally:
        sys.stderr = real_stderr
    files = session_log_files()
    assert files is not None
    try:
        yield files, console
    finally:
        stop_logging()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
