"""MonitorService servicer: translates protobuf ⇄ the fleet view and validates what callers send."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2

from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.monitor.fleet import FleetView, InstanceConcurrency
from services.shared.errors import InvalidArgument

SERVICES = frozenset({"session", "agents", "monitor"})
MAX_INSTANCE_ID_CHARS = 200


def validate_report(report: monitor_pb2.InstanceReport) -> None:
    """Raise InvalidArgument when a report cannot be placed in the fleet view."""
    if not report.instance_id:
        raise InvalidArgument("instance_id must not be empty", field="instance_id")
    if len(report.instance_id) > MAX_INSTANCE_ID_CHARS:
        raise InvalidArgument(
            f"instance_id is {len(report.instance_id)} characters; at most {MAX_INSTANCE_ID_CHARS} allowed",
            field="instance_id",
        )
    if report.service not in SERVICES:
        raise InvalidArgument(
            f"service {report.service!r} is not one of {', '.join(sorted(SERVICES))}", field="service"
        )
    for index, counters in enumerate(report.methods):
        if len(counters.bucket_upper_bounds_seconds) != len(counters.bucket_counts):
            raise InvalidArgument(
                f"method {counters.method!r} has {len(counters.bucket_upper_bounds_seconds)} bucket bounds "
                f"but {len(counters.bucket_counts)} bucket counts",
                field=f"methods[{index}].bucket_counts",
            )


def _timestamp(seconds_since_epoch: float) -> timestamp_pb2.Timestamp:
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromNanoseconds(int(seconds_since_epoch * 1e9))
    return timestamp


def _instance_row(row: InstanceConcurrency) -> monitor_pb2.InstanceConcurrency:
    return monitor_pb2.InstanceConcurrency(
        instance_id=row.instance_id,
        service=row.service,
        active_sessions=row.active_sessions,
        queued_sessions=row.queued_sessions,
        session_capacity=row.session_capacity,
        live_agent_sets=row.live_agent_sets,
        cpu_percent=row.cpu_percent,
        rss_bytes=row.rss_bytes,
        last_report_at=_timestamp(row.last_report_wall_time),
    )


class MonitorServicer(monitor_pb2_grpc.MonitorServiceServicer):
    """Receives instance reports and answers fleet queries."""

    def __init__(self, fleet: FleetView, *, default_window_seconds: int, max_window_seconds: int) -> None:
        self._fleet = fleet
        self._default_window_seconds = default_window_seconds
        self._max_window_seconds = max_window_seconds

    async def ReportInstance(
        self, request: monitor_pb2.InstanceReport, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.ReportInstanceResponse:
        """Validate and keep one instance report."""
        validate_report(request)
        self._fleet.record(request)
        return monitor_pb2.ReportInstanceResponse()

    async def GetPerformanceSummary(
        self, request: monitor_pb2.GetPerformanceSummaryRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.PerformanceSummary:
        """Per-method rate, error rate and latency percentiles over the requested window."""
        window_seconds = request.window_seconds or self._default_window_seconds
        if not 0 < window_seconds <= self._max_window_seconds:
            raise InvalidArgument(
                f"window_seconds must be between 1 and {self._max_window_seconds} (0 means "
                f"{self._default_window_seconds}); got {request.window_seconds}",
                field="window_seconds",
            )
        methods = [
            monitor_pb2.MethodSummary(
                method=row.method,
                requests_per_second=row.requests_per_second,
                error_rate=row.error_rate,
                p50_ms=row.p50_ms,
                p95_ms=row.p95_ms,
                p99_ms=row.p99_ms,
                requests=row.requests,
                errors=row.errors,
            )
            for row in self._fleet.performance(window_seconds)
        ]
        return monitor_pb2.PerformanceSummary(
            window_seconds=window_seconds, methods=methods, instances=self._fleet.instance_count()
        )

    async def GetConcurrencyStats(
        self, request: monitor_pb2.GetConcurrencyStatsRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.ConcurrencyStats:
        """Session and agent-set totals across the fleet and per instance."""
        totals = self._fleet.concurrency()
        return monitor_pb2.ConcurrencyStats(
            active_sessions=totals.active_sessions,
            queued_sessions=totals.queued_sessions,
            session_capacity=totals.session_capacity,
            live_agent_sets=totals.live_agent_sets,
            instances=[_instance_row(row) for row in totals.instances],
        )
