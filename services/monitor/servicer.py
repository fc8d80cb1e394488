"""MonitorService servicer: translates protobuf ⇄ the fleet view and validates what callers send."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf import timestamp_pb2

from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.monitor.alerts import Alert, AlertState, FleetAlerts, WatcherFellBehind
from services.monitor.fleet import FleetView, InstanceConcurrency, PerformancePoint
from services.shared.errors import InvalidArgument, Unavailable

logger = logging.getLogger(__name__)

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


_ALERT_STATES = {
    AlertState.FIRING: monitor_pb2.ALERT_STATE_FIRING,
    AlertState.RESOLVED: monitor_pb2.ALERT_STATE_RESOLVED,
}


def alert_message(alert: Alert) -> monitor_pb2.Alert:
    """The protobuf form of a domain alert."""
    message = monitor_pb2.Alert(
        name=alert.name,
        subject=alert.subject,
        state=_ALERT_STATES[alert.state],
        value=alert.value,
        threshold=alert.threshold,
        unit=alert.unit,
        hold_seconds=alert.hold_seconds,
        fired_at=_timestamp(alert.fired_wall_time),
        summary=alert.summary,
    )
    if alert.resolved_wall_time is not None:
        message.resolved_at.CopyFrom(_timestamp(alert.resolved_wall_time))
    return message


def _point(point: PerformancePoint) -> monitor_pb2.PerformancePoint:
    return monitor_pb2.PerformancePoint(
        at=_timestamp(point.at_wall_time),
        requests_per_second=point.requests_per_second,
        error_rate=point.error_rate,
        p50_ms=point.p50_ms,
        p95_ms=point.p95_ms,
        p99_ms=point.p99_ms,
        requests=_uint64(point.requests),
        errors=_uint64(point.errors),
    )


class MonitorServicer(monitor_pb2_grpc.MonitorServiceServicer):
    """Receives instance reports and answers fleet and alert queries."""

    def __init__(
        self, fleet: FleetView, alerts: FleetAlerts, *, default_window_seconds: int, max_window_seconds: int
    ) -> None:
        self._fleet = fleet
        self._alerts = alerts
        self._default_window_seconds = default_window_seconds
        self._max_window_seconds = max_window_seconds

    def _window_seconds(self, requested: int) -> int:
        window_seconds = requested or self._default_window_seconds
        if not 0 < window_seconds <= self._max_window_seconds:
            raise InvalidArgument(
                f"window_seconds must be between 1 and {self._max_window_seconds} (0 means "
                f"{self._default_window_seconds}); got {requested}",
                field="window_seconds",
            )
        return window_seconds

    async def ReportInstance(
        self, request: monitor_pb2.InstanceReport, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.ReportInstanceResponse:
        """Validate and keep one instance report, then re-evaluate the alerts."""
        validate_report(request)
        self._fleet.record(request)
        try:
            self._alerts.evaluate()
        except Exception:
            # The report is kept either way; the periodic tick tries again.
            logger.exception("alert evaluation failed")
        return monitor_pb2.ReportInstanceResponse()

    async def GetPerformanceSummary(
        self, request: monitor_pb2.GetPerformanceSummaryRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.PerformanceSummary:
        """Per-method rate, error rate and latency percentiles over the requested window."""
        window_seconds = self._window_seconds(request.window_seconds)
        methods = [
            monitor_pb2.MethodSummary(
                method=row.method,
                requests_per_second=row.requests_per_second,
                error_rate=row.error_rate,
                p50_ms=row.p50_ms,
                p95_ms=row.p95_ms,
                p99_ms=row.p99_ms,
                requests=_uint64(row.requests),
                errors=_uint64(row.errors),
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
            active_sessions=_int64(totals.active_sessions),
            queued_sessions=_int64(totals.queued_sessions),
            session_capacity=_int64(totals.session_capacity),
            live_agent_sets=_int64(totals.live_agent_sets),
            instances=[_instance_row(row) for row in totals.instances],
        )

    async def GetPerformanceHistory(
        self, request: monitor_pb2.GetPerformanceHistoryRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.PerformanceHistory:
        """Per-method points, one per step, over the requested window."""
        window_seconds = self._window_seconds(request.window_seconds)
        step_seconds = request.step_seconds or max(window_seconds // 20, 1)
        if not 0 < step_seconds <= window_seconds:
            raise InvalidArgument(
                f"step_seconds must be between 1 and window_seconds ({window_seconds}); got {request.step_seconds}",
                field="step_seconds",
            )
        return monitor_pb2.PerformanceHistory(
            window_seconds=window_seconds,
            step_seconds=step_seconds,
            methods=[
                monitor_pb2.MethodHistory(method=row.method, points=[_point(point) for point in row.points])
                for row in self._fleet.history(window_seconds, step_seconds)
            ],
        )

    async def ListAlerts(
        self, request: monitor_pb2.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.ListAlertsResponse:
        """Alerts firing now and those resolved within the retention time."""
        return monitor_pb2.ListAlertsResponse(
            firing=[alert_message(alert) for alert in self._alerts.evaluator.firing()],
            resolved=[alert_message(alert) for alert in self._alerts.evaluator.resolved()],
        )

    async def WatchAlerts(
        self, request: monitor_pb2.WatchAlertsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[monitor_pb2.AlertTransition]:
        """The alerts firing now (replayed), then every transition until the monitor stops."""
        subscription = self._alerts.watch()
        try:
            async for transition in subscription.transitions():
                yield monitor_pb2.AlertTransition(alert=alert_message(transition.alert), replayed=transition.replayed)
        except WatcherFellBehind as error:
            raise Unavailable(str(error)) from None
        finally:
            subscription.close()


# Sums over many reports can pass what the wire types hold; saturate rather than fail every reader.
def _int64(value: int) -> int:
    return max(min(value, 2**63 - 1), -(2**63))


def _uint64(value: int) -> int:
    return max(min(value, 2**64 - 1), 0)
