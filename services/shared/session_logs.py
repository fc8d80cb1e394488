"""Each session's own log file, logs/session_<id>.log, with bounded open files and a size cap per file.

Many thousands of sessions must not exhaust file descriptors, so only the most
recently written files stay open; the rest are reopened (in append mode) when
their session logs again. A file is closed when its session's work on this
process is over, and removed when the session expires or is deleted.

Lines are buffered, not flushed one by one: whoever drives the handler calls
flush() (services.shared.logs does it whenever its queue of lines runs dry).
"""

from __future__ import annotations

import functools
import logging
import pathlib
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import TextIO

# Session ids this module will name a file after: what the session service mints, and nothing
# that could climb out of the directory.
SAFE_SESSION_ID = re.compile(r"[0-9a-f]{32}")
TRUNCATED = "… log truncated: the size cap for this session's log was reached\n"

_installed: SessionLogFiles | None = None
# Runs a file action after every line logged before it (set by services.shared.logs when the
# files are written on its listener thread); None runs the action at once.
_run_in_order: Callable[[Callable[[], None]], None] | None = None


class SessionLogFiles(logging.Handler):
    """Routes every record that carries a session id to that session's file."""

    def __init__(self, directory: pathlib.Path, max_bytes: int, max_open_files: int) -> None:
        super().__init__()
        self.directory = directory
        self._max_bytes = max_bytes
        self._max_open_files = max_open_files
        self._open: OrderedDict[str, tuple[TextIO, int]] = OrderedDict()
        self._unflushed: set[str] = set()
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
            line_bytes = len(line.encode())
            if size + line_bytes > self._max_bytes:
                line = TRUNCATED
                size = self._max_bytes
            else:
                size += line_bytes
            handle.write(line)
            self._open[session_id] = (handle, size)
            self._unflushed.add(session_id)
        except OSError:
            self.handleError(record)

    def flush(self) -> None:
        """Write out what the open files buffer."""
        with self.lock or _NO_LOCK:
            for session_id in self._unflushed:
                entry = self._open.get(session_id)
                if entry is not None:
                    try:
                        entry[0].flush()
                    except OSError:
                        pass  # a full disk loses lines, never the service
            self._unflushed.clear()

    def forget(self, session_id: str) -> None:
        """Close the session's file, keeping it (its session's work on this process is over)."""
        with self.lock or _NO_LOCK:
            entry = self._open.pop(session_id, None)
            self._unflushed.discard(session_id)
            if entry is not None:
                _close(entry[0])

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
                _close(handle)
            self._open.clear()
            self._unflushed.clear()
        super().close()

    def _file(self, session_id: str) -> tuple[TextIO, int]:
        entry = self._open.get(session_id)
        if entry is not None:
            self._open.move_to_end(session_id)
            return entry
        while len(self._open) >= self._max_open_files:
            oldest_id, (oldest, _) = self._open.popitem(last=False)
            self._unflushed.discard(oldest_id)
            _close(oldest)
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


def _close(handle: TextIO) -> None:
    try:
        handle.close()
    except OSError:
        pass  # closing flushes; a full disk loses lines, never the service


def install(handler: SessionLogFiles | None, run_in_order: Callable[[Callable[[], None]], None] | None = None) -> None:
    """Make this the process's session log handler (setup_logging does it), and how to order actions on it."""
    global _installed, _run_in_order
    _installed = handler
    _run_in_order = run_in_order


def _after_logged_lines(action: Callable[[], None]) -> None:
    # Behind the lines already logged, or a line still queued would reopen (or re-create) the file.
    if _run_in_order is None:
        action()
    else:
        _run_in_order(action)


def session_log_files() -> SessionLogFiles | None:
    """The process's session log handler, if session files are on."""
    return _installed


def forget_session_log(session_id: str) -> None:
    """Close a session's log file, keeping it: this process is done with the session for now."""
    if _installed is not None:
        _after_logged_lines(functools.partial(_installed.forget, session_id))


def remove_session_log(session_id: str) -> None:
    """Delete a session's log file, if this process keeps them."""
    if _installed is not None:
        _after_logged_lines(functools.partial(_installed.remove, session_id))
