"""The monitor service as the shared host runs it, plus the collector that puts the fleet on /metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import grpc
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.monitor.fleet import ConcurrencyTotals, FleetView
from services.monitor.servicer import SERVICES, MonitorServicer
from services.monitor.settings import MonitorSettings
from services.shared.reporter import InstanceLoad

MONITOR_SERVICE_NAME: str = monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"].full_name


class FleetCollector(Collector):
    """Exports the fleet view as roundtable_fleet_* gauges at scrape time."""

    def __init__(self, fleet: FleetView) -> None:
        self._fleet = fleet

    def describe(self) -> Iterable[Metric]:
        """The families, without samples, so the registry can detect name clashes without a scrape."""
        return _families(ConcurrencyTotals(), with_services=False)

    def collect(self) -> Iterable[Metric]:
        """The current fleet view."""
        return _families(self._fleet.concurrency(), with_services=True)


def _families(totals: ConcurrencyTotals, *, with_services: bool) -> list[Metric]:
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
        self._registry = registry
        self._collector: FleetCollector | None = None

    def register(self, server: grpc.aio.Server) -> None:
        """Add the MonitorService servicer to the server."""
        servicer = MonitorServicer(
            self.fleet,
            default_window_seconds=self.settings.default_window_seconds,
            max_window_seconds=self.settings.max_window_seconds,
        )
        monitor_pb2_grpc.add_MonitorServiceServicer_to_server(servicer, server)

    async def start(self) -> None:
        """Start exporting the fleet view on /metrics."""
        # Registered here and removed in close(), so monitors started one after another in a process coexist.
        self._collector = FleetCollector(self.fleet)
        self._registry.register(self._collector)

    async def drain(self, grace_seconds: float) -> None:
        """Nothing to drain: reports and queries are short and hold no state worth finishing."""

    async def close(self) -> None:
        """Stop exporting the fleet view."""
        if self._collector is not None:
            self._registry.unregister(self._collector)
            self._collector = None

    def load(self) -> InstanceLoad:
        """The monitor runs no sessions, so its own load is zero."""
        return InstanceLoad()
