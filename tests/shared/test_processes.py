"""The process supervisor: free ports, a child's ready line, its stop (SIGTERM, then SIGKILL), a private Redis."""

from __future__ import annotations

import pathlib
import socket
import sys
import time

import pytest

from services.shared.processes import (
    RedisProcess,
    free_ports,
    redis_config,
    start_child,
    stop_child,
    stop_together,
)
from tests.redis_server import require_redis_server

# A child that prints a ready line like a Roundtable server, then waits; SIGTERM ends it with code 0.
READY_CHILD = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("fake listening on 127.0.0.1:4321 metrics 9876", flush=True)
while True:
    time.sleep(1)
"""
# The same, deaf to SIGTERM: only SIGKILL ends it.
STUBBORN_CHILD = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("stubborn listening on 127.0.0.1:4322", flush=True)
while True:
    time.sleep(1)
"""


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


async def test_a_child_is_ready_at_its_listening_line_and_stops_on_sigterm(tmp_path: pathlib.Path) -> None:
    child = await start_child("fake", [sys.executable, "-c", READY_CHILD], tmp_path / "fake.log")
    try:
        assert (child.address, child.port, child.metrics_port) == ("127.0.0.1:4321", 4321, 9876)
        assert child.running
    finally:
        await stop_child(child, grace_seconds=10)
    assert child.process.returncode == 0  # its own SIGTERM handler ran: a graceful stop, not a kill


async def test_a_child_that_exits_before_it_is_ready_raises_with_its_log(tmp_path: pathlib.Path) -> None:
    script = "import sys; print('port already taken', file=sys.stderr); sys.exit(3)"
    with pytest.raises(RuntimeError, match=r"(?s)exited during start-up \(code 3\).*port already taken"):
        await start_child("broken", [sys.executable, "-c", script], tmp_path / "broken.log")


async def test_a_child_that_never_gets_ready_is_stopped_after_the_timeout(tmp_path: pathlib.Path) -> None:
    script = "import time; time.sleep(60)"
    with pytest.raises(TimeoutError):
        await start_child("silent", [sys.executable, "-c", script], tmp_path / "s.log", ready_timeout_seconds=0.5)


async def test_a_child_deaf_to_sigterm_is_killed_after_the_grace(tmp_path: pathlib.Path) -> None:
    stubborn = await start_child("stubborn", [sys.executable, "-c", STUBBORN_CHILD], tmp_path / "stubborn.log")
    polite = await start_child("polite", [sys.executable, "-c", READY_CHILD], tmp_path / "polite.log")
    started = time.monotonic()
    await stop_together([stubborn, polite], grace_seconds=0.5)
    assert stubborn.process.returncode == -9  # SIGKILL
    assert polite.process.returncode == 0
    assert time.monotonic() - started < 10  # the grace bounds the wait


def test_the_redis_config_keeps_data_and_log_in_its_directory(tmp_path: pathlib.Path) -> None:
    lines = redis_config(6390, tmp_path, appendfsync="always").splitlines()
    assert "port 6390" in lines
    assert "appendonly yes" in lines and "appendfsync always" in lines
    assert f'dir "{tmp_path.resolve()}"' in lines
    assert f'logfile "{tmp_path.resolve() / "redis.log"}"' in lines


async def test_a_private_redis_answers_until_paused_and_keeps_its_port_across_a_restart(
    tmp_path: pathlib.Path,
) -> None:
    redis = RedisProcess(require_redis_server(), tmp_path / "redis")
    await redis.start()
    try:
        assert await redis.ping()
        redis.pause()
        assert not await redis.ping()
        redis.resume()
        assert await redis.ping()
        port = redis.port
        await redis.stop()
        assert not redis.running and not await redis.ping()
        await redis.start()
        assert redis.port == port and await redis.ping()
    finally:
        await redis.stop()
