"""The `roundtable` command as a user runs it: `up` with a demo, then the suite is gone."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import psutil


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _service_processes(ports: list[int]) -> list[psutil.Process]:
    """Processes of ours still running with one of these ports on their command line."""
    wanted = {str(p) for p in ports}
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(part.startswith("services.") for part in cmdline) and wanted & set(cmdline):
            found.append(process)
    return found


def test_up_runs_a_demo_discussion_and_stops_every_service(tmp_path: pathlib.Path) -> None:
    session, agents, monitor, simulator, m1, m2, m3 = _free_ports(7)
    command = [
        sys.executable,
        "-m",
        "services.cli",
        "up",
        "--session-port", str(session),
        "--agents-port", str(agents),
        "--monitor-port", str(monitor),
        "--simulator-port", str(simulator),
        "--metrics-ports", f"{m1},{m2},{m3}",
        "--demo", "Is a hot dog a sandwich?",
        "--rounds", "2",
        "--exit-after-demo",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[2])}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"session    127.0.0.1:{session}" in out
    assert "SIMULATOR" in out  # nobody mistakes simulated text for a model's
    for persona in ("科学家", "哲学家", "经济学家", "工程师"):
        assert f"┌─ {persona} · round 2" in out
    assert "SUMMARY by 主持人" in out
    assert "● status: COMPLETED" in out
    assert (tmp_path / "var" / "roundtable.db").exists()
    assert "创建新讨论会话" in (tmp_path / "var" / "log" / "session.log").read_text()
    assert _service_processes([session, agents, monitor, simulator]) == []


def test_discuss_against_nothing_says_how_to_start_the_suite() -> None:
    (port,) = _free_ports(1)
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "--address", f"127.0.0.1:{port}", "discuss", "anyone there?"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "UNAVAILABLE" in done.stderr
    assert "roundtable up" in done.stderr
