"""`roundtable monitor` and `roundtable report`: what the terminal view shows, and the report end to end."""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from rich.console import Console

from services.cli import dashboard, report
from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.monitor.service import MonitorService
from services.monitor.settings import MonitorSettings
from services.shared.server import ServiceHost
from tests.monitor.fakes import FakeClock, timestamp
from tests.monitor.test_alerts_service import BOUNDS, STARTED_AT

GET = "/roundtable.session.v1.SessionService/GetDiscussion"
CREATE = "/roundtable.session.v1.SessionService/CreateDiscussion"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def method_counters(method: str, calls: int, latency_seconds: float, errors: int) -> monitor_pb2.MethodCounters:
    return monitor_pb2.MethodCounters(
        method=method,
        handled_total=calls,
        error_total=errors,
        bucket_upper_bounds_seconds=BOUNDS,
        bucket_counts=[calls if latency_seconds <= bound else 0 for bound in BOUNDS],
    )


def session_report(step: int) -> monitor_pb2.InstanceReport:
    """Step n of a session instance: 30 fast reads and 3 slower creates (1 failing) every 10 s."""
    return monitor_pb2.InstanceReport(
        instance_id="session-1",
        service="session",
        started_at=timestamp(STARTED_AT),
        reported_at=timestamp(time.time()),
        methods=[
            method_counters(GET, 30 * step, 0.002, 0),
            method_counters(CREATE, 3 * step, 0.2, step),
        ],
        active_sessions=12,
        queued_sessions=2,
        session_capacity=40,
        live_agent_sets=12,
        cpu_percent=37.0,
        rss_bytes=300 * 2**20,
    )


@pytest.fixture
async def monitor_with_traffic() -> AsyncIterator[ServiceHost]:
    """A monitor that saw one minute of traffic, with a p99 alert on CreateDiscussion firing."""
    clock = FakeClock()
    settings = MonitorSettings(
        port=0, metrics_port=-1, enable_reflection=False, alert_p99_latency_ms=100, alert_p99_latency_hold_seconds=0
    )
    host = ServiceHost(settings, MonitorService(settings, clock=clock, registry=CollectorRegistry()))
    await host.start()
    try:
        async with grpc.aio.insecure_channel(host.address) as channel:
            stub = monitor_pb2_grpc.MonitorServiceStub(channel)
            for step in range(7):
                if step:
                    clock.now += 10
                await stub.ReportInstance(session_report(step))
        yield host
    finally:
        await host.stop(grace_seconds=0)


def closed_port_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def snapshot() -> dashboard.FleetSnapshot:
    now = time.time()
    return dashboard.FleetSnapshot(
        stats=monitor_pb2.ConcurrencyStats(
            active_sessions=30,
            queued_sessions=4,
            session_capacity=40,
            live_agent_sets=30,
            instances=[
                monitor_pb2.InstanceConcurrency(
                    instance_id="session-7f3a",
                    service="session",
                    active_sessions=30,
                    queued_sessions=4,
                    session_capacity=40,
                    cpu_percent=81.4,
                    rss_bytes=512 * 2**20,
                    last_report_at=timestamp(now - 3),
                ),
                monitor_pb2.InstanceConcurrency(
                    instance_id="agents-c01d", service="agents", live_agent_sets=30, last_report_at=timestamp(now - 1)
                ),
            ],
        ),
        summary=monitor_pb2.PerformanceSummary(
            window_seconds=60,
            instances=2,
            methods=[
                monitor_pb2.MethodSummary(
                    method=GET, requests=600, errors=0, requests_per_second=10, p50_ms=1.2, p95_ms=2.4, p99_ms=4.9
                ),
                monitor_pb2.MethodSummary(
                    method=CREATE,
                    requests=40,
                    errors=4,
                    error_rate=0.1,
                    requests_per_second=0.67,
                    p50_ms=120,
                    p95_ms=480,
                    p99_ms=950.5,
                ),
            ],
        ),
        alerts=monitor_pb2.ListAlertsResponse(
            firing=[
                monitor_pb2.Alert(
                    name="p99_latency",
                    subject=CREATE,
                    state=monitor_pb2.ALERT_STATE_FIRING,
                    summary=f"p99 latency of {CREATE} is 950 ms, above 500 ms for at least 60 s",
                    fired_at=timestamp(now - 120),
                )
            ],
            resolved=[
                monitor_pb2.Alert(
                    name="cpu",
                    subject="session-7f3a",
                    state=monitor_pb2.ALERT_STATE_RESOLVED,
                    summary="CPU use of session-7f3a is back to 40 % (threshold 90 %)",
                    resolved_at=timestamp(now - 30),
                )
            ],
        ),
        taken_wall_time=now,
    )


def rendered(renderable: object, width: int = 160) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_dashboard_frame_shows_load_rpcs_and_alerts() -> None:
    text = rendered(dashboard.render(snapshot(), address="127.0.0.1:50053"))
    assert "Roundtable fleet · monitor 127.0.0.1:50053" in text
    assert "30/40 discussions running (75%) · 4 queued · 30 agent sets" in text
    session_row = next(line for line in text.splitlines() if "session-7f3a" in line and "MB" in line)
    assert re.search(r"session-7f3a\s.*session\s.*30\s.*4\s.*40\s.*81 %\s.*512 MB\s.*3 s ago", session_row)
    # Busiest method first, short names, percentiles with units, errors as a share.
    get_line = next(index for index, line in enumerate(text.splitlines()) if "SessionService/GetDiscussion" in line)
    create_line = next(
        index for index, line in enumerate(text.splitlines()) if "SessionService/CreateDiscussion" in line
    )
    assert get_line < create_line
    assert re.search(
        r"SessionService/CreateDiscussion\s.*0\.67\s.*120\.0 ms\s.*480\.0 ms\s.*950\.5 ms\s.*4/40\s.*10\.0%", text
    )
    assert "Alerts · 1 firing" in text
    assert "FIRING  p99 latency of /roundtable.session.v1.SessionService/CreateDiscussion is 950 ms" in text
    assert "(since 120 s ago)" in text
    assert "resolved CPU use of session-7f3a is back to 40 %" in text


