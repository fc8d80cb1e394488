"""`roundtable report`: a Markdown performance report, with a PNG chart of latency and throughput over a window."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import pathlib
import re
import sys
import time
from dataclasses import dataclass

import grpc

from services.cli.dashboard import DEFAULT_ADDRESS, monitor_channel, short_method
from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc

# Lines a chart can show before it stops being readable; the busiest methods are drawn.
MAX_CHARTED_METHODS = 6
_DURATION = re.compile(r"^(\d+)([smh]?)$")


@dataclass(frozen=True)
class ReportData:
    """Everything the report is made from, as the monitor answered."""

    address: str
    generated_wall_time: float
    summary: monitor_pb2.PerformanceSummary
    history: monitor_pb2.PerformanceHistory
    stats: monitor_pb2.ConcurrencyStats
    alerts: monitor_pb2.ListAlertsResponse


def parse_window(text: str) -> int:
    """'300', '300s', '5m' or '1h' → seconds."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"window {text!r} is not a positive duration like 300, 5m or 1h")
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


async def collect(address: str, window_seconds: int, step_seconds: int = 0) -> ReportData:
    """Ask the monitor for the summary, the history, the load and the alerts of the window."""
    async with monitor_channel(address) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        summary, history, stats, alerts = await asyncio.gather(
            stub.GetPerformanceSummary(
                monitor_pb2.GetPerformanceSummaryRequest(window_seconds=window_seconds), timeout=10
            ),
            stub.GetPerformanceHistory(
                monitor_pb2.GetPerformanceHistoryRequest(window_seconds=window_seconds, step_seconds=step_seconds),
                timeout=10,
            ),
            stub.GetConcurrencyStats(monitor_pb2.GetConcurrencyStatsRequest(), timeout=10),
            stub.ListAlerts(monitor_pb2.ListAlertsRequest(), timeout=10),
        )
    return ReportData(address, time.time(), summary, history, stats, alerts)


def _charted(history: monitor_pb2.PerformanceHistory) -> list[monitor_pb2.MethodHistory]:
    busiest = sorted(history.methods, key=lambda row: -sum(point.requests for point in row.points))
    return busiest[:MAX_CHARTED_METHODS]


def write_chart(data: ReportData, path: pathlib.Path) -> None:
    """A PNG: p99 latency per method above, requests per second per method below, over the window."""
    import matplotlib

    matplotlib.use("Agg")  # no display: reports are written by servers and CI as often as by people
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    figure, (latency_axes, throughput_axes) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    try:
        latencies: list[float] = []
        for row in _charted(data.history):
            times = [datetime.datetime.fromtimestamp(point.at.ToNanoseconds() / 1e9) for point in row.points]
            label = short_method(row.method)
            # A step without calls has no latency: leave a gap rather than draw a fake 0 ms.
            p99 = [point.p99_ms if point.requests else float("nan") for point in row.points]
            latency_axes.plot(times, p99, marker="o", markersize=3, label=label)
            latencies += [value for value in p99 if value > 0]
            throughput_axes.plot(times, [point.requests_per_second for point in row.points], label=label)
        latency_axes.set_ylabel("p99 latency (ms)")
        latency_axes.set_title(
            f"Latency and throughput, last {data.history.window_seconds} s in {data.history.step_seconds} s steps"
        )
        throughput_axes.set_ylabel("requests per second")
        throughput_axes.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        # Fast reads and slow writes on one linear axis would flatten the reads to a line at zero.
        if latencies and max(latencies) > 20 * min(latencies):
            latency_axes.set_yscale("log")
        else:
            latency_axes.set_ylim(bottom=0)
        throughput_axes.set_ylim(bottom=0)
        for axes in (latency_axes, throughput_axes):
            axes.grid(True, alpha=0.3)
        if data.history.methods:
            latency_axes.legend(loc="upper left", fontsize="small")
        else:
            latency_axes.text(0.5, 0.5, "no traffic in the window", ha="center", transform=latency_axes.transAxes)
        figure.autofmt_xdate()
        figure.tight_layout()
        figure.savefig(path, format="png", dpi=100)
    finally:
        plt.close(figure)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---" if index == 0 else "---:" for index in range(len(header))]
    return [f"| {' | '.join(header)} |", f"| {' | '.join(align)} |", *(f"| {' | '.join(row)} |" for row in rows)]


