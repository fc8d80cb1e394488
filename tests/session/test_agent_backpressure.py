"""Calls to the agent service: bounded in number, and re-issued when gRPC core drops one unseen.

A real gRPC proxy sits between the session and agent services and watches the RunDiscussion calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from services.gen.roundtable.agents.v1 import agents_pb2, agents_pb2_grpc
from services.gen.roundtable.session.v1 import session_pb2
from tests.session.agent_proxy import ForwardingAgentService, serve
from tests.suite import Suite

MakeSuite = Callable[..., Awaitable[Suite]]


class WatchingProxy(ForwardingAgentService):
    """Forwards to the real agent service; counts open RunDiscussion calls; can drop first calls."""

    def __init__(self, upstream: agents_pb2_grpc.AgentServiceAsyncStub, *, drop_first_call: bool = False) -> None:
        super().__init__(upstream)
        self._drop_first_call = drop_first_call
        self.seen: dict[str, int] = {}
        self.open_calls = 0
        self.most_open_calls = 0

    async def RunDiscussion(
        self, request: agents_pb2.RunDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agents_pb2.AgentEvent]:
        self.seen[request.session_id] = self.seen.get(request.session_id, 0) + 1
        if self._drop_first_call and self.seen[request.session_id] == 1:
            # What gRPC core does to a call the server's loop did not pick up in time.
            await context.abort(grpc.StatusCode.CANCELLED, "Cancelled")
        self.open_calls += 1
        self.most_open_calls = max(self.most_open_calls, self.open_calls)
        try:
            async for event in self._upstream.RunDiscussion(request):
                yield event
        finally:
            self.open_calls -= 1


BehindProxy = Callable[..., Awaitable[tuple[Suite, WatchingProxy]]]


@pytest.fixture
async def behind_proxy(make_suite: MakeSuite) -> AsyncIterator[BehindProxy]:
    """A suite whose session service reaches the agent service through a WatchingProxy."""
    servers: list[grpc.aio.Server] = []

    async def start(session: dict[str, object], **proxy: bool) -> tuple[Suite, WatchingProxy]:
        suite = await make_suite(simulator={"first_token_latency_ms": 150})
        watcher = WatchingProxy(suite.agents(), **proxy)
        server, address = await serve(watcher)
        servers.append(server)
        # The proxy watches RunDiscussion calls: the per-call transport (lanes are tests/session/test_lanes.py's).
        await suite.restart_session(agents_address=address, agents_transport="calls", **session)
        return suite, watcher

    yield start
    for server in servers:
        await server.stop(0)


async def _run_all(suite: Suite, count: int, topic: str) -> list[session_pb2.Discussion]:
    stub = suite.session()
    created = await asyncio.gather(
        *(
            stub.CreateDiscussion(
                session_pb2.CreateDiscussionRequest(topic=f"{topic} {i}", personas=["scientist"], rounds=1)
            )
            for i in range(count)
        )
    )
    finals = []
    for discussion in created:
        async for _ in stub.StreamDiscussion(
            session_pb2.StreamDiscussionRequest(discussion_id=discussion.discussion_id), timeout=60
        ):
            pass
        finals.append(
            await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=discussion.discussion_id))
        )
    return finals


async def test_no_more_agent_calls_are_open_than_the_cap_and_the_rest_wait_then_complete(
    behind_proxy: BehindProxy,
) -> None:
    suite, watcher = await behind_proxy({"max_concurrent_agent_runs": 3})
    finals = await _run_all(suite, 24, "capped")
    assert [f.status for f in finals] == [session_pb2.DISCUSSION_STATUS_COMPLETED] * 24, [f.error for f in finals]
    assert watcher.most_open_calls == 3  # reached, never passed
    assert sorted(watcher.seen.values()) == [1] * 24


async def test_a_call_dropped_before_its_first_event_is_issued_again(behind_proxy: BehindProxy) -> None:
    suite, watcher = await behind_proxy({}, drop_first_call=True)
    finals = await _run_all(suite, 10, "dropped")
    assert [f.status for f in finals] == [session_pb2.DISCUSSION_STATUS_COMPLETED] * 10, [f.error for f in finals]
    assert sorted(watcher.seen.values()) == [2] * 10
    # Each ran once: one answer and one summary, no event recorded twice.
    for final in finals:
        assert [(r.agent, r.round) for r in final.results] == [("科学家", 1), ("主持人", 2)]
