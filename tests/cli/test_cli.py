"""The `roundtable` command as a user runs it: `up` with a demo, then the suite is gone."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import grpc
import psutil
import pytest

from services.agents import local_model
from services.cli.launcher import Addresses, start_suite, stop_suite
from services.gen.roundtable.agents.v1 import agents_pb2, agents_pb2_grpc
from services.shared.processes import free_ports
from tests.agents.test_local_model import skip_unless_installed


def _service_processes(ports: list[int]) -> list[psutil.Process]:
    """Processes of ours still running with one of these ports on their command line."""
    wanted = {str(p) for p in ports}
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(part.startswith("services.") for part in cmdline) and wanted & set(cmdline):
            found.append(process)
    return found


def _roundtable_up(
    tmp_path: pathlib.Path, ports: list[int], flags: list[str], timeout_seconds: float
) -> subprocess.CompletedProcess[str]:
    """`roundtable up` on session, agents, monitor, simulator and three metrics ports, in tmp_path, until it exits."""
    session, agents, monitor, simulator, m1, m2, m3 = ports
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
        *flags,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[2])}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout_seconds)


def test_up_runs_a_demo_discussion_and_stops_every_service(tmp_path: pathlib.Path) -> None:
    ports = free_ports(7)
    session, agents, monitor, simulator = ports[:4]
    flags = ["--llm", "sim", "--demo", "Is a hot dog a sandwich?", "--rounds", "2", "--exit-after-demo"]
    done = _roundtable_up(tmp_path, ports, flags, timeout_seconds=120)
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


def test_discuss_against_nothing_says_how_to_start_the_suite_once_its_deadline_passes() -> None:
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "--address", address, "--timeout-seconds", "3", "discuss", "anyone?"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    took_seconds = time.monotonic() - started
    assert done.returncode == 2
    assert "UNAVAILABLE" in done.stderr
    assert f"roundtable up` (looked for {address})" in done.stderr
    # UNAVAILABLE is retried (the SDK's policy) until the deadline, and not past it.
    assert took_seconds < 20, took_seconds


async def test_auto_falls_back_to_the_simulator_loudly_when_the_local_model_is_missing(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    free_addresses: Addresses,
) -> None:
    monkeypatch.setattr(local_model, "missing", lambda: "the local model is not installed (pretend)")
    addresses = free_addresses
    children = await start_suite(addresses, "auto", "memory", {}, tmp_path / "log")
    try:
        assert [c.name for c in children] == ["simulator", "monitor", "agents", "session"]
        assert "NO LOCAL MODEL: the local model is not installed (pretend)" in capsys.readouterr().err
        async with grpc.aio.insecure_channel(addresses.agents) as channel:
            listing = await agents_pb2_grpc.AgentServiceStub(channel).ListPersonas(agents_pb2.ListPersonasRequest())
        assert listing.backend == "simulator"
        assert "SIMULATOR" in listing.notice
    finally:
        await stop_suite(children)


async def test_local_refuses_to_start_without_the_local_model(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, free_addresses: Addresses
) -> None:
    monkeypatch.setattr(local_model, "missing", lambda: "the local model is not installed (pretend)")
    with pytest.raises(RuntimeError, match="pretend"):
        await start_suite(free_addresses, "local", "memory", {}, tmp_path / "log")


@pytest.mark.local_model
def test_up_runs_the_demo_on_the_local_model_when_it_is_installed(tmp_path: pathlib.Path) -> None:
    skip_unless_installed()
    *ports, local = free_ports(8)
    session, agents, monitor, simulator = ports[:4]
    flags = ["--local-model-port", str(local), "--store", "memory", "--max-tokens", "24"]
    flags += ["--demo", "Is a hot dog a sandwich?", "--rounds", "1", "--exit-after-demo"]
    done = _roundtable_up(tmp_path, ports, flags, timeout_seconds=240)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "local model answered the one-token check" in out
    assert f"LLM backend: the local model {local_model.MODEL_NAME}" in out
    assert "SIMULATOR" not in out + done.stderr
    assert "SUMMARY by 主持人" in out
    assert "● status: COMPLETED" in out
    assert _service_processes([session, agents, monitor, simulator]) == []
    assert not any(str(local) in (p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))
