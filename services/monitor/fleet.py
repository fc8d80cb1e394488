"""The fleet view: recent instance reports, turned into per-method performance and concurrency totals."""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from services.gen.roundtable.monitor.v1 import monitor_pb2

# (upper bound in seconds, cumulative count), sorted by bound; the last bound is +Inf.
Buckets = list[tuple[float, float]]


@dataclass(frozen=True)
class Snapshot:
    """One report as received, with the monitor's own receive times."""

    received_at: float
    received_wall_time: float
    report: monitor_pb2.InstanceReport


@dataclass(frozen=True)
class MethodPerformance:
    """One RPC method over a window, summed across the fleet; latencies are 0 without observations."""

    method: str
    requests: int
    errors: int
    requests_per_second: float
    error_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclass(frozen=True)
class PerformancePoint:
    """One method over one step, summed across the fleet; latencies are 0 without observations."""

    at_wall_time: float
    requests: int
    errors: int
    requests_per_second: float
    error_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclass(frozen=True)
class MethodHistory:
    """One method's points over a window, oldest first, one per step."""

    method: str
    points: tuple[PerformancePoint, ...]


@dataclass(frozen=True)
class InstanceConcurrency:
    """Load of one instance as of its latest report."""

    instance_id: str
    service: str
    active_sessions: int
    queued_sessions: int
    session_capacity: int
    live_agent_sets: int
    cpu_percent: float
    rss_bytes: int
    last_report_wall_time: float
    # session_capacity is the fleet-wide cap its replicas share (Redis admission), not this instance's own.
    session_capacity_shared: bool = False


@dataclass(frozen=True)
class ConcurrencyTotals:
    """Fleet-wide load totals and the per-instance rows they were summed from."""

    active_sessions: int = 0
    queued_sessions: int = 0
    session_capacity: int = 0
    live_agent_sets: int = 0
    instances: tuple[InstanceConcurrency, ...] = ()


@dataclass
class _MethodDelta:
    """What one method did on one instance within the window."""

    requests: int = 0
    errors: int = 0
    buckets: Buckets = field(default_factory=list)


def histogram_quantile(quantile: float, buckets: Sequence[tuple[float, float]]) -> float:
    """The quantile of cumulative buckets, interpolated linearly within a bucket as Prometheus does.

    Returns NaN when there are no observations or no +Inf bucket; a quantile landing in the
    +Inf bucket returns the highest finite bound.
    """
    if quantile < 0:
        return -math.inf
    if quantile > 1:
        return math.inf
    ordered = sorted(buckets)
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]):
        return math.nan
    # Counts read at different moments may dip; Prometheus flattens such dips the same way.
    monotonic: Buckets = []
    highest = 0.0
    for bound, count in ordered:
        highest = max(highest, count)
        monotonic.append((bound, highest))
    observations = monotonic[-1][1]
    if observations == 0:
        return math.nan
    rank = quantile * observations
    index = bisect.bisect_left([count for _, count in monotonic], rank)
    if index == len(monotonic) - 1:
        return monotonic[-2][0]
    if index == 0 and monotonic[0][0] <= 0:
        return monotonic[0][0]
    bucket_start, below = (0.0, 0.0) if index == 0 else monotonic[index - 1]
    bucket_end, count = monotonic[index]
    in_bucket = count - below
    if in_bucket == 0:
        return bucket_end
    return bucket_start + (bucket_end - bucket_start) * (rank - below) / in_bucket


def _buckets(counters: monitor_pb2.MethodCounters) -> Buckets:
    return sorted(zip(counters.bucket_upper_bounds_seconds, map(float, counters.bucket_counts), strict=False))


def _method_delta(newer: monitor_pb2.MethodCounters, older: monitor_pb2.MethodCounters | None) -> _MethodDelta:
    """Counter increase between two reports; a decrease means a restart, so the newer value is the delta."""
    new_buckets = _buckets(newer)
    if older is None:
        return _MethodDelta(newer.handled_total, newer.error_total, new_buckets)
    old_buckets = _buckets(older)
    reset = (
        newer.handled_total < older.handled_total
        or newer.error_total < older.error_total
        or [bound for bound, _ in new_buckets] != [bound for bound, _ in old_buckets]
        or any(new < old for (_, new), (_, old) in zip(new_buckets, old_buckets, strict=True))
    )
    if reset:
        return _MethodDelta(newer.handled_total, newer.error_total, new_buckets)
    return _MethodDelta(
        newer.handled_total - older.handled_total,
        newer.error_total - older.error_total,
        [(bound, new - old) for (bound, new), (_, old) in zip(new_buckets, old_buckets, strict=True)],
    )


def _cumulative_at(buckets: Buckets, bound: float) -> float:
    """Cumulative count at `bound` of a histogram that may not have that bound (its nearest lower one)."""
    index = bisect.bisect_right([upper for upper, _ in buckets], bound)
    return buckets[index - 1][1] if index else 0.0


