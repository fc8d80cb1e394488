"""Cancelling through a replica that does not hold the discussion: its owner ends it (Redis, two replicas)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import grpc
import pytest

from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from services.session.auth import ANONYMOUS
from services.session.discussions import CANCEL_ELSEWHERE_TIMEOUT_SECONDS
from services.session.ids import IdScope
from tests.redis_server import redis_server, redis_url  # noqa: F401  (fixtures)
from tests.session.test_delete_elsewhere import one_slot_suite_on_redis, second_replica
from tests.session.test_store_contract import make_discussion
from tests.suite import Suite

MakeSuite = Callable[..., Awaitable[Suite]]
CANCELLED = session_pb2.DISCUSSION_STATUS_CANCELLED


async def test_a_queued_and_a_running_discussion_cancelled_elsewhere_end_cancelled_and_free_their_places(
    make_suite: MakeSuite,
    redis_url: str,  # noqa: F811
) -> None:
    suite = await one_slot_suite_on_redis(make_suite, redis_url, max_queued_sessions=1)
    other_host = await second_replica(suite)
    try:
        async with grpc.aio.insecure_channel(other_host.address) as channel:
            owner, other = suite.session(), session_pb2_grpc.SessionServiceStub(channel)
            create = session_pb2.CreateDiscussionRequest
            cancel = session_pb2.CancelDiscussionRequest
            running = await owner.CreateDiscussion(create(topic="runs", personas=["engineer"]), timeout=5)
            queued = await owner.CreateDiscussion(create(topic="waits", personas=["engineer"]), timeout=5)
            assert (running.status, queued.status) == (
                session_pb2.DISCUSSION_STATUS_RUNNING,
                session_pb2.DISCUSSION_STATUS_QUEUED,
            )

            # Queued on the owner: it leaves the owner's queue CANCELLED, without ever running.
            started = time.monotonic()
            left_queue = await other.CancelDiscussion(cancel(discussion_id=queued.discussion_id), timeout=10)
            assert left_queue.status == CANCELLED
            assert not any(result.text for result in left_queue.results)
            # Running on the owner: stopped there, partial results kept, CANCELLED with the client's reason.
            stopped = await other.CancelDiscussion(cancel(discussion_id=running.discussion_id), timeout=10)
            both_seconds = time.monotonic() - started
            assert stopped.status == CANCELLED
            assert stopped.error == "cancelled by the client"
            assert both_seconds < 3.0, f"two cancels elsewhere took {both_seconds:.2f} s"

            # Both places are free: the next create runs at once, wherever it lands.
            replacement = await other.CreateDiscussion(create(topic="runs next", personas=["engineer"]), timeout=5)
            assert replacement.status == session_pb2.DISCUSSION_STATUS_RUNNING
            for discussion in (queued, running):
                with pytest.raises(grpc.aio.AioRpcError) as finished:
                    await other.CancelDiscussion(cancel(discussion_id=discussion.discussion_id), timeout=10)
                assert finished.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            await other.CancelDiscussion(cancel(discussion_id=replacement.discussion_id), timeout=10)
    finally:
        await other_host.stop(grace_seconds=0)


async def test_a_cancel_nobody_can_carry_out_answers_unavailable_at_once(suite: Suite) -> None:
    """One replica, a running discussion in its store that no runner holds: no replica to ask, no wait."""
    store = suite.session_service.store
    doc = make_discussion(0xCA, expires_seconds=int(time.time()) + 3_600)
    public_id = doc.discussion_id
    doc.discussion_id = IdScope(await store.id_secret()).store_id(ANONYMOUS, public_id)
    doc.status = session_pb2.DISCUSSION_STATUS_RUNNING
    await store.create(ANONYMOUS, doc)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await suite.session().CancelDiscussion(session_pb2.CancelDiscussionRequest(discussion_id=public_id), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < CANCEL_ELSEWHERE_TIMEOUT_SECONDS / 2
