"""The server host every service runs in: its event loop, its event-loop lag metric, gRPC core's queue limit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from services.monitor.settings import MonitorSettings
from services.shared.metrics import watch_event_loop_lag
from services.shared.server import ServiceHost, loop_factory
from services.shared.settings import load_settings
from tests.shared.conftest import monitor_settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_event_loop_lag_shows_a_coroutine_that_blocks_the_loop() -> None:
    registry = CollectorRegistry()
    lag = Histogram("lag_seconds", "Test lag.", buckets=(0.001, 0.01, 0.1, 0.25, 0.5, 1), registry=registry)
    watch = asyncio.create_task(watch_event_loop_lag(0.02, lag))
    try:
        await asyncio.sleep(0.2)
        before_count, before_sum = sample(registry, "lag_seconds_count"), sample(registry, "lag_seconds_sum")
        before_late = before_count - sample(registry, "lag_seconds_bucket", le="0.25")
        assert before_count >= 3, "the watcher samples while the loop is free"

        async def blocking() -> None:
            time.sleep(0.3)  # noqa: ASYNC251  (the mistake the metric exists to show)

        await blocking()
        await asyncio.sleep(0.1)  # the watcher wakes up, late, and records it
        count, total = sample(registry, "lag_seconds_count"), sample(registry, "lag_seconds_sum")
        late = count - sample(registry, "lag_seconds_bucket", le="0.25")
        # The watcher slept at most 0.02 s when the loop was blocked for 0.3 s: it woke 0.28 s late or more.
        assert late - before_late >= 1
        assert total - before_sum >= 0.28
        assert count > before_count
    finally:
        watch.cancel()


def scraped(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


async def test_every_host_samples_its_event_loop_lag_until_it_stops(
    start_monitor: Callable[..., Awaitable[ServiceHost]],
) -> None:
    host = await start_monitor(
        monitor_settings(metrics_port=0, enable_reflection=False, event_loop_lag_interval_seconds=0.01)
    )
    assert host.metrics is not None
    url = f"http://127.0.0.1:{host.metrics.port}/metrics"
    first = await asyncio.to_thread(scraped, url, "roundtable_event_loop_lag_seconds_count")
    deadline = time.monotonic() + 10
    while await asyncio.to_thread(scraped, url, "roundtable_event_loop_lag_seconds_count") == first:
        assert time.monotonic() < deadline, "the host records no event-loop lag"
        await asyncio.sleep(0.05)
    watch = host._lag_watch
    await host.stop(grace_seconds=0)
    assert watch is not None and watch.cancelled()


def health_checks_sent_while(address: str, calls: int, loop_blocked: threading.Event) -> list[grpc.StatusCode]:
    """From another thread: connect, wait until the server's loop is blocked, then send `calls` health checks."""
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = health_pb2_grpc.HealthStub(channel)
        loop_blocked.wait(timeout=10)
        pending = [stub.Check.future(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(calls)]
        codes = []
        for call in pending:
            try:
                call.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
        return codes


@pytest.mark.parametrize(("max_unrequested_rpc_seconds", "cancelled"), [(1, True), (None, False)])
async def test_calls_queued_behind_a_busy_loop_wait_as_long_as_the_setting_allows(
    start_monitor: Callable[..., Awaitable[ServiceHost]], max_unrequested_rpc_seconds: int | None, cancelled: bool
) -> None:
    # While the loop is busy, calls gRPC core received sit unrequested; past the limit core cancels them
    # without the application ever seeing them (bench/findings.md, 1b). The default waits for the loop.
    limit = {} if max_unrequested_rpc_seconds is None else {"max_unrequested_rpc_seconds": max_unrequested_rpc_seconds}
    host = await start_monitor(monitor_settings(enable_reflection=False, **limit))
    loop_blocked = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        codes = asyncio.get_running_loop().run_in_executor(
            pool, health_checks_sent_while, host.address, 5, loop_blocked
        )
        await asyncio.sleep(0.5)  # the client connects
        loop_blocked.set()
        time.sleep(2.5)  # noqa: ASYNC251  (a saturated loop, on purpose)
        results = await codes
    if cancelled:
        # The aio server requests one call ahead, so one is matched at once and answered; core cancels the rest.
        assert sorted(code.name for code in results) == ["CANCELLED"] * 4 + ["OK"], results
    else:
        assert set(results) == {grpc.StatusCode.OK}, results


def test_event_loop_setting_picks_the_loop() -> None:
    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None
    assert load_settings(MonitorSettings, ["--event-loop", "asyncio"]).event_loop == "asyncio"
    with pytest.raises(SystemExit) as caught:
        load_settings(MonitorSettings, ["--event-loop", "trio"])
    assert caught.value.code == 2


@pytest.mark.parametrize(("event_loop", "expected"), [("auto", "uvloop"), ("asyncio", "asyncio")])
async def test_a_service_process_serves_on_its_event_loop_and_stops_on_sigterm(
    tmp_path: Path, event_loop: str, expected: str
) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ROUNDTABLE_")}
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.monitor",
            "--port", "0",
            "--metrics-port", "0",
            "--event-loop", event_loop,
            "--event-loop-lag-interval-seconds", "0.01",
            cwd=REPO_ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=15)).decode()
        match = re.fullmatch(r"monitor listening on (\S+) metrics (\d+)\n", line)
        assert match, f"unexpected line {line!r}; stderr: {log.read_text()}"
        async with grpc.aio.insecure_channel(match.group(1)) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        url = f"http://127.0.0.1:{match.group(2)}/metrics"
        deadline = time.monotonic() + 10
        while await asyncio.to_thread(scraped, url, "roundtable_event_loop_lag_seconds_count") == 0:
            assert time.monotonic() < deadline, "no event-loop lag sample on /metrics"
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0
        text = log.read_text()
        assert f"; {expected} event loop)" in text, text
        assert "monitor service stopped" in text, text
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
