"""The alert state machine, the rules over the fleet view, and the watch feed, without a server."""

from __future__ import annotations

import asyncio

import pytest

from services.monitor import alerts
from services.monitor.alerts import (
    AlertEvaluator,
    AlertFeed,
    AlertState,
    AlertThresholds,
    AlertTransition,
    FleetAlerts,
    Observation,
    Rule,
    WatcherFellBehind,
)
from services.monitor.fleet import FleetView
from services.monitor.service import alert_thresholds
from services.monitor.settings import MonitorSettings
from services.shared.settings import load_settings
from tests.monitor.fakes import FakeClock
from tests.monitor.test_fleet import METHOD, OTHER, counters, report

P99_RULE = Rule(threshold=500.0, hold_seconds=30.0)


def p99(value_ms: float, subject: str = METHOD, rule: Rule = P99_RULE) -> Observation:
    return Observation(alerts.P99_LATENCY, subject, value_ms, "ms", rule)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def evaluator(clock: FakeClock) -> AlertEvaluator:
    return AlertEvaluator(resolved_retention_seconds=600, clock=clock, wall_clock=lambda: 1.7e9 + clock.now)


def states(transitions: list[AlertTransition]) -> list[tuple[str, str, AlertState]]:
    return [(t.alert.name, t.alert.subject, t.alert.state) for t in transitions]


def test_fires_only_after_the_condition_held_for_the_hold_time_then_resolves(
    evaluator: AlertEvaluator, clock: FakeClock
) -> None:
    assert evaluator.evaluate([p99(900)]) == []
    clock.now += 29
    assert evaluator.evaluate([p99(950)]) == []
    assert evaluator.firing() == []
    clock.now += 1
    [fired] = evaluator.evaluate([p99(980)])
    assert fired.alert.state is AlertState.FIRING
    assert (fired.alert.value, fired.alert.threshold, fired.alert.hold_seconds) == (980, 500, 30)
    assert fired.alert.fired_wall_time == 1.7e9 + clock.now
    assert fired.alert.summary == f"p99 latency of {METHOD} is 980 ms, above 500 ms for at least 30 s"
    # Still breaching: no new transition, but the latest value is kept.
    clock.now += 5
    assert evaluator.evaluate([p99(1200)]) == []
    [firing] = evaluator.firing()
    assert firing.value == 1200
    assert evaluator.firing_counts()[alerts.P99_LATENCY] == 1

    clock.now += 5
    [resolved] = evaluator.evaluate([p99(120)])
    assert resolved.alert.state is AlertState.RESOLVED
    assert resolved.alert.value == 120
    assert resolved.alert.resolved_wall_time == 1.7e9 + clock.now
    assert resolved.alert.fired_wall_time == fired.alert.fired_wall_time
    assert "back to 120 ms" in resolved.alert.summary
    assert evaluator.firing() == []
    assert evaluator.resolved() == [resolved.alert]
    assert evaluator.firing_counts() == dict.fromkeys(alerts.ALERT_NAMES, 0)


def test_a_breach_interrupted_before_the_hold_time_starts_over(evaluator: AlertEvaluator, clock: FakeClock) -> None:
    evaluator.evaluate([p99(900)])
    clock.now += 20
    evaluator.evaluate([p99(100)])
    clock.now += 1
    evaluator.evaluate([p99(900)])
    clock.now += 29
    assert evaluator.evaluate([p99(900)]) == [], "20 s + 29 s of breach with a clear between is not 30 s"
    clock.now += 1
    assert states(evaluator.evaluate([p99(900)])) == [(alerts.P99_LATENCY, METHOD, AlertState.FIRING)]


def test_a_value_equal_to_the_threshold_is_not_a_breach(evaluator: AlertEvaluator, clock: FakeClock) -> None:
    evaluator.evaluate([p99(500)])
    clock.now += 60
    assert evaluator.evaluate([p99(500)]) == []


