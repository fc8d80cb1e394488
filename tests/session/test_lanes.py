"""Many discussions per agent stream (lanes), against the real agent service and simulator.

Isolated and ordered with 200 discussions on one lane; a lane broken mid-round re-runs only its own
discussions' round; a cancel on a lane stops only its discussion; a discussion whose events are not
consumed holds back only its own run, with no more than its window buffered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.agents.metrics import AGENT_LANES_OPEN
from services.gen.roundtable.agents.v1 import agents_pb2, agents_pb2_grpc
from services.gen.roundtable.session.v1 import session_pb2
from services.session.agents_client import agents_channel
from services.session.agents_lanes import LaneAgentsClient
from services.shared.logs import SessionContextFilter, session_context
from tests.session.agent_proxy import ForwardingAgentService, serve
from tests.suite import Suite, run_to_end
from tests.test_isolation import check_concurrent_discussions_stay_isolated

MakeSuite = Callable[..., Awaitable[Suite]]
Create = session_pb2.CreateDiscussionRequest
# Below the ~24 events of a 3-round run here, so the stalled run fills its window and must wait.
WINDOW = 8


async def test_two_hundred_discussions_over_one_lane_stay_isolated_and_ordered(make_suite: MakeSuite) -> None:
    suite = await make_suite(session={"agent_lanes": 1})
    await check_concurrent_discussions_stay_isolated(suite)


class LaneCuttingProxy(ForwardingAgentService):
    """Forwards to the real agent service; records each lane's runs; can cut a lane as a lost replica would."""

    def __init__(self, upstream: agents_pb2_grpc.AgentServiceAsyncStub) -> None:
        super().__init__(upstream)
        self.runs: list[tuple[str, str, int]] = []  # (lane key, session id, start round)
        self._cuts: dict[str, asyncio.Event] = {}

    async def RunLane(
        self, requests: AsyncIterator[agents_pb2.RunLaneRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agents_pb2.RunLaneResponse]:
        key = str(dict(context.invocation_metadata() or ())["x-session-id"])
        cut = self._cuts[key] = asyncio.Event()
        upstream = self._upstream.RunLane(metadata=(("x-session-id", key),))

        async def forward_requests() -> None:
            async for request in requests:
                if request.WhichOneof("request") == "run":
                    run = request.run.request
                    self.runs.append((key, run.session_id, run.start_round))
                await upstream.write(request)
            await upstream.done_writing()

        forwarding = asyncio.create_task(forward_requests())
        responses = upstream.__aiter__()
        try:
            while True:
                response = asyncio.ensure_future(anext(responses))
                cutting = asyncio.ensure_future(cut.wait())
                await asyncio.wait({response, cutting}, return_when=asyncio.FIRST_COMPLETED)
                cutting.cancel()
                if cut.is_set():
                    response.cancel()
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "lane cut by the test's proxy")
                try:
                    yield response.result()
                except StopAsyncIteration:
                    return
        finally:
            forwarding.cancel()
            upstream.cancel()

    def lanes(self) -> set[str]:
        """The lane keys seen so far."""
        return {key for key, _, _ in self.runs}

    def cut(self, key: str) -> None:
        """Break the lane now: its stream ends with an error on the session side."""
        self._cuts[key].set()


async def test_a_broken_lane_re_runs_only_its_own_discussions_round(make_suite: MakeSuite) -> None:
    suite = await make_suite(simulator={"first_token_latency_ms": 1500})
    proxy = LaneCuttingProxy(suite.agents())
    server, address = await serve(proxy)
    try:
        await suite.restart_session(agents_address=address, agent_lanes=2)
        stub = suite.session()
        created = []
        for index in range(40):  # until both lanes carry discussions (ids spread over the lanes)
            created.append(await stub.CreateDiscussion(Create(topic=f"lane topic {index}", personas=["engineer"])))
            await asyncio.sleep(0.01)
            if len(created) >= 6 and len(proxy.lanes()) == 2:
                break
        async with asyncio.timeout(5):
            while len(proxy.runs) < len(created):  # noqa: ASYNC110 - polling the proxy
                await asyncio.sleep(0.01)
        lanes = sorted(proxy.lanes())
        assert len(lanes) == 2
        cut_lane = lanes[0]
        on_cut_lane = {session for key, session, _ in proxy.runs if key == cut_lane}
        proxy.cut(cut_lane)  # mid round 1: every first answer is still 1.5 s from its first token

        for doc in created:
            async for _ in stub.StreamDiscussion(
                session_pb2.StreamDiscussionRequest(discussion_id=doc.discussion_id), timeout=60
            ):
                pass
            final = await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=doc.discussion_id))
            assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED, final.error

        runs_per_session = Counter(session for _, session, _ in proxy.runs)
        for session, runs in runs_per_session.items():
            assert runs == (2 if session in on_cut_lane else 1), (session, runs)
        # The re-run started again at the interrupted round (1), not after it.
        assert {start for _, session, start in proxy.runs if session in on_cut_lane} == {1}
    finally:
        await server.stop(0)


async def test_a_cancel_on_a_lane_stops_only_its_discussion(make_suite: MakeSuite) -> None:
    suite = await make_suite(
        session={"agent_lanes": 1}, simulator={"first_token_latency_ms": 300, "tokens_per_second": 40}
    )
    stub = suite.session()
    cancelled = await stub.CreateDiscussion(Create(topic="stopped early", personas=["engineer"]))
    kept_task = asyncio.create_task(run_to_end(stub, Create(topic="goes on", personas=["engineer"])))
    sim = suite.simulator.simulator
    async with asyncio.timeout(10):
        await sim.wait_for_record(lambda r: r.topic == "stopped early" and r.pieces_sent > 0)
        await sim.wait_for_record(lambda r: r.topic == "goes on" and r.pieces_sent > 0)
    stopped = await stub.CancelDiscussion(
        session_pb2.CancelDiscussionRequest(discussion_id=cancelled.discussion_id), timeout=5
    )
    assert stopped.status == session_pb2.DISCUSSION_STATUS_CANCELLED
    # Its LLM call is closed at once; the other discussion's goes on, to a complete answer.
    async with asyncio.timeout(5):
        await sim.wait_for_record(lambda r: r.topic == "stopped early" and r.finished_at is not None)
    final, events = await kept_task
    assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED, final.error
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert len([r for r in sim.requests if r.topic == "stopped early"]) == 1