def _sum_buckets(histograms: Iterable[Buckets]) -> Buckets:
    """Sum cumulative histograms; instances normally share bounds, but differing ones must not crash."""
    present = [histogram for histogram in histograms if histogram]
    bounds = sorted({bound for histogram in present for bound, _ in histogram})
    return [(bound, sum(_cumulative_at(histogram, bound) for histogram in present)) for bound in bounds]


def _seconds(timestamp_seconds: int, timestamp_nanos: int) -> float:
    return timestamp_seconds + timestamp_nanos / 1e9


def _started_seconds(report: monitor_pb2.InstanceReport) -> float | None:
    """The instance's start as seconds since the epoch (its own clock), or None when not reported."""
    if not report.HasField("started_at"):
        return None
    return _seconds(report.started_at.seconds, report.started_at.nanos)


def _uptime_at_report(report: monitor_pb2.InstanceReport) -> float | None:
    """Seconds between start and report, both on the instance's clock, so clock skew cancels out."""
    started = _started_seconds(report)
    if started is None or not report.HasField("reported_at"):
        return None
    return max(_seconds(report.reported_at.seconds, report.reported_at.nanos) - started, 0.0)


def _window_deltas(
    history: Sequence[Snapshot], now: float, window_seconds: float
) -> tuple[dict[str, _MethodDelta], float] | None:
    """Per-method deltas of one instance over the window and the seconds they cover; None to skip it."""
    newest = history[-1]
    cutoff = now - window_seconds
    base: Snapshot | None = None
    for snapshot in reversed(history[:-1]):
        if snapshot.received_at <= cutoff:
            base = snapshot
            break
    if base is None:
        uptime = _uptime_at_report(newest.report)
        if uptime is not None and uptime + (now - newest.received_at) <= window_seconds:
            # Started inside the window: everything it ever counted happened in the window.
            deltas = {counters.method: _method_delta(counters, None) for counters in newest.report.methods}
            return deltas, uptime
        if len(history) < 2:
            return None
        base = history[0]
    restarted = _started_seconds(base.report) != _started_seconds(newest.report)
    older = {} if restarted else {counters.method: counters for counters in base.report.methods}
    deltas = {
        counters.method: _method_delta(counters, older.get(counters.method)) for counters in newest.report.methods
    }
    return deltas, newest.received_at - base.received_at


def _step_deltas(history: Sequence[Snapshot], bounds: Sequence[float]) -> list[dict[str, _MethodDelta] | None]:
    """Per-method deltas of one instance in each step between consecutive bounds; None where unknown."""
    received = [snapshot.received_at for snapshot in history]
    at_bounds: list[Snapshot | None] = []
    for bound in bounds:
        index = bisect.bisect_right(received, bound) - 1
        at_bounds.append(history[index] if index >= 0 else None)
    steps: list[dict[str, _MethodDelta] | None] = []
    for step_start, older, newer in zip(bounds, at_bounds, at_bounds[1:], strict=False):
        if newer is None:
            steps.append(None)
            continue
        if older is newer:
            # No report landed in this step: its traffic shows up in the step of the next report.
            steps.append({})
            continue
        if older is None:
            uptime = _uptime_at_report(newer.report)
            if uptime is None or newer.received_at - uptime < step_start:
                # It ran before its first report here: where its counters started is unknown.
                steps.append(None)
                continue
            older_methods: dict[str, monitor_pb2.MethodCounters] = {}
        elif _started_seconds(older.report) != _started_seconds(newer.report):
            older_methods = {}
        else:
            older_methods = {counters.method: counters for counters in older.report.methods}
        steps.append(
            {
                counters.method: _method_delta(counters, older_methods.get(counters.method))
                for counters in newer.report.methods
            }
        )
    return steps


