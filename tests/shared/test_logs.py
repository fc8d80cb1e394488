"""Service logging: stamped on the task that logs, written by one listener thread, nothing lost or reordered."""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import re
import secrets
import threading

from services.shared.logs import flush, session_context, stop_logging
from services.shared.session_logs import forget_session_log, remove_session_log
from tests.shared.logging_setup import service_logging

logger = logging.getLogger("services.agents.discussion")
TIME = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}"


async def test_lines_keep_the_seed_formats_and_their_own_session_and_are_written_off_the_loop(
    tmp_path: pathlib.Path,
) -> None:
    ids = [secrets.token_hex(16) for _ in range(2)]

    async def agent(session_id: str) -> None:
        with session_context(session_id, "科学家"):
            for step in range(20):
                logger.info("科学家Agent正在分析话题: %s (%d)", session_id, step)
                await asyncio.sleep(0)

    with service_logging(tmp_path / "logs") as (files, console):
        await asyncio.gather(*(agent(session_id) for session_id in ids))
        assert flush()
        for session_id in ids:
            lines = files.path(session_id).read_text(encoding="utf-8").splitlines()
            name = f"Session-{session_id}-Agent-科学家"
            assert len(lines) == 20
            for step, line in enumerate(lines):
                assert re.fullmatch(rf"{TIME} - {name} - INFO - 科学家Agent正在分析话题: {session_id} \({step}\)", line)
            console_lines = [line for line in console.getvalue().splitlines() if name in line]
            assert len(console_lines) == 20
            assert all(
                re.fullmatch(rf"{TIME} - \[Session-{session_id}\] - {name} - INFO - .*", x) for x in console_lines
            )
        assert console.writers and threading.get_ident() not in console.writers


def test_arguments_are_read_when_the_line_is_logged(tmp_path: pathlib.Path) -> None:
    session_id = secrets.token_hex(16)
    with service_logging(tmp_path / "logs") as (files, _):
        answer = ["first"]
        with session_context(session_id):
            logger.info("memory: %s", answer)
        answer.append("changed later")
        assert flush()
        assert files.path(session_id).read_text(encoding="utf-8").endswith(" - INFO - memory: ['first']\n")


def test_a_traceback_reaches_the_file_and_the_json_console(tmp_path: pathlib.Path) -> None:
    session_id = secrets.token_hex(16)
    with service_logging(tmp_path / "logs", log_format="json") as (files, console):
        with session_context(session_id, "工程师"):
            try:
                1 / 0  # noqa: B018 - the error is the point
            except ZeroDivisionError:
                logger.exception("the call failed")
        assert flush()
        (in_file,) = [json.loads(line) for line in files.path(session_id).read_text(encoding="utf-8").splitlines()]
        (on_console,) = [json.loads(line) for line in console.getvalue().splitlines() if session_id in line]
    for entry in (in_file, on_console):
        assert entry["message"] == "the call failed"
        assert entry["severity"] == "ERROR"
        assert (entry["session_id"], entry["agent"]) == (session_id, "工程师")
        assert entry["exception"].startswith("Traceback") and "ZeroDivisionError" in entry["exception"]


def test_a_removed_log_is_not_recreated_by_its_lines_still_queued(tmp_path: pathlib.Path) -> None:
    removed, forgotten = secrets.token_hex(16), secrets.token_hex(16)
    with service_logging(tmp_path / "logs") as (files, _):
        for session_id in (removed, forgotten):
            with session_context(session_id):
                for step in range(2000):
                    logger.info("step %d", step)
        remove_session_log(removed)
        forget_session_log(forgotten)
        assert flush()
        assert not files.path(removed).exists()
        assert files.open_files() == 0
        assert len(files.path(forgotten).read_text(encoding="utf-8").splitlines()) == 2000


def test_stopping_writes_every_line_still_queued(tmp_path: pathlib.Path) -> None:
    ids = [secrets.token_hex(16) for _ in range(5)]
    with service_logging(tmp_path / "logs") as (files, console):
        for step in range(3000):
            with session_context(ids[step % 5]):
                logger.info("step %d", step)
        stop_logging()  # what the process's exit hook does
        assert sum(len(files.path(i).read_text(encoding="utf-8").splitlines()) for i in ids) == 3000
        assert console.getvalue().count(" - INFO - step ") == 3000
