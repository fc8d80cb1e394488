"""The monitor through real servers: gRPC contract, /metrics, health, self-reporting and the process."""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.monitor.service import MONITOR_SERVICE_NAME, MonitorService
from services.monitor.settings import MonitorSettings
from services.shared.processes import free_port
from services.shared.server import ServiceHost
from services.shared.settings import load_settings
from tests.monitor.fakes import FakeClock, timestamp

REPO_ROOT = Path(__file__).resolve().parents[2]
METHOD = "/roundtable.session.v1.SessionService/GetDiscussion"
# Fake instances started an hour ago, so the monitor diffs their reports instead of counting from zero.
STARTED_AT = time.time() - 3600
BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, math.inf)


def instance_report(
    instance_id: str, cumulative_buckets: list[int], errors: int, active_sessions: int
) -> monitor_pb2.InstanceReport:
    return monitor_pb2.InstanceReport(
        instance_id=instance_id,
        service="session",
        address="127.0.0.1:1",
        started_at=timestamp(STARTED_AT),
        reported_at=timestamp(STARTED_AT + 3600),
        methods=[
            monitor_pb2.MethodCounters(
                method=METHOD,
                handled_total=cumulative_buckets[-1],
                error_total=errors,
                bucket_upper_bounds_seconds=BOUNDS,
                bucket_counts=cumulative_buckets,
            )
        ],
        active_sessions=active_sessions,
        queued_sessions=1,
        session_capacity=50,
        live_agent_sets=active_sessions * 2,
        cpu_percent=25.0,
        rss_bytes=123_456_789,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def monitor(clock: FakeClock) -> AsyncIterator[ServiceHost]:
    settings = MonitorSettings(port=0, metrics_port=0, enable_reflection=False)
    host = ServiceHost(settings, MonitorService(settings, clock=clock))
    await host.start()
    try:
        yield host
    finally:
        await host.stop(grace_seconds=0)


@pytest.fixture
async def channel(monitor: ServiceHost) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(monitor.address) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> monitor_pb2_grpc.MonitorServiceAsyncStub:
    return monitor_pb2_grpc.MonitorServiceStub(channel)


async def send_two_instances(stub: monitor_pb2_grpc.MonitorServiceAsyncStub, clock: FakeClock) -> None:
    """Two session instances, 10 s apart: a adds 90 fast calls, b adds 10 slow failing ones."""
    await stub.ReportInstance(instance_report("session-a", [5, 10, 10, 10, 10, 10], 0, 3))
    await stub.ReportInstance(instance_report("session-b", [0, 0, 0, 0, 20, 20], 2, 4))
    clock.now += 10
    await stub.ReportInstance(instance_report("session-a", [5, 100, 100, 100, 100, 100], 0, 3))
    await stub.ReportInstance(instance_report("session-b", [0, 0, 0, 0, 30, 30], 12, 4))


async def test_summary_and_concurrency_of_two_instances(
    stub: monitor_pb2_grpc.MonitorServiceAsyncStub, clock: FakeClock
) -> None:
    await send_two_instances(stub, clock)

    summary = await stub.GetPerformanceSummary(monitor_pb2.GetPerformanceSummaryRequest())
    assert summary.window_seconds == 60
    assert summary.instances == 2
    [row] = summary.methods
    assert row.method == METHOD
    assert (row.requests, row.errors) == (100, 10)
    assert row.requests_per_second == pytest.approx(10.0)
    assert row.error_rate == pytest.approx(0.1)
    # Summed deltas, cumulative: 0, 90, 90, 90, 100, 100 → p99 is 90 % into the (50, 100] ms bucket.
    assert row.p99_ms == pytest.approx(95.0)
    assert row.p50_ms == pytest.approx(5 + 5 * 50 / 90)

    stats = await stub.GetConcurrencyStats(monitor_pb2.GetConcurrencyStatsRequest())
    assert (stats.active_sessions, stats.queued_sessions, stats.session_capacity) == (7, 2, 100)
    assert stats.live_agent_sets == 14
    assert [row.instance_id for row in stats.instances] == ["session-a", "session-b"]
    assert stats.instances[0].rss_bytes == 123_456_789
    assert abs(stats.instances[0].last_report_at.ToNanoseconds() / 1e9 - time.time()) < 60


async def test_instances_silent_too_long_leave_the_fleet(
    stub: monitor_pb2_grpc.MonitorServiceAsyncStub, clock: FakeClock
) -> None:
    await send_two_instances(stub, clock)
    clock.now += 31
    stats = await stub.GetConcurrencyStats(monitor_pb2.GetConcurrencyStatsRequest())
    assert list(stats.instances) == []
    assert stats.active_sessions == 0


def bad_request_field(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    request = error_details_pb2.BadRequest()
    status.details[0].Unpack(request)
    return request.field_violations[0].field


@pytest.mark.parametrize(
    ("report", "field", "message"),
    [
        (monitor_pb2.InstanceReport(service="session"), "instance_id", "must not be empty"),
        (monitor_pb2.InstanceReport(instance_id="x" * 201, service="session"), "instance_id", "at most 200"),
        (monitor_pb2.InstanceReport(instance_id="a", service="gateway"), "service", "'gateway' is not one of"),
        (
            monitor_pb2.InstanceReport(
                instance_id="a",
                service="agents",
                methods=[monitor_pb2.MethodCounters(method="/x/Y", bucket_upper_bounds_seconds=[math.inf])],
            ),
            "methods[0].bucket_counts",
            "1 bucket bounds but 0 bucket counts",
        ),
    ],
)
async def test_invalid_report_is_rejected(
    stub: monitor_pb2_grpc.MonitorServiceAsyncStub, report: monitor_pb2.InstanceReport, field: str, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ReportInstance(report)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")
    assert bad_request_field(caught.value) == field


@pytest.mark.parametrize("window_seconds", [-1, 3601])
async def test_window_out_of_range_is_rejected(
    stub: monitor_pb2_grpc.MonitorServiceAsyncStub, window_seconds: int
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPerformanceSummary(monitor_pb2.GetPerformanceSummaryRequest(window_seconds=window_seconds))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "window_seconds must be between 1 and 3600" in (caught.value.details() or "")
    assert bad_request_field(caught.value) == "window_seconds"


async def test_metrics_endpoint_exports_the_fleet(
    monitor: ServiceHost, stub: monitor_pb2_grpc.MonitorServiceAsyncStub, clock: FakeClock
) -> None:
    await send_two_instances(stub, clock)
    assert monitor.metrics is not None
    url = f"http://127.0.0.1:{monitor.metrics.port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert "roundtable_fleet_active_sessions 7.0" in body
    assert "roundtable_fleet_session_capacity 100.0" in body
    assert 'roundtable_fleet_instances{service="session"} 2.0' in body
    assert 'roundtable_fleet_instances{service="agents"} 0.0' in body
    assert 'roundtable_fleet_instance_rss_bytes{instance_id="session-a",service="session"} 1.23456789e+08' in body


@pytest.mark.parametrize("service", ["", MONITOR_SERVICE_NAME])
async def test_health_says_serving(channel: grpc.aio.Channel, service: str) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service=service))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_monitor_reports_to_itself_through_the_real_reporter() -> None:
    port = free_port()
    settings = MonitorSettings(
        port=port,
        metrics_port=-1,
        instance_id="monitor-self",
        monitor_address=f"127.0.0.1:{port}",
        report_interval_seconds=0.2,
    )
    host = ServiceHost(settings, MonitorService(settings))
    await host.start()
    try:
        async with grpc.aio.insecure_channel(host.address) as channel:
            stub = monitor_pb2_grpc.MonitorServiceStub(channel)
            report_method = f"/{MONITOR_SERVICE_NAME}/ReportInstance"
            deadline = time.monotonic() + 10
            while True:
                stats = await stub.GetConcurrencyStats(monitor_pb2.GetConcurrencyStatsRequest())
                summary = await stub.GetPerformanceSummary(monitor_pb2.GetPerformanceSummaryRequest())
                listed = [(row.instance_id, row.service) for row in stats.instances]
                methods = {row.method: row for row in summary.methods}
                if ("monitor-self", "monitor") in listed and report_method in methods:
                    break
                assert time.monotonic() < deadline, f"not seen in time: {listed}, {sorted(methods)}"
                await asyncio.sleep(0.1)
            assert methods[report_method].requests >= 1
            assert stats.instances[0].rss_bytes > 0
    finally:
        await host.stop(grace_seconds=0)


async def test_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ROUNDTABLE_")}
    with (tmp_path / "stderr.log").open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.monitor",
            "--port",
            "0",
            "--metrics-port",
            "0",
            cwd=REPO_ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=15)).decode()
        match = re.fullmatch(r"monitor listening on (\S+) metrics (\d+)\n", line)
        assert match, f"unexpected line {line!r}; stderr: {(tmp_path / 'stderr.log').read_text()}"
        async with grpc.aio.insecure_channel(match.group(1)) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            response = await health.Check(health_pb2.HealthCheckRequest(service=MONITOR_SERVICE_NAME), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_settings_come_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUNDTABLE_MONITOR_MAX_WINDOW_SECONDS", "600")
    settings = load_settings(MonitorSettings, ["--stale-after-seconds", "5", "--port", "0"])
    assert (settings.stale_after_seconds, settings.max_window_seconds, settings.port) == (5.0, 600, 0)
    assert (MonitorSettings().port, MonitorSettings().metrics_port) == (50053, 9103)


@pytest.mark.parametrize(
    "argv",
    [["--stale-after-seconds", "0"], ["--history-per-instance", "1"], ["--default-window-seconds", "7200"]],
)
def test_invalid_settings_exit_with_code_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        load_settings(MonitorSettings, argv)
    assert caught.value.code == 2
