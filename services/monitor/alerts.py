"""Threshold alerts over the fleet view: fire once a condition has held for its hold time, resolve when it clears."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from services.monitor.fleet import ConcurrencyTotals, FleetView, MethodPerformance

logger = logging.getLogger(__name__)

ERROR_RATE = "error_rate"
P99_LATENCY = "p99_latency"
MEMORY_RSS = "memory_rss"
CPU = "cpu"
QUEUE_DEPTH = "queue_depth"
ALERT_NAMES: tuple[str, ...] = (ERROR_RATE, P99_LATENCY, MEMORY_RSS, CPU, QUEUE_DEPTH)

# Resolved alerts are kept for a while for ListAlerts; this bounds them when many flap at once.
MAX_RESOLVED_KEPT = 500
# Transitions a watcher may fall behind by before its stream is ended (it re-watches and gets a replay).
MAX_QUEUED_TRANSITIONS = 1000


class AlertState(enum.Enum):
    """Where an alert stands; pending conditions are not alerts yet."""

    FIRING = "firing"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class Rule:
    """A threshold and how long it must be exceeded before firing; a threshold of 0 turns the rule off."""

    threshold: float
    hold_seconds: float

    @property
    def enabled(self) -> bool:
        """Whether the rule is evaluated at all."""
        return self.threshold > 0


@dataclass(frozen=True)
class AlertThresholds:
    """Every alert rule, as configured."""

    error_rate: Rule
    p99_latency_ms: Rule
    rss_bytes: Rule
    cpu_percent: Rule
    queued_sessions: Rule
    # Full method name → p99 threshold in ms, over p99_latency_ms.threshold; 0 turns the method off.
    p99_latency_ms_by_method: Mapping[str, float] = field(default_factory=dict)

    def p99_rule(self, method: str) -> Rule:
        """The p99 rule of one method."""
        threshold = self.p99_latency_ms_by_method.get(method, self.p99_latency_ms.threshold)
        return Rule(threshold, self.p99_latency_ms.hold_seconds)


@dataclass(frozen=True)
class Observation:
    """One alert subject's value at evaluation time and the rule it is held to."""

    name: str
    subject: str
    value: float
    unit: str
    rule: Rule

    @property
    def breaching(self) -> bool:
        """Whether the value is past the threshold."""
        return self.value > self.rule.threshold


def _format(value: float, unit: str) -> str:
    if unit == "ratio":
        return f"{value * 100:.1f} %"
    if unit == "ms":
        return f"{value:.0f} ms"
    if unit == "bytes":
        return f"{value / 2**20:.0f} MB"
    if unit == "percent":
        return f"{value:.0f} %"
    return f"{value:.0f}"


_WHAT = {
    ERROR_RATE: "error rate of {subject}",
    P99_LATENCY: "p99 latency of {subject}",
    MEMORY_RSS: "resident memory of {subject}",
    CPU: "CPU use of {subject}",
    QUEUE_DEPTH: "queued discussions on {subject}",
}


@dataclass(frozen=True)
class Alert:
    """A condition that held for its hold time: firing now, or resolved at resolved_wall_time."""

    name: str
    subject: str
    state: AlertState
    value: float
    threshold: float
    unit: str
    hold_seconds: float
    fired_wall_time: float
    resolved_wall_time: float | None = None

    @property
    def summary(self) -> str:
        """One line a person can read."""
        what = _WHAT.get(self.name, self.name + " of {subject}").format(subject=self.subject)
        value, threshold = _format(self.value, self.unit), _format(self.threshold, self.unit)
        if self.state is AlertState.FIRING:
            return f"{what} is {value}, above {threshold} for at least {self.hold_seconds:g} s"
        return f"{what} is back to {value} (threshold {threshold})"


@dataclass(frozen=True)
class AlertTransition:
    """An alert that just fired or resolved, or (replayed) one already firing when a watch began."""

    alert: Alert
    replayed: bool = False


