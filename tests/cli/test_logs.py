"""The session log viewer: refuses anything but a session id, finds what one session logged."""

from __future__ import annotations

import argparse
import io
import logging
import pathlib
import secrets

import pytest

from services.cli.logs import add_parser, follow, run
from services.shared.logs import FILE_FORMAT, SessionContextFilter, session_context
from services.shared.session_logs import SessionLogFiles


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


@pytest.fixture
def log_dir(tmp_path: pathlib.Path) -> tuple[pathlib.Path, list[str]]:
    files = SessionLogFiles(tmp_path / "logs", max_bytes=100_000, max_open_files=4)
    files.addFilter(SessionContextFilter())
    files.setFormatter(logging.Formatter(FILE_FORMAT))
    logger = logging.getLogger("tests.viewer")
    ids = [secrets.token_hex(16) for _ in range(3)]
    for index, session_id in enumerate(ids):
        with session_context(session_id, "科学家"):
            for line in range(3):
                files.handle(logger.makeRecord(logger.name, logging.INFO, "", 0, f"step {line} of {index}", (), None))
    with session_context(ids[1]):
        files.handle(logger.makeRecord(logger.name, logging.INFO, "", 0, "needle-7 only here", (), None))
    files.close()
    return tmp_path / "logs", ids


@pytest.mark.parametrize("hostile", ["../../etc/passwd", "..", "session_x", "A" * 32, "0" * 31, "/etc/hostname"])
def test_viewer_refuses_anything_but_a_session_id(log_dir: tuple[pathlib.Path, list[str]], hostile: str) -> None:
    directory, _ = log_dir
    for command in ("show", "follow"):
        assert run(parse("logs", "--dir", str(directory), command, hostile), io.StringIO()) == 2
    assert run(parse("logs", "--dir", str(directory), "search", "x", "--session", hostile), io.StringIO()) == 2


def test_search_finds_a_string_only_in_the_session_that_logged_it(log_dir: tuple[pathlib.Path, list[str]]) -> None:
    directory, ids = log_dir
    out = io.StringIO()
    assert run(parse("logs", "--dir", str(directory), "search", "needle-7"), out) == 0
    assert out.getvalue().splitlines() == [line for line in out.getvalue().splitlines() if line.startswith(ids[1])]
    assert len(out.getvalue().splitlines()) == 1
    regex = io.StringIO()
    assert run(parse("logs", "--dir", str(directory), "search", "--regex", r"step [02] of 2$"), regex) == 0
    assert {line.split(":")[0] for line in regex.getvalue().splitlines()} == {ids[2]}
    assert run(parse("logs", "--dir", str(directory), "search", "--regex", "("), io.StringIO()) == 2
    assert run(parse("logs", "--dir", str(directory), "search", "absent-string"), io.StringIO()) == 1


def test_list_show_recent_and_follow(log_dir: tuple[pathlib.Path, list[str]]) -> None:
    directory, ids = log_dir
    listing = io.StringIO()
    assert run(parse("logs", "--dir", str(directory), "list"), listing) == 0
    assert {line.split()[0] for line in listing.getvalue().splitlines()} == set(ids)
    shown = io.StringIO()
    assert run(parse("logs", "--dir", str(directory), "show", ids[0]), shown) == 0
    assert all(f"Session-{ids[0]}-Agent-科学家" in line for line in shown.getvalue().splitlines())
    latest = io.StringIO()
    assert run(parse("logs", "--dir", str(directory), "recent", "--sessions", "2", "--lines", "1"), latest) == 0
    assert latest.getvalue().count("── ") == 2
    followed = io.StringIO()
    follow(directory / f"session_{ids[2]}.log", followed, poll_seconds=0.01, stop_after_seconds=0.2)
    assert followed.getvalue().count("step") == 3
