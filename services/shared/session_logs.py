"""Each session's own log file, logs/session_<id>.log, with bounded open files and a size cap per file.

Many thousands of sessions must not exhaust file descriptors, so only the most
recently written files stay open; the rest are reopened (in append mode) when
their session logs again. A file is closed when its session's work on this
process is over, and removed when the session expires or is deleted.

Lines are held per session, not written one by one: whoever drives the handler
calls flush() (services.shared.logs does it whenever its queue of lines runs dry,
and at least once a second), which appends each session's lines in one write. With
more live sessions than open files, that is one open per session per flush instead
of one per line.
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
        # Formatted lines not yet written, per session, in the order logged.
        self._pending: dict[str, list[str]] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, session_id: str) -> pathlib.Path:
        """The file of a session (whether it exists or not)."""
        return self.directory / f"session_{session_id}.log"

    def open_files(self) -> int:
        """How many session files are open now."""
        return len(self._open)

    def emit(self, record: logging.LogRecord) -> None:
        """Hold the formatted record for its session's file until the next flush()."""
        session_id = getattr(record, "session_id", "")
        if not SAFE_SESSION_ID.fullmatch(session_id):
            return
        self._pending.setdefault(session_id, []).append(self.format(record) + "\n")

    def flush(self) -> None:
        """Append each session's held lines to its file, within the size cap, and flush them."""
        with self.lock or _NO_LOCK:
            pending, self._pending = self._pending, {}
            for session_id, lines in pending.items():
                self._write(session_id, lines)

    def forget(self, session_id: str) -> None:
        """Write and close the session's file, keeping it (its session's work on this process is over)."""
        with self.lock or _NO_LOCK:
            lines = self._pending.pop(session_id, None)
            if lines:
                self._write(session_id, lines)
            entry = self._open.pop(session_id, None)
            if entry is not None:
                _close(entry[0])

    def remove(self, session_id: str) -> None:
        """Close and delete the session's file (expiry, delete); lines still held go with it."""
        if not SAFE_SESSION_ID.fullmatch(session_id):
            return
        with self.lock or _NO_LOCK:
            self._pending.pop(session_id, None)
            entry = self._open.pop(session_id, None)
            if entry is not None:
                _close(entry[0])
            self.path(session_id).unlink(missing_ok=True)

    def close(self) -> None:
        """Write what is held, and close every open file."""
        self.flush()
        with self.lock or _NO_LOCK:
            for handle, _ in self._open.values():
                _close(handle)
            self._open.clear()
        super().close()

    def _write(self, session_id: str, lines: list[str]) -> None:
        try:
            handle, size = self._file(session_id)
            if size >= self._max_bytes:
                return
            kept: list[str] = []
            for line in lines:
                line_bytes = len(line.encode())
                if size + line_bytes > self._max_bytes:
                    kept.append(TRUNCATED)
                    size = self._max_bytes
                    break
                kept.append(line)
                size += line_bytes
            handle.write("".join(kept))
            handle.flush()
            self._open[session_id] = (handle, size)
        except OSError:
            pass  # a full disk loses lines, never the service

    def _file(self, session_id: str) -> tuple[TextIO, int]:
        entry = self._open.get(session_id)
        if entry is not None:
            self._open.move_to_end(session_id)
            return entry
        while len(self._open) >= self._max_open_files:
            _, (oldest, _) = self._open.popitem(last=False)
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