def _findings(data: ReportData) -> list[str]:
    methods = list(data.summary.methods)
    if not methods:
        return [f"- No RPC was handled in the last {data.summary.window_seconds} s."]
    requests = sum(row.requests for row in methods)
    errors = sum(row.errors for row in methods)
    rate = sum(row.requests_per_second for row in methods)
    findings = [
        f"- **Traffic:** {_count(requests, 'call')} to {_count(len(methods), 'method')}, {rate:.2f} per second; "
        f"{errors} failed ({errors / requests:.1%})."
    ]
    slowest = max(methods, key=lambda row: row.p99_ms)
    findings.append(
        f"- **Slowest:** {short_method(slowest.method)}, p99 {slowest.p99_ms:.1f} ms "
        f"(p50 {slowest.p50_ms:.1f} ms) over {slowest.requests} calls."
    )
    failing = max(methods, key=lambda row: (row.error_rate, row.errors))
    if failing.errors:
        findings.append(
            f"- **Most errors:** {short_method(failing.method)}, {failing.error_rate:.1%} "
            f"({failing.errors} of {failing.requests} calls)."
        )
    else:
        findings.append("- **Errors:** none.")
    stats = data.stats
    load = f"{stats.active_sessions}/{stats.session_capacity} discussions running"
    if stats.session_capacity:
        load += f" ({stats.active_sessions / stats.session_capacity:.0%} of capacity)"
    findings.append(f"- **Load now:** {load}, {stats.queued_sessions} queued, {stats.live_agent_sets} agent sets.")
    firing = list(data.alerts.firing)
    findings.append(
        f"- **Alerts:** {len(firing)} firing" + (": " + "; ".join(alert.summary for alert in firing) if firing else ".")
    )
    return findings


def render_markdown(data: ReportData, chart_name: str) -> str:
    """The report as Markdown, the chart referenced by file name."""
    generated = datetime.datetime.fromtimestamp(data.generated_wall_time, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    lines = [
        "# Roundtable performance report",
        "",
        f"Generated {generated} UTC from the monitor at `{data.address}`, covering the last "
        f"{data.summary.window_seconds} s; {_count(data.summary.instances, 'instance')} reporting.",
        "",
        "## Findings",
        "",
        *_findings(data),
        "",
        "## Latency and throughput",
        "",
        f"![p99 latency and requests per second per method over the window]({chart_name})",
        "",
        "## Methods",
        "",
        *_table(
            ["method", "calls", "calls/s", "errors", "error rate", "p50 ms", "p95 ms", "p99 ms"],
            [
                [
                    f"`{row.method}`",
                    str(row.requests),
                    f"{row.requests_per_second:.2f}",
                    str(row.errors),
                    f"{row.error_rate:.1%}",
                    f"{row.p50_ms:.1f}",
                    f"{row.p95_ms:.1f}",
                    f"{row.p99_ms:.1f}",
                ]
                for row in sorted(data.summary.methods, key=lambda row: -row.requests)
            ],
        ),
        "",
        "Percentiles are interpolated within the latency histogram's buckets, as Prometheus' "
        "`histogram_quantile` does, so they are as precise as the buckets.",
        "",
        "## Instances",
        "",
        *_table(
            ["instance", "service", "running", "queued", "capacity", "agent sets", "CPU %", "memory MB"],
            [
                [
                    f"`{row.instance_id}`",
                    row.service,
                    str(row.active_sessions),
                    str(row.queued_sessions),
                    str(row.session_capacity),
                    str(row.live_agent_sets),
                    f"{row.cpu_percent:.0f}",
                    f"{row.rss_bytes / 2**20:.0f}",
                ]
                for row in data.stats.instances
            ],
        ),
        "",
        "## Alerts",
        "",
    ]
    if not data.alerts.firing and not data.alerts.resolved:
        lines.append("None fired recently.")
    for alert in data.alerts.firing:
        lines.append(f"- **FIRING** {alert.summary}")
    for alert in data.alerts.resolved:
        lines.append(f"- resolved: {alert.summary}")
    return "\n".join(lines) + "\n"


def write_report(data: ReportData, out: pathlib.Path) -> pathlib.Path:
    """Write the Markdown to `out` and the chart beside it; returns the chart's path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    chart = out.with_suffix(".png")
    write_chart(data, chart)
    out.write_text(render_markdown(data, chart.name), encoding="utf-8")
    return chart


def build_parser() -> argparse.ArgumentParser:
    """Flags of `roundtable report`."""
    parser = argparse.ArgumentParser(prog="roundtable report", description=__doc__)
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="host:port of the monitor service")
    parser.add_argument("--window", type=parse_window, default=parse_window("15m"), help="300, 5m or 1h (default 15m)")
    parser.add_argument(
        "--step", type=int, default=0, help="seconds per chart point (default: a twentieth of the window)"
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("roundtable-report.md"), help="Markdown file to write"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write the report; 1 with a message when the monitor cannot be asked."""
    args = build_parser().parse_args(argv)
    try:
        data = asyncio.run(collect(args.address, args.window, args.step))
    except grpc.aio.AioRpcError as error:
        print(f"cannot read the monitor at {args.address}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    chart = write_report(data, args.out)
    print(f"wrote {args.out} and {chart}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
