"""Alerts through a real monitor server: reports with injected slowness fire an alert that WatchAlerts shows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.monitor.service import MonitorService
from services.monitor.settings import MonitorSettings
from services.shared.metrics import SERVER_HANDLING_SECONDS
from services.shared.server import ServiceHost
from tests.monitor.fakes import FakeClock, timestamp

METHOD = "/roundtable.session.v1.SessionService/GetDiscussion"
STARTED_AT = time.time() - 3600
# The bounds every service's server histogram has, +Inf last.
BOUNDS: Sequence[float] = SERVER_HANDLING_SECONDS._upper_bounds


class InstanceLatencies:
    """One fake session instance: observes latencies into cumulative buckets and reports them."""

    def __init__(self, instance_id: str = "session-a") -> None:
        self.instance_id = instance_id
        self.cumulative = [0] * len(BOUNDS)
        self.queued_sessions = 0

    def observe(self, latency_seconds: float, times: int) -> None:
        for index, bound in enumerate(BOUNDS):
            if latency_seconds <= bound:
                self.cumulative[index] += times

    def report(self) -> monitor_pb2.InstanceReport:
        return monitor_pb2.InstanceReport(
            instance_id=self.instance_id,
            service="session",
            started_at=timestamp(STARTED_AT),
            reported_at=timestamp(time.time()),
            methods=[
                monitor_pb2.MethodCounters(
                    method=METHOD,
                    handled_total=self.cumulative[-1],
                    bucket_upper_bounds_seconds=BOUNDS,
                    bucket_counts=self.cumulative,
                )
            ],
            queued_sessions=self.queued_sessions,
            session_capacity=10,
            rss_bytes=100 * 2**20,
        )


async def start_monitor(clock: FakeClock, **overrides: Any) -> tuple[ServiceHost, CollectorRegistry]:
    registry = CollectorRegistry()
    settings = MonitorSettings(port=0, metrics_port=-1, enable_reflection=False, **overrides)
    host = ServiceHost(settings, MonitorService(settings, clock=clock, registry=registry))
    await host.start()
    return host, registry


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def p99_monitor(clock: FakeClock) -> AsyncIterator[tuple[ServiceHost, CollectorRegistry]]:
    host, registry = await start_monitor(
        clock,
        alert_window_seconds=10,
        alert_p99_latency_ms=500,
        alert_p99_latency_hold_seconds=5,
        alert_error_rate=0,
        # No tick during the test: every transition here comes from the evaluation a report triggers.
        alert_evaluation_interval_seconds=3600,
    )
    try:
        yield host, registry
    finally:
        await host.stop(grace_seconds=0)


def firing_gauge(registry: CollectorRegistry, alert: str) -> float | None:
    return registry.get_sample_value("roundtable_fleet_alerts_firing", {"alert": alert})


async def next_transition(stream: Any) -> monitor_pb2.AlertTransition:
    message = await asyncio.wait_for(stream.read(), timeout=5)
    assert message is not grpc.aio.EOF
    return message


async def test_injected_slowness_fires_a_p99_alert_after_the_hold_time_and_it_resolves_after(
    p99_monitor: tuple[ServiceHost, CollectorRegistry], clock: FakeClock
) -> None:
    host, registry = p99_monitor
    instance = InstanceLatencies()
    async with grpc.aio.insecure_channel(host.address) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        instance.observe(0.004, 100)
        await stub.ReportInstance(instance.report())
        watch = stub.WatchAlerts(monitor_pb2.WatchAlertsRequest())

        # Slow for 4 s: past the threshold, but not yet for the 5 s hold.
        start = clock.now
        for seconds in (1, 3, 5):
            clock.now = start + seconds
            instance.observe(2.0, 50)
            await stub.ReportInstance(instance.report())
            listed = await stub.ListAlerts(monitor_pb2.ListAlertsRequest())
            assert list(listed.firing) == [], f"fired after {seconds - 1} s of a 5 s hold"
        assert firing_gauge(registry, "p99_latency") == 0

        clock.now += 1  # 5 s since the first slow report
        instance.observe(2.0, 50)
        await stub.ReportInstance(instance.report())
        fired = await next_transition(watch)
        assert fired.alert.state == monitor_pb2.ALERT_STATE_FIRING
        assert not fired.replayed
        assert (fired.alert.name, fired.alert.subject, fired.alert.unit) == ("p99_latency", METHOD, "ms")
        # Every call in the window took 2 s: p99 sits in the (1 s, 2.5 s] bucket.
        assert 1000 < fired.alert.value <= 2500
        assert (fired.alert.threshold, fired.alert.hold_seconds) == (500, 5)
        assert abs(fired.alert.fired_at.ToNanoseconds() / 1e9 - time.time()) < 60
        assert not fired.alert.HasField("resolved_at")
        assert "above 500 ms" in fired.alert.summary
        assert firing_gauge(registry, "p99_latency") == 1
        listed = await stub.ListAlerts(monitor_pb2.ListAlertsRequest())
        assert [alert.subject for alert in listed.firing] == [METHOD]

        # A watch begun now gets the firing alert first, marked replayed.
        late_watch = stub.WatchAlerts(monitor_pb2.WatchAlertsRequest())
        replayed = await next_transition(late_watch)
        assert replayed.replayed
        assert replayed.alert.state == monitor_pb2.ALERT_STATE_FIRING

        # Normal latency again: once the slow calls leave the 10 s window, p99 drops and the alert resolves.
        clock.now += 2
        instance.observe(0.004, 100)
        await stub.ReportInstance(instance.report())
        assert len((await stub.ListAlerts(monitor_pb2.ListAlertsRequest())).firing) == 1, "slow calls still in window"
        clock.now += 9
        instance.observe(0.004, 100)
        await stub.ReportInstance(instance.report())
        for stream in (watch, late_watch):
            resolved = await next_transition(stream)
            assert resolved.alert.state == monitor_pb2.ALERT_STATE_RESOLVED
            assert resolved.alert.subject == METHOD
            assert resolved.alert.value < 10
            assert resolved.alert.fired_at == fired.alert.fired_at
            assert resolved.alert.HasField("resolved_at")
        listed = await stub.ListAlerts(monitor_pb2.ListAlertsRequest())
        assert list(listed.firing) == []
        assert [alert.state for alert in listed.resolved] == [monitor_pb2.ALERT_STATE_RESOLVED]
        assert firing_gauge(registry, "p99_latency") == 0
        watch.cancel()
        late_watch.cancel()
    # Watchers that hang up are forgotten.
    service: MonitorService = host.service  # type: ignore[assignment]
    deadline = time.monotonic() + 5
    while service.alerts.feed.watcher_count():
        assert time.monotonic() < deadline, "cancelled watches still subscribed"
        await asyncio.sleep(0.01)


async def test_the_periodic_tick_resolves_an_alert_of_an_instance_that_went_silent(clock: FakeClock) -> None:
    host, _ = await start_monitor(
        clock, alert_queued_sessions=5, alert_queue_hold_seconds=0, alert_evaluation_interval_seconds=0.05
    )
    try:
        async with grpc.aio.insecure_channel(host.address) as channel:
            stub = monitor_pb2_grpc.MonitorServiceStub(channel)
            instance = InstanceLatencies("session-busy")
            instance.queued_sessions = 8
            await stub.ReportInstance(instance.report())
            watch = stub.WatchAlerts(monitor_pb2.WatchAlertsRequest())
            fired = await next_transition(watch)
            assert (fired.alert.name, fired.alert.subject, fired.replayed) == ("queue_depth", "session-busy", True)
            assert fired.alert.summary == "queued discussions on session-busy is 8, above 5 for at least 0 s"
            clock.now += 31  # stale: no report will come to trigger an evaluation
            resolved = await next_transition(watch)
            assert resolved.alert.state == monitor_pb2.ALERT_STATE_RESOLVED
            watch.cancel()
    finally:
        await host.stop(grace_seconds=0)


async def test_stopping_the_monitor_ends_open_watches_without_waiting_for_the_grace_period(clock: FakeClock) -> None:
    host, _ = await start_monitor(clock)
    async with grpc.aio.insecure_channel(host.address) as channel:
        watch = monitor_pb2_grpc.MonitorServiceStub(channel).WatchAlerts(monitor_pb2.WatchAlertsRequest())
        service: MonitorService = host.service  # type: ignore[assignment]
        deadline = time.monotonic() + 5
        while service.alerts.feed.watcher_count() == 0:
            assert time.monotonic() < deadline, "the watch never reached the server"
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await host.stop(grace_seconds=10)
        assert time.monotonic() - started < 5
        assert await asyncio.wait_for(watch.read(), 5) is grpc.aio.EOF
        assert await watch.code() == grpc.StatusCode.OK


async def test_alerts_firing_are_on_metrics_with_only_the_alert_name_as_label(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    settings = MonitorSettings(port=0, metrics_port=-1, alert_rss_mb=50, alert_rss_hold_seconds=0)
    service = MonitorService(settings, clock=clock, registry=registry)
    host = ServiceHost(settings, service)
    await host.start()
    try:
        async with grpc.aio.insecure_channel(host.address) as channel:
            stub = monitor_pb2_grpc.MonitorServiceStub(channel)
            for instance_id in ("session-a", "session-b"):
                await stub.ReportInstance(InstanceLatencies(instance_id).report())
        samples = [
            sample
            for family in registry.collect()
            if family.name == "roundtable_fleet_alerts_firing"
            for sample in family.samples
        ]
        assert {sample.labels["alert"]: sample.value for sample in samples} == {
            "error_rate": 0,
            "p99_latency": 0,
            "memory_rss": 2,
            "cpu": 0,
            "queue_depth": 0,
        }
        assert all(set(sample.labels) == {"alert"} for sample in samples)
    finally:
        await host.stop(grace_seconds=0)


async def test_performance_history_over_grpc(clock: FakeClock) -> None:
    host, _ = await start_monitor(clock)
    try:
        async with grpc.aio.insecure_channel(host.address) as channel:
            stub = monitor_pb2_grpc.MonitorServiceStub(channel)
            instance = InstanceLatencies()
            await stub.ReportInstance(instance.report())
            for _ in range(3):
                clock.now += 10
                instance.observe(0.03, 20)
                await stub.ReportInstance(instance.report())
            history = await stub.GetPerformanceHistory(
                monitor_pb2.GetPerformanceHistoryRequest(window_seconds=30, step_seconds=10)
            )
            assert (history.window_seconds, history.step_seconds) == (30, 10)
            [method] = history.methods
            assert method.method == METHOD
            assert [point.requests for point in method.points] == [20, 20, 20]
            assert [point.requests_per_second for point in method.points] == [2.0, 2.0, 2.0]
            assert all(25 < point.p99_ms <= 50 for point in method.points)
            stamps = [point.at.ToNanoseconds() / 1e9 for point in method.points]
            assert stamps[1] - stamps[0] == pytest.approx(10, abs=0.01)
            defaulted = await stub.GetPerformanceHistory(monitor_pb2.GetPerformanceHistoryRequest())
            assert (defaulted.window_seconds, defaulted.step_seconds) == (60, 3)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetPerformanceHistory(
                    monitor_pb2.GetPerformanceHistoryRequest(window_seconds=30, step_seconds=31)
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "step_seconds must be between 1 and window_seconds (30)" in (caught.value.details() or "")
    finally:
        await host.stop(grace_seconds=0)
