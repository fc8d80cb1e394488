"""The whole suite reporting to the monitor: its summary agrees with what a client measured itself."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import pytest

from services.gen.roundtable.monitor.v1 import monitor_pb2
from services.gen.roundtable.session.v1 import session_pb2
from services.monitor.fleet import histogram_quantile
from services.session.servicer import SessionServicer
from services.shared.errors import Unavailable
from services.shared.metrics import SERVER_HANDLING_SECONDS
from tests.suite import Suite, run_to_end

GET_DISCUSSION = "/roundtable.session.v1.SessionService/GetDiscussion"
BOUNDS: Sequence[float] = SERVER_HANDLING_SECONDS._upper_bounds
VALID_CALLS = 60
MALFORMED_CALLS = 20  # refused INVALID_ARGUMENT: the caller's mistake, not an error of the service
FAULTY_CALLS = 10  # UNAVAILABLE: a server fault, what the error rate counts
FAULTY_ID = "f" * 32  # GetDiscussion fails UNAVAILABLE for this id, as when its store is down
REPORT_INTERVAL_SECONDS = 0.1
# Injected server-side latencies, spread over several buckets and well above the ~1 ms of scheduling noise that
# servers, reporters and this client sharing one event loop add to what the client measures.
INJECTED_SECONDS = (0.003, 0.008, 0.02, 0.04, 0.07)
# Quiet before the measured calls, longer than the slack the window is given, so its base report saw none of them.
QUIET_SECONDS = 2.0


def bucket_index(seconds: float) -> int:
    """Index of the histogram bucket a latency falls in."""
    return bisect.bisect_left(BOUNDS, seconds)


def quantile_of(latencies: Sequence[float], quantile: float) -> float:
    """The quantile Prometheus would compute had these latencies been observed into the server histogram."""
    cumulative = [(bound, float(sum(latency <= bound for latency in latencies))) for bound in BOUNDS]
    return histogram_quantile(quantile, cumulative)


def inject_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every GetDiscussion take the next of INJECTED_SECONDS longer, and FAULTY_ID's fail UNAVAILABLE."""
    original = SessionServicer.GetDiscussion
    schedule = itertools.cycle(INJECTED_SECONDS)

    async def slowed(self: SessionServicer, request: Any, context: Any) -> Any:
        await asyncio.sleep(next(schedule))
        if request.discussion_id == FAULTY_ID:
            raise Unavailable("the store does not answer")
        return await original(self, request, context)

    monkeypatch.setattr(SessionServicer, "GetDiscussion", slowed)


async def test_summary_p99_and_error_rate_match_what_the_client_measured(
    make_suite: Callable[..., Awaitable[Suite]], monkeypatch: pytest.MonkeyPatch
) -> None:
    inject_latency(monkeypatch)
    fast_reports = {"report_interval_seconds": REPORT_INTERVAL_SECONDS}
    suite = await make_suite(session=fast_reports, agents=fast_reports)
    session = suite.session()
    monitor = suite.monitor()
    document, _ = await run_to_end(
        session, session_pb2.CreateDiscussionRequest(topic="Is latency a feature?", personas=["scientist"], rounds=1)
    )
    await asyncio.sleep(QUIET_SECONDS)

    started = time.monotonic()
    latencies: list[float] = []
    failures: list[grpc.StatusCode] = []
    for index in range(VALID_CALLS + MALFORMED_CALLS + FAULTY_CALLS):
        discussion_id = document.discussion_id
        if index % 9 == 8:  # every ninth call meets a fault
            discussion_id = FAULTY_ID
        elif index % 9 in (2, 5):  # two in nine name no valid id
            discussion_id = "not-a-discussion-id"
        before = time.perf_counter()
        try:
            await session.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=discussion_id), timeout=10)
        except grpc.aio.AioRpcError as error:
            failures.append(error.code())
        latencies.append(time.perf_counter() - before)
    assert failures.count(grpc.StatusCode.INVALID_ARGUMENT) == MALFORMED_CALLS
    assert failures.count(grpc.StatusCode.UNAVAILABLE) == FAULTY_CALLS
    all_calls = VALID_CALLS + MALFORMED_CALLS + FAULTY_CALLS

    # The window reaches back into the quiet time and no further than its start.
    deadline = time.monotonic() + 15
    while True:
        window_seconds = math.ceil(time.monotonic() - started + 0.5)
        summary = await monitor.GetPerformanceSummary(
            monitor_pb2.GetPerformanceSummaryRequest(window_seconds=window_seconds)
        )
        rows = {row.method: row for row in summary.methods}
        row = rows.get(GET_DISCUSSION)
        if row is not None and row.requests == all_calls:
            break
        assert time.monotonic() < deadline, f"the monitor never saw all calls: {row}"
        await asyncio.sleep(REPORT_INTERVAL_SECONDS)

    # Server faults only: the refused calls are not errors of the service (SERVER_FAULT_CODES).
    assert row.errors == FAULTY_CALLS
    assert row.error_rate == FAULTY_CALLS / all_calls
    # Spread as injected, the quantiles fall in different buckets: the comparison below can tell them apart.
    assert bucket_index(quantile_of(latencies, 0.5)) < bucket_index(quantile_of(latencies, 0.99))
    # The server's clock stops before the response crosses the channel, so it may read up to one bucket lower.
    for quantile, reported_ms in ((0.99, row.p99_ms), (0.5, row.p50_ms)):
        measured = quantile_of(latencies, quantile)
        reported = reported_ms / 1000
        assert bucket_index(measured) - 1 <= bucket_index(reported) <= bucket_index(measured), (
            f"p{quantile * 100:.0f}: monitor says {reported * 1000:.2f} ms, client measured {measured * 1000:.2f} ms"
        )
    assert row.requests_per_second > 0
