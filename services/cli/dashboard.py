"""`roundtable monitor`: a live terminal view of the fleet, refreshed every second from the monitor service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from dataclasses import dataclass

import grpc
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.shared.service_auth import INTERNAL_TOKEN_ENV
from services.shared.tls import ClientTls, create_channel

DEFAULT_ADDRESS = "127.0.0.1:50053"
RESOLVED_SHOWN = 5


@dataclass(frozen=True)
class FleetSnapshot:
    """What one refresh read from the monitor."""

    stats: monitor_pb2.ConcurrencyStats
    summary: monitor_pb2.PerformanceSummary
    alerts: monitor_pb2.ListAlertsResponse
    taken_wall_time: float


def monitor_channel(address: str) -> grpc.aio.Channel:
    """A channel to the monitor carrying the service credential from ROUNDTABLE_INTERNAL_TOKEN, when set.

    Read from the environment, never a flag, so the secret does not show in the process list.
    """
    return create_channel(address, ClientTls(internal_token_value=os.environ.get(INTERNAL_TOKEN_ENV, "")))


def short_method(method: str) -> str:
    """'/roundtable.session.v1.SessionService/GetDiscussion' → 'SessionService/GetDiscussion'."""
    service, _, name = method.strip("/").partition("/")
    return f"{service.rsplit('.', 1)[-1]}/{name}" if name else method


def _megabytes(byte_count: float) -> str:
    return f"{byte_count / 2**20:.0f} MB"


def _ago(seconds: float) -> str:
    return f"{max(seconds, 0):.0f} s ago"


def _load_table(stats: monitor_pb2.ConcurrencyStats, now: float) -> Table:
    capacity = stats.session_capacity
    used = f" ({stats.active_sessions / capacity:.0%})" if capacity else ""
    table = Table(
        title=f"Load · {stats.active_sessions}/{capacity} discussions running{used} · {stats.queued_sessions} queued"
        f" · {stats.live_agent_sets} agent sets",
        title_justify="left",
        expand=True,
    )
    for column in ("instance", "service", "active", "queued", "capacity", "agent sets", "CPU", "memory", "reported"):
        table.add_column(column, justify="left" if column in ("instance", "service") else "right")
    for row in stats.instances:
        table.add_row(
            row.instance_id,
            row.service,
            str(row.active_sessions),
            str(row.queued_sessions),
            str(row.session_capacity),
            str(row.live_agent_sets),
            f"{row.cpu_percent:.0f} %",
            _megabytes(row.rss_bytes),
            _ago(now - row.last_report_at.ToNanoseconds() / 1e9),
        )
    if not stats.instances:
        table.add_row("no instance has reported", *[""] * 8)
    return table


def _performance_table(summary: monitor_pb2.PerformanceSummary) -> Table:
    table = Table(
        title=f"RPCs over the last {summary.window_seconds} s · {summary.instances} instance"
        f"{'' if summary.instances == 1 else 's'} reporting",
        title_justify="left",
        expand=True,
    )
    for column in ("method", "req/s", "p50", "p95", "p99", "errors", "error rate"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in sorted(summary.methods, key=lambda row: -row.requests):
        error_style = "bold red" if row.errors else ""
        table.add_row(
            short_method(row.method),
            f"{row.requests_per_second:.2f}",
            f"{row.p50_ms:.1f} ms",
            f"{row.p95_ms:.1f} ms",
            f"{row.p99_ms:.1f} ms",
            Text(f"{row.errors}/{row.requests}", style=error_style),
            Text(f"{row.error_rate:.1%}", style=error_style),
        )
    if not summary.methods:
        table.add_row("no traffic in the window", *[""] * 6)
    return table


def _alerts_panel(alerts: monitor_pb2.ListAlertsResponse, now: float) -> Panel:
    lines = Text()
    for alert in alerts.firing:
        lines.append("FIRING  ", style="bold red")
        lines.append(f"{alert.summary} (since {_ago(now - alert.fired_at.ToNanoseconds() / 1e9)})\n")
    for alert in list(alerts.resolved)[:RESOLVED_SHOWN]:
        lines.append("resolved ", style="green")
        lines.append(f"{alert.summary} ({_ago(now - alert.resolved_at.ToNanoseconds() / 1e9)})\n", style="dim")
    if not lines:
        lines.append("no alerts", style="green")
    style = "red" if alerts.firing else "green"
    return Panel(lines, title=f"Alerts · {len(alerts.firing)} firing", title_align="left", border_style=style)


def render(snapshot: FleetSnapshot | None, *, address: str, error: str | None = None) -> RenderableType:
    """One frame: load per instance, RPC performance, alerts; the last good data stays up when the monitor is away."""
    now = snapshot.taken_wall_time if snapshot else time.time()
    header = Text(f"Roundtable fleet · monitor {address} · {time.strftime('%H:%M:%S', time.localtime(now))}")
    header.stylize("bold")
    parts: list[RenderableType] = [header]
    if error is not None:
        parts.append(Panel(Text(f"monitor unreachable at {address}: {error}", style="bold red"), border_style="red"))
    if snapshot is None:
        parts.append(Text("waiting for the first answer from the monitor…", style="dim"))
        return Group(*parts)
    parts += [
        _load_table(snapshot.stats, now),
        _performance_table(snapshot.summary),
        _alerts_panel(snapshot.alerts, now),
    ]
    return Group(*parts)


async def fetch(stub: monitor_pb2_grpc.MonitorServiceAsyncStub, window_seconds: int) -> FleetSnapshot:
    """Read the three views a frame shows."""
    stats, summary, alerts = await asyncio.gather(
        stub.GetConcurrencyStats(monitor_pb2.GetConcurrencyStatsRequest(), timeout=5),
        stub.GetPerformanceSummary(monitor_pb2.GetPerformanceSummaryRequest(window_seconds=window_seconds), timeout=5),
        stub.ListAlerts(monitor_pb2.ListAlertsRequest(), timeout=5),
    )
    return FleetSnapshot(stats=stats, summary=summary, alerts=alerts, taken_wall_time=time.time())


async def run(
    address: str, *, window_seconds: int, interval_seconds: float, console: Console, frames: int | None = None
) -> int:
    """Refresh the view every interval until interrupted (or for `frames` frames); 1 if the monitor never answered."""
    snapshot: FleetSnapshot | None = None
    error: str | None = None
    async with monitor_channel(address) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        with Live(render(None, address=address), console=console, auto_refresh=False) as live:
            shown = 0
            while frames is None or shown < frames:
                try:
                    snapshot = await fetch(stub, window_seconds)
                    error = None
                except grpc.aio.AioRpcError as failure:
                    error = f"{failure.code().name}: {failure.details()}"
                live.update(render(snapshot, address=address, error=error), refresh=True)
                shown += 1
                if frames is None or shown < frames:
                    await asyncio.sleep(interval_seconds)
    return 1 if snapshot is None else 0


def build_parser() -> argparse.ArgumentParser:
    """Flags of `roundtable monitor`."""
    parser = argparse.ArgumentParser(prog="roundtable monitor", description=__doc__)
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="host:port of the monitor service")
    parser.add_argument("--window", type=int, default=60, help="seconds of traffic the RPC table covers")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the live dashboard until Ctrl-C."""
    args = build_parser().parse_args(argv)
    console = Console()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(
            run(
                args.address,
                window_seconds=args.window,
                interval_seconds=args.interval,
                console=console,
                frames=1 if args.once else None,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
