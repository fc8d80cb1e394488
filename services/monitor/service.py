"""The monitor service as the shared host runs it, plus the collector that puts the fleet on /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import grpc
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.monitor.alerts import AlertEvaluator, AlertThresholds, FleetAlerts, Rule
from services.monitor.fleet import ConcurrencyTotals, FleetView
from services.monitor.servicer import SERVICES, MonitorServicer
from services.monitor.settings import LONG_LIVED_STREAMS, MonitorSettings
from services.shared.reporter import InstanceLoad

logger = logging.getLogger(__name__)

MONITOR_SERVICE_NAME: str = monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"].full_name


def alert_thresholds(settings: MonitorSettings) -> AlertThresholds:
    """The alert rules the settings describe."""
    return AlertThresholds(
        error_rate=Rule(settings.alert_error_rate, settings.alert_error_rate_hold_seconds),
        p99_latency_ms=Rule(settings.alert_p99_latency_ms, settings.alert_p99_latency_hold_seconds),
        p99_latency_ms_by_method={**LONG_LIVED_STREAMS, **settings.alert_p99_latency_ms_by_method},
        rss_bytes=Rule(settings.alert_rss_mb * 2**20, settings.alert_rss_hold_seconds),
        cpu_percent=Rule(settings.alert_cpu_percent, settings.alert_cpu_hold_seconds),
        queued_sessions=Rule(settings.alert_queued_sessions, settings.alert_queue_hold_seconds),
    )


class FleetCollector(Collector):
    """Exports the fleet view and its alerts as roundtable_fleet_* gauges at scrape time."""

    def __init__(self, fleet: FleetView, alert_evaluator: AlertEvaluator) -> None:
        self._fleet = fleet
        self._alert_evaluator = alert_evaluator

    def describe(self) -> Iterable[Metric]:
        """The families, without samples, so the registry can detect name clashes without a scrape."""
        return _families(ConcurrencyTotals(), {}, with_services=False)

    def collect(self) -> Iterable[Metric]:
        """The current fleet view."""
        return _families(self._fleet.concurrency(), self._alert_evaluator.firing_counts(), with_services=True)


def _families(totals: ConcurrencyTotals, alerts_firing: Mapping[str, int], *, with_services: bool) -> list[Metric]:
    # Labelled by alert name only: subjects (methods, instances) are in ListAlerts, never a session.
    alerts = GaugeMetricFamily(
        "roundtable_fleet_alerts_firing", "Monitor alerts firing now, by alert name.", labels=["alert"]
    )
    for name, count in sorted(alerts_firing.items()):
        alerts.add_metric([name], count)
    instances = GaugeMetricFamily(
        "roundtable_fleet_instances", "Instances in the fleet view, by service.", labels=["service"]
    )
    if with_services:
        # Every known service gets a sample, so "no agents instance" reads 0 rather than absent.
        for service in sorted(SERVICES | {row.service for row in totals.instances}):
            instances.add_metric([service], sum(row.service == service for row in totals.instances))
    rss = GaugeMetricFamily(
        "roundtable_fleet_instance_rss_bytes",
        "Resident memory of each instance at its last report.",
        labels=["instance_id", "service"],
    )
    cpu = GaugeMetricFamily(
        "roundtable_fleet_instance_cpu_percent",
        "CPU use of each instance at its last report, in percent of one core.",
        labels=["instance_id", "service"],
    )
    for row in totals.instances:
        rss.add_metric([row.instance_id, row.service], row.rss_bytes)
        cpu.add_metric([row.instance_id, row.service], row.cpu_percent)
    return [
        instances,
        GaugeMetricFamily(
            "roundtable_fleet_active_sessions",
            "Sessions running across the fleet.",
            value=totals.active_sessions,
        ),
        GaugeMetricFamily(
            "roundtable_fleet_queued_sessions",
            "Sessions waiting for admission across the fleet.",
            value=totals.queued_sessions,
        ),
        GaugeMetricFamily(
            "roundtable_fleet_session_capacity",
            "Sessions the fleet can run at once.",
            value=totals.session_capacity,
        ),
        GaugeMetricFamily(
            "roundtable_fleet_live_agent_sets",
            "Agent sets held across the fleet.",
            value=totals.live_agent_sets,
        ),
        rss,
        cpu,
        alerts,
    ]


class MonitorService:
    """Keeps the fleet view, serves it over gRPC and exports it on /metrics."""

    name: str = "monitor"
    grpc_services: Sequence[str] = (MONITOR_SERVICE_NAME,)

    def __init__(
        self,
        settings: MonitorSettings,
        *,
        registry: CollectorRegistry = REGISTRY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.fleet = FleetView(
            stale_after_seconds=settings.stale_after_seconds,
            history_per_instance=settings.history_per_instance,
            clock=clock,
        )
        self.alerts = FleetAlerts(
            self.fleet,
            alert_thresholds(settings),
            window_seconds=settings.alert_window_seconds,
            evaluator=AlertEvaluator(resolved_retention_seconds=settings.alert_resolved_retention_seconds, clock=clock),
        )
        self._registry = registry
        self._collector: FleetCollector | None = None
        self._ticker: asyncio.Task[None] | None = None

    def register(self, server: grpc.aio.Server) -> None:
        """Add the MonitorService servicer to the server."""
        servicer = MonitorServicer(
            self.fleet,
            self.alerts,
            default_window_seconds=self.settings.default_window_seconds,
            max_window_seconds=self.settings.max_window_seconds,
        )
        monitor_pb2_grpc.add_MonitorServiceServicer_to_server(servicer, server)

    async def start(self) -> None:
        """Start exporting the fleet view on /metrics and evaluating alerts periodically."""
        # Registered here and removed in close(), so monitors started one after another in a process coexist.
        self._collector = FleetCollector(self.fleet, self.alerts.evaluator)
        self._registry.register(self._collector)
        self._ticker = asyncio.create_task(self._tick(), name="monitor-alert-ticker")

    async def _tick(self) -> None:
        # Reports trigger evaluation too; the tick catches what happens without them (instances going silent).
        while True:
            await asyncio.sleep(self.settings.alert_evaluation_interval_seconds)
            try:
                self.alerts.evaluate()
            except Exception:
                logger.exception("alert evaluation failed")

    async def drain(self, grace_seconds: float) -> None:
        """Stop evaluating and end alert watches, so open streams do not hold the shutdown for the grace period."""
        await self._stop_ticker()
        self.alerts.feed.close()

    async def close(self) -> None:
        """Stop exporting the fleet view."""
        await self._stop_ticker()
        self.alerts.feed.close()
        if self._collector is not None:
            self._registry.unregister(self._collector)
            self._collector = None

    async def _stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    def load(self) -> InstanceLoad:
        """The monitor runs no sessions, so its own load is zero."""
        return InstanceLoad()