def test_zero_hold_fires_at_once(evaluator: AlertEvaluator) -> None:
    rule = Rule(threshold=0.05, hold_seconds=0)
    observation = Observation(alerts.ERROR_RATE, METHOD, 0.5, "ratio", rule)
    [fired] = evaluator.evaluate([observation])
    assert fired.alert.summary == f"error rate of {METHOD} is 50.0 %, above 5.0 % for at least 0 s"


def test_subjects_are_independent_and_one_that_disappears_resolves(evaluator: AlertEvaluator, clock: FakeClock) -> None:
    rule = Rule(threshold=10, hold_seconds=0)
    queue = [Observation(alerts.QUEUE_DEPTH, f"session-{index}", 20, "sessions", rule) for index in range(3)]
    assert len(evaluator.evaluate(queue)) == 3
    assert evaluator.firing_counts()[alerts.QUEUE_DEPTH] == 3
    clock.now += 1
    # session-2 left the fleet (stale): nothing breaches for it any more.
    assert states(evaluator.evaluate(queue[:2])) == [(alerts.QUEUE_DEPTH, "session-2", AlertState.RESOLVED)]
    assert [alert.subject for alert in evaluator.firing()] == ["session-0", "session-1"]


def test_resolved_alerts_are_listed_until_the_retention_time(evaluator: AlertEvaluator, clock: FakeClock) -> None:
    rule = Rule(threshold=1, hold_seconds=0)
    for subject in ("a", "b"):
        evaluator.evaluate([Observation(alerts.CPU, subject, 2, "percent", rule)])
        clock.now += 100
        evaluator.evaluate([])
    assert [alert.subject for alert in evaluator.resolved()] == ["b", "a"], "most recent first"
    clock.now += 550  # a resolved 650 s ago, b 550 s ago
    assert [alert.subject for alert in evaluator.resolved()] == ["b"]
    clock.now += 100
    assert evaluator.resolved() == []


def test_observe_applies_thresholds_per_method_and_skips_disabled_rules() -> None:
    settings = MonitorSettings(
        alert_error_rate=0,
        alert_p99_latency_ms=100,
        alert_p99_latency_ms_by_method={OTHER: 5000},
        alert_rss_mb=1,
        alert_cpu_percent=0,
        alert_queued_sessions=0,
    )
    clock = FakeClock()
    fleet = FleetView(stale_after_seconds=30, history_per_instance=10, clock=clock)
    stream = "/roundtable.session.v1.SessionService/StreamDiscussion"
    slow = [0, 0, 0, 0, 0, 10]  # every call past the highest finite bound (100 ms)
    fleet.record(report("session-a", counters(METHOD, [0] * 6), counters(OTHER, [0] * 6), counters(stream, [0] * 6)))
    clock.now += 10
    fleet.record(report("session-a", counters(METHOD, slow), counters(OTHER, slow), counters(stream, slow)))
    observations = alerts.observe(fleet.performance(60), fleet.concurrency(), alert_thresholds(settings))
    rules = {(o.name, o.subject): o.rule.threshold for o in observations}
    # Long-lived streams are off by default; OTHER has its own threshold; error rate, CPU, queue are off.
    assert rules == {
        (alerts.P99_LATENCY, METHOD): 100,
        (alerts.P99_LATENCY, OTHER): 5000,
        (alerts.MEMORY_RSS, "session-a"): 2**20,
    }
    memory = next(o for o in observations if o.name == alerts.MEMORY_RSS)
    assert (memory.value, memory.unit, memory.breaching) == (50_000_000, "bytes", True)


