"""Per-session logs: each line in its own session's file, tagged on the console, bounded, removed at expiry."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import pathlib
import re
import secrets
from collections.abc import Awaitable, Callable, Iterator

import pytest

from services.gen.roundtable.session.v1 import session_pb2
from services.session.auth import ANONYMOUS
from services.shared.logs import FILE_FORMAT, TEXT_FORMAT, SessionContextFilter, flush, session_context
from services.shared.session_logs import TRUNCATED, SessionLogFiles, install
from tests.suite import Suite, run_to_end

MakeSuite = Callable[..., Awaitable[Suite]]
logger = logging.getLogger("tests.session_logs")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def files(tmp_path: pathlib.Path) -> Iterator[SessionLogFiles]:
    handler = SessionLogFiles(tmp_path / "logs", max_bytes=4096, max_open_files=16)
    handler.addFilter(SessionContextFilter())
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    yield handler
    handler.close()


def record(message: str) -> logging.LogRecord:
    return logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, (), None)


def test_two_thousand_live_sessions_keep_descriptors_bounded(files: SessionLogFiles) -> None:
    before = open_fds()
    ids = [secrets.token_hex(16) for _ in range(2000)]
    for round_number in range(2):
        for session_id in ids:
            with session_context(session_id):
                files.handle(record(f"line {round_number} of {session_id}"))
            assert files.open_files() <= 16
        files.flush()  # every session's lines written: 2,000 files through 16 descriptors
        assert files.open_files() <= 16
    assert open_fds() <= before + 16
    for session_id in ids[:50]:
        lines = files.path(session_id).read_text().splitlines()
        assert len(lines) == 2
        assert all(f"Session-{session_id}" in line and line.endswith(f"of {session_id}") for line in lines)


def test_a_file_stops_growing_at_its_cap(files: SessionLogFiles) -> None:
    session_id = secrets.token_hex(16)
    with session_context(session_id):
        for i in range(500):
            files.handle(record(f"line {i} " + "x" * 40))
    files.flush()  # lines are buffered; the listener thread flushes them in a service
    text = files.path(session_id).read_text()
    assert len(text.encode()) <= 4096
    assert text.endswith(TRUNCATED)
    assert text.count(TRUNCATED) == 1


def test_lines_held_between_flushes_are_written_in_order_once_per_session(files: SessionLogFiles) -> None:
    ids = [secrets.token_hex(16) for _ in range(40)]
    for i in range(5):
        for session_id in ids:
            with session_context(session_id):
                files.handle(record(f"line {i} of {session_id}"))
    assert not any(files.path(session_id).exists() for session_id in ids)  # held, not written line by line
    files.flush()
    for session_id in ids:
        lines = files.path(session_id).read_text().splitlines()
        assert [line.rsplit(" - ", 1)[1] for line in lines] == [f"line {i} of {session_id}" for i in range(5)]


def test_a_removed_session_loses_its_held_lines_and_a_forgotten_one_keeps_them(files: SessionLogFiles) -> None:
    removed, forgotten = secrets.token_hex(16), secrets.token_hex(16)
    for session_id in (removed, forgotten):
        with session_context(session_id):
            files.handle(record(f"last words of {session_id}"))
    files.remove(removed)
    files.forget(forgotten)
    files.flush()
    assert not files.path(removed).exists()
    assert files.path(forgotten).read_text().endswith(f"last words of {forgotten}\n")
    assert files.open_files() == 0


def test_ids_that_could_name_other_files_are_never_used(files: SessionLogFiles) -> None:
    for hostile in ("../../etc/passwd", "a/b", "", "x" * 32, "A" * 32):
        with session_context(hostile):
            files.handle(record("hostile"))
        files.remove(hostile)
    assert list(files.directory.iterdir()) == []


@pytest.fixture
def installed(files: SessionLogFiles) -> Iterator[tuple[SessionLogFiles, io.StringIO]]:
    console_text = io.StringIO()
    console = logging.StreamHandler(console_text)
    console.addFilter(SessionContextFilter())
    console.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(files)
    root.addHandler(console)
    root.setLevel(logging.INFO)
    install(files)
    yield files, console_text
    install(None)
    root.removeHandler(files)
    root.removeHandler(console)
    root.setLevel(previous_level)


async def test_fifty_concurrent_sessions_log_only_into_their_own_files_and_go_at_expiry(
    make_suite: MakeSuite, installed: tuple[SessionLogFiles, io.StringIO]
) -> None:
    files, console = installed
    suite = await make_suite(session={"session_timeout_hours": 1.5 / 3600, "cleanup_interval_seconds": 0.2})
    stub = suite.session()
    outcomes = await asyncio.gather(
        *(
            run_to_end(stub, session_pb2.CreateDiscussionRequest(topic=f"logs {i}", personas=["engineer", "scientist"]))
            for i in range(50)
        )
    )
    # Below the public API a discussion is known by its store id (ids are scoped to their owner), and
    # its log file and logger names carry that id: two principals may both call theirs "P".
    ids = [suite.session_service.store_id(ANONYMOUS, final.discussion_id) for final, _ in outcomes]
    assert flush()
    for session_id in ids:
        lines = files.path(session_id).read_text(encoding="utf-8").splitlines()
        assert any("创建新讨论会话" in line for line in lines)
        assert any(f"Session-{session_id}-Agent-工程师" in line for line in lines)  # the agents' lines too
        for line in lines:
            names = set(re.findall(r"Session-([0-9a-f]{32})", line))
            assert names == {session_id}, line
    tagged = [line for line in console.getvalue().splitlines() if re.search(r"- Session-[0-9a-f]{32}", line)]
    assert tagged
    for line in tagged:
        logger_id = re.search(r"- Session-([0-9a-f]{32})", line)
        assert logger_id is not None and line.split(" - ")[1] == f"[Session-{logger_id.group(1)}]", line
    async with asyncio.timeout(10):
        while any(files.path(i).exists() for i in ids):  # noqa: ASYNC110 - the sweeper runs on its own
            await asyncio.sleep(0.1)
