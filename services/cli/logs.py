"""`roundtable logs`: list session logs, show one, search them, recent activity, follow one live."""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import TextIO

from services.shared.session_logs import SAFE_SESSION_ID

FILE_NAME = re.compile(r"session_([0-9a-f]{32})\.log")


class LogViewerError(ValueError):
    """Input the viewer refuses, with a message for the person who typed it."""


def session_file(directory: pathlib.Path, session_id: str) -> pathlib.Path:
    """The log file of a session id, checked before it touches the filesystem (no path tricks)."""
    if not SAFE_SESSION_ID.fullmatch(session_id):
        raise LogViewerError(f"{session_id[:80]!r} is not a session id (32 hex characters)")
    path = directory / f"session_{session_id}.log"
    if not path.is_file():
        raise LogViewerError(f"no log for session {session_id} in {directory}")
    return path


def session_files(directory: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    """(session id, file) for every session log, most recently written first."""
    found = []
    for path in directory.glob("session_*.log") if directory.is_dir() else []:
        match = FILE_NAME.fullmatch(path.name)
        if match:
            found.append((match.group(1), path))
    return sorted(found, key=lambda item: item[1].stat().st_mtime, reverse=True)


def list_sessions(directory: pathlib.Path, out: TextIO) -> None:
    """One line a session: id, last write, size, last line."""
    for session_id, path in session_files(directory):
        stat = path.stat()
        written = datetime.fromtimestamp(stat.st_mtime).strftime("%Y-%m-%d %H:%M:%S")
        last = _last_line(path)
        print(f"{session_id}  {written}  {stat.st_size:>8} B  {last[:80]}", file=out)


def search(directory: pathlib.Path, pattern: str, regex: bool, session_id: str | None, out: TextIO) -> int:
    """Print matching lines as `<session id>: <line>`; returns how many matched."""
    try:
        matcher = re.compile(pattern if regex else re.escape(pattern))
    except re.error as error:
        raise LogViewerError(f"not a valid regular expression: {error}") from error
    targets = [(session_id, session_file(directory, session_id))] if session_id else session_files(directory)
    count = 0
    for found_id, path in targets:
        for line in _lines(path):
            if matcher.search(line):
                print(f"{found_id}: {line}", file=out)
                count += 1
    return count


def recent(directory: pathlib.Path, sessions: int, lines: int, out: TextIO) -> None:
    """The last lines of the most recently active sessions."""
    for session_id, path in session_files(directory)[:sessions]:
        print(f"── {session_id}", file=out)
        for line in list(_lines(path))[-lines:]:
            print(f"   {line}", file=out)


def follow(path: pathlib.Path, out: TextIO, poll_seconds: float = 0.5, stop_after_seconds: float | None = None) -> None:
    """Print the file, then new lines as they are written (Ctrl-C stops)."""
    deadline = None if stop_after_seconds is None else time.monotonic() + stop_after_seconds
    with path.open(encoding="utf-8", errors="replace") as handle:
        while deadline is None or time.monotonic() < deadline:
            line = handle.readline()
            if line:
                out.write(line)
                out.flush()
            elif not path.exists():
                print("(the session's log was removed: it expired or was deleted)", file=out)
                return
            else:
                time.sleep(poll_seconds)


def _lines(path: pathlib.Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            yield line.rstrip("\n")


def _last_line(path: pathlib.Path) -> str:
    last = ""
    for last in _lines(path):  # noqa: B007 - keeps the final one
        pass
    return last


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `logs` sub-command and its own sub-commands."""
    logs = commands.add_parser("logs", help="session log files: list, show, search, recent, follow")
    logs.add_argument("--dir", default="logs", type=pathlib.Path, help="the services' session_log_dir")
    actions = logs.add_subparsers(dest="logs_command", required=True)
    actions.add_parser("list", help="every session log, most recent first")
    show = actions.add_parser("show", help="one session's log")
    show.add_argument("session_id")
    find = actions.add_parser("search", help="lines containing a string (or matching --regex), across sessions")
    find.add_argument("pattern")
    find.add_argument("--regex", action="store_true")
    find.add_argument("--session", default=None, help="only this session")
    latest = actions.add_parser("recent", help="the last lines of the most recently active sessions")
    latest.add_argument("--sessions", type=int, default=5)
    latest.add_argument("--lines", type=int, default=5)
    tail = actions.add_parser("follow", help="a session's log, live")
    tail.add_argument("session_id")


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Carry out a parsed `logs` command; 0 on success, 1 when a search finds nothing, 2 on bad input."""
    directory: pathlib.Path = args.dir
    try:
        if args.logs_command == "list":
            list_sessions(directory, out)
        elif args.logs_command == "show":
            for line in _lines(session_file(directory, args.session_id)):
                print(line, file=out)
        elif args.logs_command == "search":
            return 0 if search(directory, args.pattern, args.regex, args.session, out) else 1
        elif args.logs_command == "recent":
            recent(directory, args.sessions, args.lines, out)
        elif args.logs_command == "follow":
            follow(session_file(directory, args.session_id), out)
    except LogViewerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
