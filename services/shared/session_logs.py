"""Each session's own log file, logs/session_<id>.log, with bounded open files and a size cap per file.

Many thousands of sessions must not exhaust file descriptors, so only the most
recently written files stay open; the rest are reopened (in append mode) when
their session logs again. Files are removed when their session expires or is
deleted.
"""

from __future__ import annotations

import logging
import pathlib
import re
from collections import OrderedDict
from typing import TextIO

# Session ids this module will name a file after: what the session service mints, and nothing
# that could climb out of the directory.
SAFE_SESSION_ID = re.compile(r"[0-9a-f]{32}")
TRUNCATED = "… log truncated: the size cap for this session's log was reached\n"

_installed: SessionLogFiles | None = None


class SessionLogFiles(logging.Handler):
    """Routes every record that carries a session id to that session's file."""

    def __init__(self, directory: pathlib.Path, max_bytes: int, max_open_files: int) -> None:
        super().__init__()
        self.directory = directory
        self._max_bytes = max_bytes
        self._max_open_files = max_open_files
        self._open: OrderedDict[str, tuple[TextIO, int]] = OrderedDict()
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, session_id: str) -> pathlib.Path:
        """The file of a session (whether it exists or not)."""
        return self.directory / f"session_{session_id}.log"

    def open_files(self) -> int:
        """How many session files are open now."""
        return len(self._open)

    def emit(self, record: logging.LogRecord) -> None:
        """Append the formatted record to its session's file, within the size cap."""
        session_id = getattr(record, "session_id", "")
        if not SAFE_SESSION_ID.fullmatch(session_id):
            return
        try:
            line = self.format(record) + "\n"
            handle, size = self._file(session_id)
            if size >= self._max_bytes:
                return
            if size + len(line.encode()) > self._max_bytes:
                line = TRUNCATED
                size = self._max_bytes
            else:
                size += len(line.encode())
            handle.write(line)
            handle.flush()
            self._open[session_id] = (handle, size)
        except OSError:
            self.handleError(record)

    def forget(self, session_id: str) -> None:
        """Close the session's file, keeping it (its session's work on this process is over)."""
        with self.lock or _NO_LOCK:
            entry = self._open.pop(session_id, None)
            if entry is not None:
                entry[0].close()

    def remove(self, session_id: str) -> None:
        """Close and delete the session's file (expiry, delete)."""
        if not SAFE_SESSION_ID.fullmatch(session_id):
            return
        self.forget(session_id)
        self.path(session_id).unlink(missing_ok=True)

    def close(self) -> None:
        """Close every open file."""
        with self.lock or _NO_LOCK:
            for handle, _ in self._open.values():
                handle.close()
            self._open.clear()
        super().close()

    def _file(self, session_id: str) -> tuple[TextIO, int]:
        entry = self._open.get(session_id)
        if entry is not None:
            self._open.move_to_end(session_id)
            return entry
        while len(self._open) >= self._max_open_files:
            _, (oldest, _) = self._open.popitem(last=False)
            oldest.close()
        path = self.path(session_id)
        handle = path.open("a", encoding="utf-8")
        entry = (handle, handle.tell())
        self._open[session_id] = entry
        return entry


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


_NO_LOCK = _NoLock()


def install(handler: SessionLogFiles | None) -> None:
    """Make this the process's session log handler (setup_logging does it)."""
    global _installed
    _installed = handler


def session_log_files() -> SessionLogFiles | None:
    """The process's session log handler, if session files are on."""
    return _installed


def remove_session_log(session_id: str) -> None:
    """Delete a session's log file, if this process keeps them."""
    if _installed is not None:
        _installed.remove(session_id)
