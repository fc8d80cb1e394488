"""Periodic instance reports to the monitor service: fire-and-forget, with backoff when it is away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
import psutil
from google.protobuf import timestamp_pb2
from prometheus_client import REGISTRY

from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.shared.metrics import SERVER_FAULT_CODES

logger = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 60.0


@dataclass(frozen=True)
class InstanceLoad:
    """What a service says about its own load in each report."""

    active_sessions: int = 0
    queued_sessions: int = 0
    session_capacity: int = 0
    live_agent_sets: int = 0
    # session_capacity is one cap every replica on the same admission reports: counted once.
    session_capacity_shared: bool = False


def method_counters(grpc_services: Iterable[str]) -> list[monitor_pb2.MethodCounters]:
    """Cumulative per-method counters of these gRPC services, read from the Prometheus registry.

    error_total counts server faults only (SERVER_FAULT_CODES), as the Prometheus error-rate rule does.
    """
    wanted = set(grpc_services)
    by_method: dict[str, monitor_pb2.MethodCounters] = {}

    def entry(service: str, method: str) -> monitor_pb2.MethodCounters:
        full = f"/{service}/{method}"
        if full not in by_method:
            by_method[full] = monitor_pb2.MethodCounters(method=full)
        return by_method[full]

    for family in REGISTRY.collect():
        if family.name not in ("grpc_server_handled", "grpc_server_handling_seconds"):
            continue
        for sample in family.samples:
            service = sample.labels.get("grpc_service", "")
            if service not in wanted:
                continue
            counters = entry(service, sample.labels["grpc_method"])
            if sample.name == "grpc_server_handled_total":
                counters.handled_total += int(sample.value)
                if sample.labels.get("grpc_code") in SERVER_FAULT_CODES:
                    counters.error_total += int(sample.value)
            elif sample.name == "grpc_server_handling_seconds_bucket":
                counters.bucket_upper_bounds_seconds.append(float(sample.labels["le"]))
                counters.bucket_counts.append(int(sample.value))
            elif sample.name == "grpc_server_handling_seconds_sum":
                counters.latency_sum_seconds = sample.value
    return list(by_method.values())


class MonitorReporter:
    """Sends this instance's report every interval; losing the monitor never hurts the service."""

    def __init__(
        self,
        *,
        open_channel: Callable[[], grpc.aio.Channel],
        interval_seconds: float,
        instance_id: str,
        service: str,
        address: str,
        grpc_services: list[str],
        load: Callable[[], InstanceLoad],
    ) -> None:
        self._open_channel = open_channel
        self._channel: grpc.aio.Channel | None = None
        self._interval_seconds = interval_seconds
        self._instance_id = instance_id
        self._service = service
        self._address = address
        self._grpc_services = grpc_services
        self._load = load
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # primes the counter; the first reading is meaningless
        # The counters sent cover the whole process, so the instance "started" with the process.
        self._started_at = self._process.create_time()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Open the monitor channel now, so bad credentials fail start-up, and begin reporting in the background."""
        self._channel = self._open_channel()
        self._task = asyncio.create_task(self._run(self._channel), name=f"monitor-reporter-{self._service}")

    async def stop(self) -> None:
        """Stop reporting and close the channel."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()

    def build_report(self) -> monitor_pb2.InstanceReport:
        """This instance's report as of now."""
        load = self._load()
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        started = timestamp_pb2.Timestamp()
        started.FromNanoseconds(int(self._started_at * 1e9))
        return monitor_pb2.InstanceReport(
            instance_id=self._instance_id,
            service=self._service,
            address=self._address,
            reported_at=now,
            started_at=started,
            methods=method_counters(self._grpc_services),
            active_sessions=load.active_sessions,
            queued_sessions=load.queued_sessions,
            session_capacity=load.session_capacity,
            session_capacity_shared=load.session_capacity_shared,
            live_agent_sets=load.live_agent_sets,
            cpu_percent=self._process.cpu_percent(None),
            rss_bytes=self._process.memory_info().rss,
        )

    async def _run(self, channel: grpc.aio.Channel) -> None:
        backoff = self._interval_seconds
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        while True:
            try:
                await stub.ReportInstance(self.build_report(), timeout=min(5.0, self._interval_seconds))
                backoff = self._interval_seconds
            except grpc.aio.AioRpcError as error:
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                logger.debug("monitor report failed (%s); next try in %.0f s", error.code(), backoff)
            await asyncio.sleep(backoff)