def lane_client(suite: Suite, **options: Any) -> LaneAgentsClient:
    """A lanes client of its own (one lane) to the suite's agent service."""
    settings = suite.session_host.settings
    channel = agents_channel(suite.agents_host.address, settings, max_message_bytes=4 * 2**20)
    defaults: dict[str, Any] = {
        "call_timeout_seconds": 60,
        "max_concurrent_runs": 10,
        "lane_count": 1,
        "lane_key_prefix": "test",
        "lane_max_age_seconds": 600,
    }
    return LaneAgentsClient(channel, **{**defaults, **options})


def discussion(session_id: str, topic: str) -> session_pb2.Discussion:
    """A discussion document as the runner hands it to the agents port."""
    return session_pb2.Discussion(discussion_id=session_id, topic=topic, personas=["engineer"], rounds=3)


async def test_a_discussion_whose_events_are_not_taken_holds_back_only_its_own_run(make_suite: MakeSuite) -> None:
    suite = await make_suite()
    client = lane_client(suite, window_events=WINDOW)
    try:
        stalled = client.run(discussion("a" * 32, "never read"), "someone")
        first_batch = await anext(stalled)  # its run is open on the lane; nobody reads it further
        started = time.monotonic()
        taken: dict[str, int] = defaultdict(int)
        async for batch in client.run(discussion("b" * 32, "read to the end"), "someone"):
            for kind, _ in batch:
                taken[kind] += 1
        assert taken["round_completed"] == 3
        assert time.monotonic() - started < 30
        # What waits for the stalled discussion is bounded by its window, not by its answers' length.
        lane = client._lanes[0]
        stream = lane.live_stream()
        assert stream is not None
        waiting = stream._runs["a" * 32].events
        # asyncio.Queue's buffer (private, so not in typeshed): read without taking from it.
        queued: deque[list[agents_pb2.LaneEvent]] = waiting._queue  # type: ignore[attr-defined]
        buffered = sum(len(batch) for batch in list(queued))
        # It filled its window (the first batch taken, the rest here), then its run waited for credit.
        assert len(first_batch) + buffered == WINDOW
        # Read again, it gets credit back and ends like any other.
        rounds = 0
        async with asyncio.timeout(30):
            async for batch in stalled:
                rounds += sum(kind == "round_completed" for kind, _ in batch)
        assert rounds == 3
    finally:
        await client.close()


async def test_a_lane_past_its_age_is_replaced_and_the_old_one_closes_when_its_runs_end(make_suite: MakeSuite) -> None:
    suite = await make_suite()
    channel = agents_channel(suite.agents_host.address, suite.session_host.settings, max_message_bytes=4 * 2**20)
    client = LaneAgentsClient(
        channel,
        call_timeout_seconds=60,
        max_concurrent_runs=10,
        lane_count=1,
        lane_key_prefix="age",
        lane_max_age_seconds=0.3,
    )
    lane = client._lanes[0]
    try:
        lanes_before = AGENT_LANES_OPEN._value.get()  # other suites of this process may hold lanes too
        first = client.run(discussion("c" * 32, "on the old lane"), "someone")
        await anext(first)
        old = lane.live_stream()
        await asyncio.sleep(0.4)
        # A run after the lane's age goes on a fresh stream; the old one still carries its run.
        kinds = [
            kind async for batch in client.run(discussion("d" * 32, "on the new lane"), "someone") for kind, _ in batch
        ]
        assert kinds.count("round_completed") == 3
        assert lane.live_stream() is not old and old is not None and not old.broken
        assert [kind async for batch in first for kind, _ in batch].count("round_completed") == 3
        # Its last run over, the old stream closes: the agent service holds one lane again.
        async with asyncio.timeout(5):
            while AGENT_LANES_OPEN._value.get() != lanes_before + 1:  # noqa: ASYNC110 - polling the agent's gauge
                await asyncio.sleep(0.02)
        assert old.broken
    finally:
        await client.close()


class Recording(logging.Handler):
    """Keeps every record it is handed (after its filters stamped them)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep it."""
        self.records.append(record)


async def test_a_lane_logs_in_no_discussions_name(make_suite: MakeSuite) -> None:
    suite = await make_suite()
    client = lane_client(suite)
    handler = Recording()
    handler.addFilter(SessionContextFilter())
    records = handler.records
    lanes_logger = logging.getLogger("services.session.agents_lanes")
    lanes_logger.addHandler(handler)
    try:
        with session_context("e" * 32):  # the first run opens the lane inside its own session's context
            first = client.run(discussion("e" * 32, "opens the lane"), "someone")
            await anext(first)
        await suite.agents_host.stop(grace_seconds=0)  # the lane breaks; its reader says so
        async with asyncio.timeout(10):
            while not [r for r in records if "lane to the agent service lost" in r.getMessage()]:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        lost = next(r for r in records if "lane to the agent service lost" in r.getMessage())
        # Written to no session's log file: the lane carries many discussions, it is none of theirs.
        assert lost.session_id == ""  # type: ignore[attr-defined]
    finally:
        lanes_logger.removeHandler(handler)
        await client.close()