def observe(
    performance: Iterable[MethodPerformance], concurrency: ConcurrencyTotals, thresholds: AlertThresholds
) -> list[Observation]:
    """What every enabled rule sees in the fleet now: per method error rate and p99, per instance the rest."""
    observations = []
    for row in performance:
        if thresholds.error_rate.enabled:
            observations.append(Observation(ERROR_RATE, row.method, row.error_rate, "ratio", thresholds.error_rate))
        p99_rule = thresholds.p99_rule(row.method)
        if p99_rule.enabled:
            observations.append(Observation(P99_LATENCY, row.method, row.p99_ms, "ms", p99_rule))
    for instance in concurrency.instances:
        if thresholds.rss_bytes.enabled:
            observations.append(
                Observation(MEMORY_RSS, instance.instance_id, instance.rss_bytes, "bytes", thresholds.rss_bytes)
            )
        if thresholds.cpu_percent.enabled:
            observations.append(
                Observation(CPU, instance.instance_id, instance.cpu_percent, "percent", thresholds.cpu_percent)
            )
        if thresholds.queued_sessions.enabled:
            observations.append(
                Observation(
                    QUEUE_DEPTH, instance.instance_id, instance.queued_sessions, "sessions", thresholds.queued_sessions
                )
            )
    return observations