def test_dashboard_keeps_the_last_frame_and_says_when_the_monitor_is_away() -> None:
    text = rendered(dashboard.render(snapshot(), address="10.0.0.9:50053", error="UNAVAILABLE: connection refused"))
    assert "monitor unreachable at 10.0.0.9:50053: UNAVAILABLE: connection refused" in text
    assert "session-7f3a" in text
    empty = rendered(dashboard.render(None, address="127.0.0.1:1", error="UNAVAILABLE: no"))
    assert "waiting for the first answer from the monitor" in empty


def test_dashboard_of_an_idle_fleet_says_so() -> None:
    idle = dashboard.FleetSnapshot(
        monitor_pb2.ConcurrencyStats(),
        monitor_pb2.PerformanceSummary(window_seconds=60),
        monitor_pb2.ListAlertsResponse(),
        0,
    )
    text = rendered(dashboard.render(idle, address="x"))
    assert "no instance has reported" in text
    assert "no traffic in the window" in text
    assert "no alerts" in text


async def test_dashboard_reads_a_real_monitor(monitor_with_traffic: ServiceHost) -> None:
    console = Console(record=True, width=200, file=io.StringIO())
    code = await dashboard.run(
        monitor_with_traffic.address, window_seconds=60, interval_seconds=0.01, console=console, frames=2
    )
    assert code == 0
    text = console.export_text()
    assert "session-1" in text
    assert "12/40 discussions running (30%)" in text
    assert "SessionService/CreateDiscussion" in text
    assert "FIRING" in text


async def test_dashboard_without_a_monitor_exits_1_saying_why() -> None:
    console = Console(record=True, width=200, file=io.StringIO())
    address = closed_port_address()
    code = await dashboard.run(address, window_seconds=60, interval_seconds=0.01, console=console, frames=1)
    assert code == 1
    assert f"monitor unreachable at {address}: UNAVAILABLE" in console.export_text()


def table_rows(markdown: str, first_cell_prefix: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(first_cell_prefix):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


async def test_report_is_written_with_a_valid_chart_and_the_monitors_numbers(
    monitor_with_traffic: ServiceHost, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "reports" / "weekly.md"
    argv = ["--address", monitor_with_traffic.address, "--window", "1m", "--step", "10", "--out", str(out)]
    assert await asyncio.to_thread(report.main, argv) == 0
    assert f"wrote {out} and {out.with_suffix('.png')}" in capsys.readouterr().out

    async with grpc.aio.insecure_channel(monitor_with_traffic.address) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        summary = await stub.GetPerformanceSummary(monitor_pb2.GetPerformanceSummaryRequest(window_seconds=60))
    markdown = out.read_text(encoding="utf-8")
    rows = table_rows(markdown, "`/")
    assert set(rows) == {GET, CREATE}
    for method in summary.methods:
        assert rows[method.method] == [
            str(method.requests),
            f"{method.requests_per_second:.2f}",
            str(method.errors),
            f"{method.error_rate:.1%}",
            f"{method.p50_ms:.1f}",
            f"{method.p95_ms:.1f}",
            f"{method.p99_ms:.1f}",
        ]
    # 60 s of traffic: 180 reads at 3/s, 18 creates of which 6 failed.
    assert rows[GET][:4] == ["180", "3.00", "0", "0.0%"]
    assert rows[CREATE][:4] == ["18", "0.30", "6", "33.3%"]
    assert "- **Traffic:** 198 calls to 2 methods, 3.30 per second; 6 failed (3.0%)." in markdown
    assert "- **Slowest:** SessionService/CreateDiscussion, p99" in markdown
    assert "- **Most errors:** SessionService/CreateDiscussion, 33.3% (6 of 18 calls)." in markdown
    assert "- **Load now:** 12/40 discussions running (30% of capacity), 2 queued, 12 agent sets." in markdown
    assert "- **FIRING** p99 latency of /roundtable.session.v1.SessionService/CreateDiscussion" in markdown
    assert table_rows(markdown, "`session-1")["session-1"] == ["session", "12", "2", "40", "12", "37", "300"]
    assert "![p99 latency and requests per second per method over the window](weekly.png)" in markdown

    chart = out.with_suffix(".png")
    assert chart.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(chart) as image:
        image.verify()
    with Image.open(chart) as image:
        assert image.format == "PNG"
        assert image.size == (1000, 700)
        # Lines were drawn: far more than the background, axes and text colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1_000_000) or []) > 50


def test_report_without_a_monitor_fails_saying_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    address = closed_port_address()
    assert report.main(["--address", address, "--out", str(tmp_path / "r.md")]) == 1
    assert f"cannot read the monitor at {address}: UNAVAILABLE" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


@pytest.mark.parametrize(("text", "seconds"), [("300", 300), ("45s", 45), ("5m", 300), ("1h", 3600)])
def test_report_window_accepts_durations(text: str, seconds: int) -> None:
    assert report.parse_window(text) == seconds


@pytest.mark.parametrize("text", ["0", "5d", "-1m", "soon"])
def test_report_window_refuses_other_text(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        report.parse_window(text)
