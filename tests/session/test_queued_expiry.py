"""A queued discussion whose ttl passes leaves the queue with its record: its place is free, and it never runs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest
from google.protobuf import duration_pb2

from services.gen.roundtable.session.v1 import session_pb2
from services.session.auth import ANONYMOUS
from tests.suite import Suite

MakeSuite = Callable[..., Awaitable[Suite]]
Create = session_pb2.CreateDiscussionRequest


async def test_a_queued_discussion_that_expires_leaves_the_queue_and_never_runs(make_suite: MakeSuite) -> None:
    suite = await make_suite(
        session={"max_concurrent_sessions": 1, "max_queued_sessions": 1, "cleanup_interval_seconds": 0.1},
        simulator={"first_token_latency_ms": 2500},
    )
    stub = suite.session()
    running = await stub.CreateDiscussion(Create(topic="holds the slot", personas=["engineer"]), timeout=5)
    queued = await stub.CreateDiscussion(
        Create(topic="waits too long", personas=["engineer"], ttl=duration_pb2.Duration(seconds=1)), timeout=5
    )
    assert queued.status == session_pb2.DISCUSSION_STATUS_QUEUED
    get_queued = session_pb2.GetDiscussionRequest(discussion_id=queued.discussion_id)

    # Left alone (a read would count as access and keep it): the sweep finds it past its ttl.
    store_id = suite.session_service.store_id(ANONYMOUS, queued.discussion_id)
    async with asyncio.timeout(10):
        while await suite.session_service.store.get(store_id) is not None:  # noqa: ASYNC110 - polling the store
            await asyncio.sleep(0.1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDiscussion(get_queued, timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    # Its queue place is free again: another create queues instead of being refused.
    admission = suite.session_service.admission
    assert (admission.active(), admission.queued()) == (1, 0)
    replacement = await stub.CreateDiscussion(Create(topic="takes the place", personas=["engineer"]), timeout=5)
    assert replacement.status == session_pb2.DISCUSSION_STATUS_QUEUED

    # When the slot frees, the replacement runs; the expired one never reaches the agents.
    await stub.CancelDiscussion(session_pb2.CancelDiscussionRequest(discussion_id=running.discussion_id), timeout=5)
    async for _ in stub.StreamDiscussion(
        session_pb2.StreamDiscussionRequest(discussion_id=replacement.discussion_id), timeout=30
    ):
        pass
    done = await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=replacement.discussion_id))
    assert done.status == session_pb2.DISCUSSION_STATUS_COMPLETED
    assert not [r for r in suite.simulator.simulator.requests if r.topic == "waits too long"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDiscussion(get_queued, timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_queued_discussion_removed_elsewhere_is_not_run_when_its_turn_comes(make_suite: MakeSuite) -> None:
    suite = await make_suite(
        session={"max_concurrent_sessions": 1, "max_queued_sessions": 1}, simulator={"first_token_latency_ms": 2500}
    )
    stub = suite.session()
    running = await stub.CreateDiscussion(Create(topic="holds the slot", personas=["engineer"]), timeout=5)
    queued = await stub.CreateDiscussion(Create(topic="removed while waiting", personas=["engineer"]), timeout=5)
    assert queued.status == session_pb2.DISCUSSION_STATUS_QUEUED
    # As another replica's sweep or delete would (a shared store): the record goes, this runner is not told.
    service = suite.session_service
    assert await service.store.delete(service.store_id(ANONYMOUS, queued.discussion_id))

    await stub.CancelDiscussion(session_pb2.CancelDiscussionRequest(discussion_id=running.discussion_id), timeout=5)

    async with asyncio.timeout(10):
        while service.admission.active() or service.admission.queued():  # noqa: ASYNC110 - polling state
            await asyncio.sleep(0.05)
    assert service.discussions.running_count() == 0
    assert not [r for r in suite.simulator.simulator.requests if r.topic == "removed while waiting"]
