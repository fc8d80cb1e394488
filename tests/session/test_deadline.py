"""The whole-discussion deadline: past its timeout a discussion ends TIMED_OUT, its calls cancelled, its slot free."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
from google.protobuf import duration_pb2

from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from services.simulator.app import RequestRecord
from tests.suite import Suite

MakeSuite = Callable[..., Awaitable[Suite]]
TIMED_OUT = session_pb2.DISCUSSION_STATUS_TIMED_OUT
# Only a few pieces of each answer arrive within a second: the partial text is there to keep.
SLOW_ANSWERS = {"first_token_latency_ms": 50, "tokens_per_second": 8}
# Not one token before the deadline.
SILENT_ANSWERS = {"first_token_latency_ms": 30_000}


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def records_of(suite: Suite, topic: str) -> list[RequestRecord]:
    return [r for r in suite.simulator.simulator.requests if r.topic == topic]


async def follow_to_end(
    stub: session_pb2_grpc.SessionServiceAsyncStub, discussion_id: str
) -> tuple[session_pb2.Discussion, list[session_pb2.DiscussionEvent]]:
    request = session_pb2.StreamDiscussionRequest(discussion_id=discussion_id)
    events = [event async for event in stub.StreamDiscussion(request, timeout=30)]
    doc = await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=discussion_id), timeout=10)
    return doc, events


async def test_a_discussion_past_its_timeout_ends_timed_out_its_calls_cancelled_its_slot_free(
    make_suite: MakeSuite,
) -> None:
    suite = await make_suite(simulator=SLOW_ANSWERS, session={"max_concurrent_sessions": 1, "max_queued_sessions": 0})
    stub = suite.session()
    started = time.monotonic()
    created = await stub.CreateDiscussion(
        session_pb2.CreateDiscussionRequest(
            topic="out of time", personas=["scientist", "economist", "moderator"], rounds=2, timeout=seconds(1)
        )
    )
    assert created.timeout == seconds(1)

    doc, events = await follow_to_end(stub, created.discussion_id)
    ended = time.monotonic() - started

    assert 1.0 <= ended < 2.0
    assert doc.status == TIMED_OUT
    assert doc.error == "timed out: the discussion's timeout of 1 s (from its creation) passed"
    last = events[-1].status_changed
    assert (last.status, last.error) == (TIMED_OUT, doc.error)
    # The partial answers are kept, marked cancelled.
    round_one = [r for r in doc.results if r.round == 1]
    assert sorted(r.agent for r in round_one) == ["科学家", "经济学家"]
    assert all(r.status == discussion_pb2.AGENT_STATUS_CANCELLED and r.text for r in round_one)
    # The agent service closed its LLM streams: the simulator saw both calls cancelled.
    async with asyncio.timeout(2):
        await suite.simulator.simulator.wait_for_record(
            lambda r: r.topic == "out of time" and r.client_disconnected and len(records_of(suite, r.topic)) == 2
        )
    calls = records_of(suite, "out of time")
    assert len(calls) == 2 and all(call.client_disconnected and call.finished for call in calls)
    # The only slot is free again: the next create runs at once instead of being refused.
    following = await stub.CreateDiscussion(session_pb2.CreateDiscussionRequest(topic="next", rounds=1))
    assert following.status == session_pb2.DISCUSSION_STATUS_RUNNING
    await stub.CancelDiscussion(session_pb2.CancelDiscussionRequest(discussion_id=following.discussion_id))


async def test_the_servers_timeout_holds_when_the_request_sets_none(make_suite: MakeSuite) -> None:
    suite = await make_suite(simulator=SILENT_ANSWERS, session={"discussion_timeout_seconds": 1})
    stub = suite.session()
    started = time.monotonic()
    created = await stub.CreateDiscussion(session_pb2.CreateDiscussionRequest(topic="server's clock", rounds=1))

    doc, _ = await follow_to_end(stub, created.discussion_id)

    assert time.monotonic() - started < 2.0
    assert (doc.status, doc.timeout) == (TIMED_OUT, seconds(1))
    assert doc.results and all(r.status == discussion_pb2.AGENT_STATUS_CANCELLED for r in doc.results)


async def test_without_a_timeout_a_discussion_runs_to_its_end(suite: Suite) -> None:
    stub = suite.session()
    created = await stub.CreateDiscussion(session_pb2.CreateDiscussionRequest(topic="no hurry", rounds=1))

    doc, _ = await follow_to_end(stub, created.discussion_id)

    assert doc.status == session_pb2.DISCUSSION_STATUS_COMPLETED
    assert not doc.HasField("timeout")


async def test_a_resumed_discussion_keeps_the_deadline_it_was_created_with(make_suite: MakeSuite) -> None:
    suite = await make_suite(simulator=SILENT_ANSWERS)
    stub = suite.session()
    created = await stub.CreateDiscussion(
        session_pb2.CreateDiscussionRequest(topic="across a restart", rounds=1, timeout=seconds(3))
    )
    async with asyncio.timeout(5):
        await suite.simulator.simulator.wait_for_record(lambda r: r.topic == "across a restart")

    # A graceful stop suspends it; the new process resumes it with the deadline it was created with.
    await suite.restart_session()
    doc, events = await follow_to_end(suite.session(), created.discussion_id)

    assert doc.status == TIMED_OUT
    ended_after_seconds = (events[-1].time.ToNanoseconds() - doc.created_at.ToNanoseconds()) / 1e9
    assert 3.0 <= ended_after_seconds < 4.5


async def test_a_discussion_whose_deadline_passes_in_the_queue_ends_timed_out_without_running(
    make_suite: MakeSuite,
) -> None:
    suite = await make_suite(
        simulator=SILENT_ANSWERS,
        session={"max_concurrent_sessions": 1, "max_queued_sessions": 1, "lease_ttl_seconds": 0.6},
    )
    stub = suite.session()
    holder = await stub.CreateDiscussion(session_pb2.CreateDiscussionRequest(topic="holds the slot", rounds=1))
    waiting = await stub.CreateDiscussion(
        session_pb2.CreateDiscussionRequest(topic="waits too long", rounds=1, timeout=seconds(1))
    )
    assert waiting.status == session_pb2.DISCUSSION_STATUS_QUEUED

    doc, _ = await follow_to_end(stub, waiting.discussion_id)

    assert doc.status == TIMED_OUT
    assert not doc.results
    assert records_of(suite, "waits too long") == []
    await stub.CancelDiscussion(session_pb2.CancelDiscussionRequest(discussion_id=holder.discussion_id))


@pytest.mark.parametrize("timeout_seconds", [-1, 0, 61])
async def test_a_timeout_out_of_range_is_refused(make_suite: MakeSuite, timeout_seconds: float) -> None:
    suite = await make_suite(session={"discussion_timeout_seconds": 60})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.session().CreateDiscussion(
            session_pb2.CreateDiscussionRequest(topic="bad clock", timeout=seconds(timeout_seconds))
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "timeout must be above 0 and at most 60 seconds" in (caught.value.details() or "")


async def test_without_a_server_timeout_a_request_may_ask_up_to_a_week(suite: Suite) -> None:
    stub = suite.session()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDiscussion(
            session_pb2.CreateDiscussionRequest(topic="too patient", timeout=seconds(7 * 86_400 + 1))
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    created = await stub.CreateDiscussion(
        session_pb2.CreateDiscussionRequest(topic="patient", rounds=1, timeout=seconds(7 * 86_400))
    )
    assert created.timeout == seconds(7 * 86_400)
    doc, _ = await follow_to_end(stub, created.discussion_id)
    assert doc.status == session_pb2.DISCUSSION_STATUS_COMPLETED