class AlertEvaluator:
    """The alert state machine: breaching → (after hold) FIRING → (on clear) RESOLVED."""

    def __init__(
        self,
        *,
        resolved_retention_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._resolved_retention_seconds = resolved_retention_seconds
        self._clock = clock
        self._wall_clock = wall_clock
        # (name, subject) → when its current uninterrupted breach began, on the monotonic clock.
        self._breaching_since: dict[tuple[str, str], float] = {}
        self._firing: dict[tuple[str, str], Alert] = {}
        # (resolved at on the monotonic clock, alert), newest last.
        self._resolved: deque[tuple[float, Alert]] = deque(maxlen=MAX_RESOLVED_KEPT)
        # /metrics reads firing counts from the HTTP server's thread.
        self._lock = threading.Lock()

    def evaluate(self, observations: Iterable[Observation]) -> list[AlertTransition]:
        """Advance every subject's state with what is observed now; a subject not observed counts as cleared."""
        seen = {(observation.name, observation.subject): observation for observation in observations}
        transitions = []
        with self._lock:
            now = self._clock()
            wall_now = self._wall_clock()
            for key in sorted(seen):
                observation = seen[key]
                if not observation.breaching:
                    self._breaching_since.pop(key, None)
                    if key in self._firing:
                        transitions.append(self._resolve(key, observation.value, now, wall_now))
                    continue
                since = self._breaching_since.setdefault(key, now)
                firing = self._firing.get(key)
                if firing is not None:
                    self._firing[key] = replace(firing, value=observation.value)
                elif now - since >= observation.rule.hold_seconds:
                    alert = Alert(
                        name=observation.name,
                        subject=observation.subject,
                        state=AlertState.FIRING,
                        value=observation.value,
                        threshold=observation.rule.threshold,
                        unit=observation.unit,
                        hold_seconds=observation.rule.hold_seconds,
                        fired_wall_time=wall_now,
                    )
                    self._firing[key] = alert
                    transitions.append(AlertTransition(alert))
            for key in sorted(set(self._breaching_since) - set(seen)):
                del self._breaching_since[key]
            for key in sorted(set(self._firing) - set(seen)):
                # The method went idle or the instance left the fleet: nothing is breaching any more.
                transitions.append(self._resolve(key, self._firing[key].value, now, wall_now))
            self._prune(now)
        for transition in transitions:
            alert = transition.alert
            level = logging.WARNING if alert.state is AlertState.FIRING else logging.INFO
            logger.log(level, "alert %s %s: %s", alert.name, alert.state.value, alert.summary)
        return transitions

    def _resolve(self, key: tuple[str, str], value: float, now: float, wall_now: float) -> AlertTransition:
        alert = replace(self._firing.pop(key), state=AlertState.RESOLVED, value=value, resolved_wall_time=wall_now)
        self._resolved.append((now, alert))
        return AlertTransition(alert)

    def _prune(self, now: float) -> None:
        while self._resolved and now - self._resolved[0][0] > self._resolved_retention_seconds:
            self._resolved.popleft()

    def firing(self) -> list[Alert]:
        """Alerts firing now, oldest first."""
        with self._lock:
            return sorted(self._firing.values(), key=lambda alert: (alert.fired_wall_time, alert.name, alert.subject))

    def resolved(self) -> list[Alert]:
        """Alerts resolved within the retention time, most recent first."""
        with self._lock:
            self._prune(self._clock())
            return [alert for _, alert in reversed(self._resolved)]

    def firing_counts(self) -> dict[str, int]:
        """How many alerts of each name are firing; every known name is present."""
        with self._lock:
            counts = dict.fromkeys(ALERT_NAMES, 0)
            for name, _ in self._firing:
                counts[name] = counts.get(name, 0) + 1
            return counts


class WatcherFellBehind(Exception):
    """A watcher did not keep up with the transitions; it should watch again."""


class AlertSubscription:
    """One watcher: the replay of what was firing when it subscribed, then live transitions."""

    def __init__(self, replay: list[AlertTransition], on_close: Callable[[AlertSubscription], None]) -> None:
        self.replay = replay
        self._queue: asyncio.Queue[AlertTransition | None] = asyncio.Queue(maxsize=MAX_QUEUED_TRANSITIONS)
        self._on_close = on_close
        self._fell_behind = False
        self._ended = False

    def push(self, transition: AlertTransition) -> None:
        """Queue a transition; a watcher too far behind is ended rather than left with gaps."""
        if self._ended:
            return
        try:
            self._queue.put_nowait(transition)
        except asyncio.QueueFull:
            self._fell_behind = True
            self.end()

    def end(self) -> None:
        """End the stream once the watcher has read what is queued (all of it, unless it fell behind)."""
        self._ended = True
        if self._fell_behind:
            while not self._queue.empty():
                self._queue.get_nowait()
        # A full queue needs no marker: the reader sees _ended once it has emptied it.
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    async def transitions(self) -> AsyncIterator[AlertTransition]:
        """The replay, then live transitions until the feed closes; raises WatcherFellBehind."""
        try:
            for transition in self.replay:
                yield transition
            while not (self._ended and self._queue.empty()):
                queued = await self._queue.get()
                if queued is None:
                    break
                yield queued
            if self._fell_behind:
                raise WatcherFellBehind(f"more than {MAX_QUEUED_TRANSITIONS} alert transitions behind; watch again")
        finally:
            self.close()

    def close(self) -> None:
        """Stop receiving transitions; safe to call more than once."""
        self._ended = True
        self._on_close(self)


class AlertFeed:
    """Fans alert transitions out to watchers; runs on one event loop."""

    def __init__(self) -> None:
        self._subscriptions: set[AlertSubscription] = set()
        self._closed = False

    def subscribe(self, firing: Iterable[Alert]) -> AlertSubscription:
        """A subscription replaying the given firing alerts first."""
        subscription = AlertSubscription(
            [AlertTransition(alert, replayed=True) for alert in firing], self._subscriptions.discard
        )
        if self._closed:
            subscription.end()
        else:
            self._subscriptions.add(subscription)
        return subscription

    def publish(self, transitions: Iterable[AlertTransition]) -> None:
        """Hand transitions to every watcher."""
        for transition in transitions:
            for subscription in list(self._subscriptions):
                subscription.push(transition)

    def close(self) -> None:
        """End every watch, e.g. when the monitor stops."""
        self._closed = True
        for subscription in list(self._subscriptions):
            subscription.end()

    def watcher_count(self) -> int:
        """How many watches are open."""
        return len(self._subscriptions)


class FleetAlerts:
    """Evaluates the rules against the fleet view and tells watchers what changed."""

    def __init__(
        self,
        fleet: FleetView,
        thresholds: AlertThresholds,
        *,
        window_seconds: float,
        evaluator: AlertEvaluator,
        feed: AlertFeed | None = None,
    ) -> None:
        self._fleet = fleet
        self._thresholds = thresholds
        self._window_seconds = window_seconds
        self.evaluator = evaluator
        self.feed = feed or AlertFeed()

    def evaluate(self) -> list[AlertTransition]:
        """Evaluate every rule now and publish the transitions."""
        observations = observe(
            self._fleet.performance(self._window_seconds), self._fleet.concurrency(), self._thresholds
        )
        transitions = self.evaluator.evaluate(observations)
        self.feed.publish(transitions)
        return transitions

    def watch(self) -> AlertSubscription:
        """Subscribe to transitions, replaying the alerts firing now."""
        # No await between reading the firing set and subscribing, so no transition falls in between.
        return self.feed.subscribe(self.evaluator.firing())
