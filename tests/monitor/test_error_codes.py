"""The monitor's error-rate alert counts server faults only, the codes the Prometheus rule counts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import ClassVar

import grpc
import pytest
from prometheus_client import CollectorRegistry

from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.monitor.service import MonitorService
from services.monitor.settings import MonitorSettings
from services.shared import metrics
from services.shared.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.shared.reporter import InstanceLoad, method_counters
from services.shared.server import ServiceHost
from services.shared.settings import ServiceSettings

FAULTY_SERVICE = "roundtable.test.v1.Faulty"


class FaultyService:
    """The smallest service the host runs: each method fails with one status, as a real servicer would."""

    name = "session"  # the monitor takes reports from the three services it knows
    grpc_services: Sequence[str] = (FAULTY_SERVICE,)
    failures: ClassVar[dict[str, Callable[[], Exception]]] = {
        "Refuse": lambda: InvalidArgument("topic is empty", "topic"),
        "Throttle": lambda: ResourceExhausted("rate limit", 1.0, "principal:alice", "requests per minute"),
        "Miss": lambda: NotFound("no such discussion"),
        "Fail": lambda: Unavailable("the store is down"),
    }

    async def start(self) -> None:
        """Nothing to open."""

    def register(self, server: grpc.aio.Server) -> None:
        """One unary method per failure."""

        def handler(failure: Callable[[], Exception]) -> grpc.RpcMethodHandler:
            async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                raise failure()

            return grpc.unary_unary_rpc_method_handler(fail)

        handlers = {method: handler(failure) for method, failure in self.failures.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(FAULTY_SERVICE, handlers),))

    async def drain(self, grace_seconds: float) -> None:
        """Nothing in flight."""

    async def close(self) -> None:
        """Nothing to release."""

    def load(self) -> InstanceLoad:
        """No sessions."""
        return InstanceLoad()


@pytest.fixture
async def fleet() -> AsyncIterator[tuple[ServiceHost, ServiceHost]]:
    """A monitor alerting on any error rate above 5 % at once, and a faulty service reporting to it."""
    monitor_config = MonitorSettings(
        port=0,
        metrics_port=-1,
        alert_error_rate=0.05,
        alert_error_rate_hold_seconds=0,
        alert_evaluation_interval_seconds=0.05,
        alert_p99_latency_ms=0,
        alert_rss_mb=0,
        alert_cpu_percent=0,
        alert_queued_sessions=0,
    )
    monitor = ServiceHost(monitor_config, MonitorService(monitor_config, registry=CollectorRegistry()))
    await monitor.start()
    service_config = ServiceSettings(
        port=0,
        metrics_port=-1,
        instance_id="faulty-1",
        monitor_address=monitor.address,
        report_interval_seconds=0.05,
    )
    service = ServiceHost(service_config, FaultyService())
    await service.start()
    try:
        yield monitor, service
    finally:
        await service.stop(grace_seconds=0)
        await monitor.stop(grace_seconds=0)


async def burst(address: str, method: str, calls: int) -> set[grpc.StatusCode]:
    """Call a method of the faulty service `calls` times; the codes it answered."""
    async with grpc.aio.insecure_channel(address) as channel:
        # No serializers: the faulty service takes and answers raw bytes.
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{FAULTY_SERVICE}/{method}")
        codes: set[grpc.StatusCode] = set()
        for _ in range(calls):
            try:
                await call(b"", timeout=5)
            except grpc.aio.AioRpcError as error:
                codes.add(error.code())
        return codes


async def summary_of(
    stub: monitor_pb2_grpc.MonitorServiceAsyncStub, method: str, requests_at_least: int
) -> monitor_pb2.MethodSummary:
    """The monitor's summary row of a method once it has seen this many requests in its window."""
    deadline = time.monotonic() + 10
    while True:
        summary = await stub.GetPerformanceSummary(monitor_pb2.GetPerformanceSummaryRequest(window_seconds=60))
        row = next((row for row in summary.methods if row.method == f"/{FAULTY_SERVICE}/{method}"), None)
        if row is not None and row.requests >= requests_at_least:
            return row
        assert time.monotonic() < deadline, f"the monitor never saw {requests_at_least} calls of {method}"
        await asyncio.sleep(0.05)


async def error_rate_alerts(stub: monitor_pb2_grpc.MonitorServiceAsyncStub) -> list[str]:
    listed = await stub.ListAlerts(monitor_pb2.ListAlertsRequest())
    return [alert.subject for alert in listed.firing if alert.name == "error_rate"]


async def test_a_burst_of_refused_calls_does_not_fire_the_error_rate_alert_and_server_faults_do(
    fleet: tuple[ServiceHost, ServiceHost],
) -> None:
    monitor, service = fleet
    async with grpc.aio.insecure_channel(monitor.address) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        for method, code in (
            ("Refuse", grpc.StatusCode.INVALID_ARGUMENT),
            ("Throttle", grpc.StatusCode.RESOURCE_EXHAUSTED),
            ("Miss", grpc.StatusCode.NOT_FOUND),
        ):
            assert await burst(service.address, method, 40) == {code}
            row = await summary_of(stub, method, 40)
            assert (row.errors, row.error_rate) == (0, 0.0), f"{code.name} counted as an error"
        # Several evaluations (every 0.05 s, and on every report) have seen a 100 % refusal rate.
        await asyncio.sleep(0.3)
        assert await error_rate_alerts(stub) == []

        assert await burst(service.address, "Fail", 40) == {grpc.StatusCode.UNAVAILABLE}
        row = await summary_of(stub, "Fail", 40)
        assert row.errors >= 40 and row.error_rate == 1.0
        deadline = time.monotonic() + 10
        while await error_rate_alerts(stub) != [f"/{FAULTY_SERVICE}/Fail"]:
            assert time.monotonic() < deadline, "a burst of UNAVAILABLE never fired the error-rate alert"
            await asyncio.sleep(0.05)


def test_reports_count_exactly_the_server_fault_codes_as_errors() -> None:
    service = "roundtable.test.v1.Counted"
    for code in grpc.StatusCode:
        metrics.SERVER_HANDLED.labels("unary", service, "Call", code.name).inc(2)
    [counters] = method_counters([service])
    assert counters.handled_total == 2 * len(grpc.StatusCode)
    assert counters.error_total == 2 * len(metrics.SERVER_FAULT_CODES)
    assert set(metrics.SERVER_FAULT_CODES) == {"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED"}


def test_the_refusal_codes_are_not_server_faults() -> None:
    for code in ("INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "CANCELLED", "OK"):
        assert code not in metrics.SERVER_FAULT_CODES
