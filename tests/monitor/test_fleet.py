"""FleetView and histogram_quantile, driven by a fake clock."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from services.gen.roundtable.monitor.v1 import monitor_pb2
from services.monitor.fleet import FleetView, histogram_quantile
from tests.monitor.fakes import FakeClock, timestamp

INF = math.inf
BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, INF)
METHOD = "/roundtable.session.v1.SessionService/GetDiscussion"
OTHER = "/roundtable.session.v1.SessionService/CreateDiscussion"
# Instances in these tests started long before any window, unless a test says otherwise.
LONG_AGO = 1_000_000.0


def counters(method: str, per_bucket: Sequence[int], errors: int = 0) -> monitor_pb2.MethodCounters:
    """Counters whose buckets hold `per_bucket` (not cumulative) observations, one per handled RPC."""
    cumulative, running = [], 0
    for count in per_bucket:
        running += count
        cumulative.append(running)
    return monitor_pb2.MethodCounters(
        method=method,
        handled_total=running,
        error_total=errors,
        bucket_upper_bounds_seconds=BOUNDS,
        bucket_counts=cumulative,
    )


def report(
    instance_id: str,
    *methods: monitor_pb2.MethodCounters,
    started_at: float = LONG_AGO,
    uptime_seconds: float = 10_000.0,
    active_sessions: int = 0,
    service: str = "session",
) -> monitor_pb2.InstanceReport:
    return monitor_pb2.InstanceReport(
        instance_id=instance_id,
        service=service,
        methods=methods,
        started_at=timestamp(started_at),
        reported_at=timestamp(started_at + uptime_seconds),
        active_sessions=active_sessions,
        queued_sessions=1,
        session_capacity=10,
        live_agent_sets=2,
        cpu_percent=12.5,
        rss_bytes=50_000_000,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fleet(clock: FakeClock) -> FleetView:
    return FleetView(stale_after_seconds=30.0, history_per_instance=400, clock=clock, wall_clock=lambda: 5e8)


def test_quantiles_interpolate_within_buckets_like_prometheus() -> None:
    buckets = [(0.1, 50), (0.2, 90), (0.5, 99), (INF, 100)]
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.2 + 0.3 * 5 / 9)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.5)
    # Past the highest finite bound Prometheus answers with that bound.
    assert histogram_quantile(0.995, buckets) == pytest.approx(0.5)


def test_quantile_is_undefined_without_observations_or_inf_bucket() -> None:
    assert math.isnan(histogram_quantile(0.5, [(0.1, 0), (INF, 0)]))
    assert math.isnan(histogram_quantile(0.5, [(0.1, 3), (0.2, 4)]))


def test_performance_diffs_counters_over_the_window(fleet: FleetView, clock: FakeClock) -> None:
    # 1000 slow calls before the window, then 100 fast ones every 10 s.
    for step in range(4):
        fleet.record(report("a", counters(METHOD, [100 * step, 0, 0, 0, 1000, 0], errors=5 + step)))
        clock.now += 10
    clock.now -= 10  # now is the time of the last report
    # Window 15 s: the base is the report at or before now - 15, i.e. the second one.
    [row] = fleet.performance(15)
    assert row.method == METHOD
    assert row.requests == 200
    assert row.errors == 2
    assert row.requests_per_second == pytest.approx(200 / 20)
    assert row.error_rate == pytest.approx(0.01)
    # All 200 landed in the first bucket, (0, 5 ms].
    assert row.p50_ms == pytest.approx(2.5)
    assert row.p99_ms == pytest.approx(4.95)


def test_counters_are_summed_across_instances(fleet: FleetView, clock: FakeClock) -> None:
    fleet.record(report("a", counters(METHOD, [0] * 6)))
    fleet.record(report("b", counters(METHOD, [0] * 6)))
    clock.now += 10
    fleet.record(report("a", counters(METHOD, [0, 90, 0, 0, 0, 0])))
    fleet.record(report("b", counters(METHOD, [0, 0, 0, 0, 10, 0], errors=10)))
    [row] = fleet.performance(60)
    assert (row.requests, row.errors) == (100, 10)
    assert row.requests_per_second == pytest.approx(9 + 1)
    assert row.error_rate == pytest.approx(0.1)
    # Summed cumulative buckets: 0, 90, 90, 90, 100, 100.
    assert row.p50_ms == pytest.approx(5 + 5 * 50 / 90)
    assert row.p95_ms == pytest.approx(75.0)
    assert row.p99_ms == pytest.approx(95.0)


def test_stale_instances_are_dropped(fleet: FleetView, clock: FakeClock) -> None:
    fleet.record(report("a", active_sessions=3))
    clock.now += 20
    fleet.record(report("b", active_sessions=4))
    assert fleet.concurrency().active_sessions == 7
    clock.now += 15  # a was last heard 35 s ago, b 15 s ago
    totals = fleet.concurrency()
    assert [row.instance_id for row in totals.instances] == ["b"]
    assert totals.active_sessions == 4
    assert fleet.instance_count() == 1


def test_counter_reset_takes_the_newer_value_as_the_delta(fleet: FleetView, clock: FakeClock) -> None:
    fleet.record(report("a", counters(METHOD, [1000, 0, 0, 0, 0, 0])))
    clock.now += 20
    # Restarted under the same id (same reported start): the counter went down.
    fleet.record(report("a", counters(METHOD, [0, 50, 0, 0, 0, 0])))
    [row] = fleet.performance(10)
    assert row.requests == 50
    assert row.requests_per_second == pytest.approx(50 / 20)
    assert row.p50_ms == pytest.approx(7.5)


def test_new_start_time_counts_as_restart_even_if_counters_grew(fleet: FleetView, clock: FakeClock) -> None:
    fleet.record(report("a", counters(METHOD, [1000, 0, 0, 0, 0, 0])))
    clock.now += 20
    fleet.record(report("a", counters(METHOD, [1500, 0, 0, 0, 0, 0]), started_at=LONG_AGO + 20_000, uptime_seconds=500))
    [row] = fleet.performance(10)
    assert row.requests == 1500


def test_single_report_counts_from_zero_only_if_started_in_window(fleet: FleetView) -> None:
    fleet.record(report("old", counters(METHOD, [100, 0, 0, 0, 0, 0])))
    fleet.record(report("new", counters(METHOD, [0, 40, 0, 0, 0, 0]), uptime_seconds=20))
    [row] = fleet.performance(60)
    assert row.requests == 40  # "old" has nothing to diff against, so it is left out
    assert row.requests_per_second == pytest.approx(40 / 20)
    assert fleet.performance(10) == []  # "new" started 20 s ago: before a 10 s window


def test_idle_methods_are_left_out_and_new_methods_count_from_zero(fleet: FleetView, clock: FakeClock) -> None:
    fleet.record(report("a", counters(METHOD, [10, 0, 0, 0, 0, 0])))
    clock.now += 10
    fleet.record(report("a", counters(METHOD, [10, 0, 0, 0, 0, 0]), counters(OTHER, [0, 0, 5, 0, 0, 0])))
    [row] = fleet.performance(60)
    assert (row.method, row.requests) == (OTHER, 5)


def test_rate_uses_at_least_one_second(fleet: FleetView, clock: FakeClock) -> None:
    fleet.record(report("a", counters(METHOD, [0] * 6)))
    clock.now += 0.25
    fleet.record(report("a", counters(METHOD, [3, 0, 0, 0, 0, 0])))
    [row] = fleet.performance(60)
    assert row.requests_per_second == pytest.approx(3.0)


def test_history_is_bounded_and_the_oldest_kept_report_is_the_base(clock: FakeClock) -> None:
    fleet = FleetView(stale_after_seconds=30.0, history_per_instance=3, clock=clock)
    for step in range(5):
        fleet.record(report("a", counters(METHOD, [10 * step, 0, 0, 0, 0, 0])))
        clock.now += 1
    [row] = fleet.performance(60)
    assert row.requests == 20  # reports 2..4 are kept


def test_concurrency_totals_and_rows(fleet: FleetView) -> None:
    fleet.record(report("b", active_sessions=4, service="agents"))
    fleet.record(report("a", active_sessions=3))
    totals = fleet.concurrency()
    assert (totals.active_sessions, totals.queued_sessions, totals.session_capacity) == (7, 2, 20)
    assert totals.live_agent_sets == 4
    assert [(row.instance_id, row.service) for row in totals.instances] == [("a", "session"), ("b", "agents")]
    assert totals.instances[0].cpu_percent == 12.5
    assert totals.instances[0].rss_bytes == 50_000_000
    assert totals.instances[0].last_report_wall_time == 5e8


def test_a_capacity_the_replicas_share_counts_once_and_their_own_load_adds_up(fleet: FleetView) -> None:
    """Two replicas on one Redis admission both report its cap of 10: the fleet holds 10 slots, not 20."""
    for instance_id, active_sessions in (("session-1", 2), ("session-2", 1)):
        shared = report(instance_id, active_sessions=active_sessions)
        shared.session_capacity_shared = True
        fleet.record(shared)
    fleet.record(report("session-solo", active_sessions=4))  # its own cap of 10, beside them
    totals = fleet.concurrency()
    assert (totals.active_sessions, totals.queued_sessions, totals.session_capacity) == (7, 3, 20)
    assert [row.session_capacity_shared for row in totals.instances] == [True, True, False]


def test_performance_history_has_one_point_per_step(fleet: FleetView, clock: FakeClock) -> None:
    fleet.record(report("a", counters(METHOD, [0] * 6)))
    fleet.record(report("b", counters(METHOD, [0] * 6)))
    clock.now += 10
    fleet.record(report("a", counters(METHOD, [10, 0, 0, 0, 0, 0])))
    fleet.record(report("b", counters(METHOD, [5, 0, 0, 0, 0, 0])))
    clock.now += 10
    fleet.record(report("a", counters(METHOD, [10, 0, 0, 0, 20, 0], errors=2)))
    # b went quiet in the last step: it adds nothing there but does not hide a's traffic.
    [row] = fleet.history(window_seconds=30, step_seconds=10)
    assert row.method == METHOD
    # Steps end 20 s ago, 10 s ago and now; before the first reports nothing is known.
    assert [point.at_wall_time for point in row.points] == [5e8 - 20, 5e8 - 10, 5e8]
    assert [point.requests for point in row.points] == [0, 15, 20]
    assert [point.errors for point in row.points] == [0, 0, 2]
    assert [point.requests_per_second for point in row.points] == [0, 1.5, 2.0]
    assert row.points[1].p99_ms == pytest.approx(4.95)
    assert row.points[2].p99_ms == pytest.approx(50 + 50 * 0.99)
    assert row.points[2].error_rate == pytest.approx(0.1)
    assert row.points[0].p99_ms == 0


def test_performance_history_counts_an_instance_started_in_a_step_from_zero(fleet: FleetView, clock: FakeClock) -> None:
    clock.now += 10
    fleet.record(report("new", counters(METHOD, [0, 7, 0, 0, 0, 0]), uptime_seconds=4))
    fleet.record(report("old", counters(METHOD, [100, 0, 0, 0, 0, 0])))
    [row] = fleet.history(window_seconds=20, step_seconds=10)
    assert [point.requests for point in row.points] == [0, 7]  # "old" has no earlier report to diff against


def test_performance_history_across_a_restart_uses_the_new_counters(fleet: FleetView, clock: FakeClock) -> None:
    fleet.record(report("a", counters(METHOD, [1000, 0, 0, 0, 0, 0])))
    clock.now += 10
    fleet.record(report("a", counters(METHOD, [1200, 0, 0, 0, 0, 0]), started_at=LONG_AGO + 20_000, uptime_seconds=5))
    [row] = fleet.history(window_seconds=10, step_seconds=10)
    assert [point.requests for point in row.points] == [1200]