class FleetView:
    """Recent reports per instance; instances silent for stale_after_seconds are forgotten."""

    def __init__(
        self,
        *,
        stale_after_seconds: float,
        history_per_instance: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._stale_after_seconds = stale_after_seconds
        self._history_per_instance = history_per_instance
        self._clock = clock
        self._wall_clock = wall_clock
        self._history: dict[str, deque[Snapshot]] = {}
        # The /metrics collector reads from the HTTP server's thread while gRPC writes on the loop.
        self._lock = threading.Lock()

    def record(self, report: monitor_pb2.InstanceReport) -> None:
        """Keep a report as the newest snapshot of its instance."""
        with self._lock:
            now = self._clock()
            self._drop_stale(now)
            history = self._history.get(report.instance_id)
            if history is None:
                history = self._history[report.instance_id] = deque(maxlen=self._history_per_instance)
            history.append(Snapshot(now, self._wall_clock(), report))

    def instance_count(self) -> int:
        """How many instances are currently in the fleet view."""
        with self._lock:
            self._drop_stale(self._clock())
            return len(self._history)

    def performance(self, window_seconds: float) -> list[MethodPerformance]:
        """Per-method traffic, errors and latency percentiles over the last window; idle methods are left out."""
        with self._lock:
            now = self._clock()
            self._drop_stale(now)
            requests: dict[str, int] = {}
            errors: dict[str, int] = {}
            rates: dict[str, float] = {}
            histograms: dict[str, list[Buckets]] = {}
            for history in self._history.values():
                window = _window_deltas(list(history), now, window_seconds)
                if window is None:
                    continue
                deltas, covered_seconds = window
                for method, delta in deltas.items():
                    requests[method] = requests.get(method, 0) + delta.requests
                    errors[method] = errors.get(method, 0) + delta.errors
                    # Summing per-instance rates keeps a just-started instance from diluting the total.
                    rates[method] = rates.get(method, 0.0) + delta.requests / max(covered_seconds, 1.0)
                    histograms.setdefault(method, []).append(delta.buckets)
        summaries = []
        for method in sorted(requests):
            if requests[method] == 0:
                continue
            buckets = _sum_buckets(histograms[method])
            summaries.append(
                MethodPerformance(
                    method=method,
                    requests=requests[method],
                    errors=errors[method],
                    requests_per_second=rates[method],
                    error_rate=min(errors[method] / requests[method], 1.0),
                    p50_ms=_quantile_ms(0.50, buckets),
                    p95_ms=_quantile_ms(0.95, buckets),
                    p99_ms=_quantile_ms(0.99, buckets),
                )
            )
        return summaries

    def history(self, window_seconds: float, step_seconds: float) -> list[MethodHistory]:
        """Per-method points, one per step, over the last window; methods idle throughout are left out."""
        step_count = max(1, math.ceil(window_seconds / step_seconds))
        with self._lock:
            now = self._clock()
            wall_now = self._wall_clock()
            self._drop_stale(now)
            bounds = [now - (step_count - index) * step_seconds for index in range(step_count + 1)]
            requests: dict[str, list[int]] = {}
            errors: dict[str, list[int]] = {}
            histograms: dict[str, list[list[Buckets]]] = {}
            for history in self._history.values():
                for step, deltas in enumerate(_step_deltas(list(history), bounds)):
                    for method, delta in (deltas or {}).items():
                        if method not in requests:
                            requests[method] = [0] * step_count
                            errors[method] = [0] * step_count
                            histograms[method] = [[] for _ in range(step_count)]
                        requests[method][step] += delta.requests
                        errors[method][step] += delta.errors
                        histograms[method][step].append(delta.buckets)
        result = []
        for method in sorted(requests):
            if not any(requests[method]):
                continue
            points = []
            for step in range(step_count):
                buckets = _sum_buckets(histograms[method][step])
                count = requests[method][step]
                points.append(
                    PerformancePoint(
                        at_wall_time=wall_now - (now - bounds[step + 1]),
                        requests=count,
                        errors=errors[method][step],
                        requests_per_second=count / step_seconds,
                        error_rate=min(errors[method][step] / count, 1.0) if count else 0.0,
                        p50_ms=_quantile_ms(0.50, buckets),
                        p95_ms=_quantile_ms(0.95, buckets),
                        p99_ms=_quantile_ms(0.99, buckets),
                    )
                )
            result.append(MethodHistory(method=method, points=tuple(points)))
        return result

    def concurrency(self) -> ConcurrencyTotals:
        """Load totals across the fleet and per instance, from each instance's latest report."""
        with self._lock:
            self._drop_stale(self._clock())
            latest = [self._history[instance_id][-1] for instance_id in sorted(self._history)]
        rows = tuple(
            InstanceConcurrency(
                instance_id=snapshot.report.instance_id,
                service=snapshot.report.service,
                active_sessions=snapshot.report.active_sessions,
                queued_sessions=snapshot.report.queued_sessions,
                session_capacity=snapshot.report.session_capacity,
                live_agent_sets=snapshot.report.live_agent_sets,
                cpu_percent=snapshot.report.cpu_percent,
                rss_bytes=snapshot.report.rss_bytes,
                last_report_wall_time=snapshot.received_wall_time,
                session_capacity_shared=snapshot.report.session_capacity_shared,
            )
            for snapshot in latest
        )
        # Each replica reports what it runs itself, so load adds up; a shared cap is the fleet's once.
        own_capacity = sum(row.session_capacity for row in rows if not row.session_capacity_shared)
        shared_capacity = max((row.session_capacity for row in rows if row.session_capacity_shared), default=0)
        return ConcurrencyTotals(
            active_sessions=sum(row.active_sessions for row in rows),
            queued_sessions=sum(row.queued_sessions for row in rows),
            session_capacity=own_capacity + shared_capacity,
            live_agent_sets=sum(row.live_agent_sets for row in rows),
            instances=rows,
        )

    def _drop_stale(self, now: float) -> None:
        cutoff = now - self._stale_after_seconds
        stale = [key for key, history in self._history.items() if history[-1].received_at < cutoff]
        for instance_id in stale:
            del self._history[instance_id]


def _quantile_ms(quantile: float, buckets: Buckets) -> float:
    value = histogram_quantile(quantile, buckets)
    return 0.0 if math.isnan(value) else value * 1000.0