def test_alert_settings_come_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUNDTABLE_MONITOR_ALERT_CPU_PERCENT", "75")
    settings = load_settings(
        MonitorSettings,
        ["--alert-p99-latency-ms-by-method", f'{{"{OTHER}": 250}}', "--alert-error-rate-hold-seconds", "15"],
    )
    thresholds = alert_thresholds(settings)
    assert thresholds.p99_rule(OTHER) == Rule(250, 60.0)
    assert thresholds.cpu_percent == Rule(75, 120.0)
    assert thresholds.error_rate == Rule(0.05, 15.0)
    assert thresholds.rss_bytes.threshold == 2048 * 2**20


@pytest.mark.parametrize(
    "argv",
    [
        ["--alert-error-rate", "1.5"],
        ["--alert-cpu-hold-seconds", "-1"],
        ["--alert-p99-latency-ms-by-method", '{"/a/B": -5}'],
        ["--alert-window-seconds", "0"],
    ],
)
def test_invalid_alert_settings_exit_with_code_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        load_settings(MonitorSettings, argv)
    assert caught.value.code == 2


def test_default_thresholds_leave_long_lived_streams_alone_unless_named() -> None:
    stream = "/roundtable.session.v1.SessionService/StreamDiscussion"
    assert alert_thresholds(MonitorSettings()).p99_rule(stream).enabled is False
    named = alert_thresholds(MonitorSettings(alert_p99_latency_ms_by_method={stream: 60_000}))
    assert named.p99_rule(stream) == Rule(60_000, 60.0)
    assert named.p99_rule("/roundtable.agents.v1.AgentService/RunDiscussion").enabled is False


async def test_watchers_get_the_firing_alerts_first_then_live_transitions(clock: FakeClock) -> None:
    fleet = FleetView(stale_after_seconds=30, history_per_instance=10, clock=clock)
    thresholds = AlertThresholds(
        error_rate=Rule(0, 0),
        p99_latency_ms=Rule(0, 0),
        rss_bytes=Rule(0, 0),
        cpu_percent=Rule(0, 0),
        queued_sessions=Rule(0.5, 0),
    )
    fleet_alerts = FleetAlerts(
        fleet, thresholds, window_seconds=60, evaluator=AlertEvaluator(resolved_retention_seconds=60, clock=clock)
    )
    fleet.record(report("session-a"))  # one queued discussion, above 0.5
    fleet_alerts.evaluate()
    subscription = fleet_alerts.watch()
    received: list[AlertTransition] = []

    async def read() -> None:
        async for transition in subscription.transitions():
            received.append(transition)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0)
    fleet.record(report("session-b"))
    fleet_alerts.evaluate()
    clock.now += 31  # both go stale
    fleet_alerts.evaluate()
    fleet_alerts.feed.close()
    await asyncio.wait_for(reader, 5)
    assert [(t.alert.subject, t.alert.state, t.replayed) for t in received] == [
        ("session-a", AlertState.FIRING, True),
        ("session-b", AlertState.FIRING, False),
        ("session-a", AlertState.RESOLVED, False),
        ("session-b", AlertState.RESOLVED, False),
    ]
    assert fleet_alerts.feed.watcher_count() == 0


async def test_a_watcher_that_falls_behind_is_ended_not_left_with_gaps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alerts, "MAX_QUEUED_TRANSITIONS", 3)
    feed = AlertFeed()
    subscription = feed.subscribe([])
    rule = Rule(1, 0)
    evaluator = AlertEvaluator(resolved_retention_seconds=60)
    flood = evaluator.evaluate([Observation(alerts.CPU, f"i-{index}", 2, "percent", rule) for index in range(5)])
    feed.publish(flood)
    with pytest.raises(WatcherFellBehind):
        async for _ in subscription.transitions():
            pass
    assert feed.watcher_count() == 0


async def test_a_watch_begun_after_close_ends_after_its_replay(evaluator: AlertEvaluator) -> None:
    feed = AlertFeed()
    feed.close()
    [fired] = evaluator.evaluate([p99(900, rule=Rule(500, 0))])
    subscription = feed.subscribe([fired.alert])
    assert [t.replayed async for t in subscription.transitions()] == [True]
