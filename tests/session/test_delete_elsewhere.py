"""Deleting a discussion through a replica that does not run it stops it where it runs (Redis, two replicas)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest

from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from services.session.auth import ANONYMOUS
from services.session.service import SessionService
from services.session.settings import SessionSettings
from services.shared.server import ServiceHost
from tests.redis_server import redis_server, redis_url  # noqa: F401  (fixtures)
from tests.suite import Suite

MakeSuite = Callable[..., Awaitable[Suite]]
LEASE_TTL_SECONDS = 1.5  # the owner renews every 0.5 s


async def one_slot_suite_on_redis(make_suite: MakeSuite, url: str, *, max_queued_sessions: int) -> Suite:
    """A suite on Redis with one running slot, a short lease and a slow LLM: discussions stay put while tested."""
    return await make_suite(
        session={
            "store": "redis",
            "redis_url": url,
            "max_concurrent_sessions": 1,
            "max_queued_sessions": max_queued_sessions,
            "lease_ttl_seconds": LEASE_TTL_SECONDS,
        },
        simulator={"first_token_latency_ms": 2000},
    )


async def second_replica(suite: Suite) -> ServiceHost:
    """Another session replica beside the suite's, on the same Redis and agent service."""
    settings = suite.session_host.settings
    assert isinstance(settings, SessionSettings)
    other_settings = settings.model_copy(update={"port": 0, "instance_id": "session-other"})
    host = ServiceHost(other_settings, SessionService(other_settings))
    await host.start()
    return host


async def test_a_delete_through_another_replica_stops_the_runner_and_frees_the_slot(
    make_suite: MakeSuite,
    redis_url: str,  # noqa: F811
) -> None:
    suite = await one_slot_suite_on_redis(make_suite, redis_url, max_queued_sessions=0)
    other_host = await second_replica(suite)
    try:
        async with grpc.aio.insecure_channel(other_host.address) as channel:
            owner, other = suite.session(), session_pb2_grpc.SessionServiceStub(channel)
            created = await owner.CreateDiscussion(
                session_pb2.CreateDiscussionRequest(topic="deleted elsewhere", personas=["engineer"], rounds=3),
                timeout=5,
            )
            sim = suite.simulator.simulator
            async with asyncio.timeout(5):
                await sim.wait_for_record(lambda r: r.topic == "deleted elsewhere")

            await other.DeleteDiscussion(
                session_pb2.DeleteDiscussionRequest(discussion_id=created.discussion_id), timeout=5
            )

            # The slot is free at once: the next create runs, on either replica.
            replacement = await other.CreateDiscussion(
                session_pb2.CreateDiscussionRequest(topic="takes the slot", personas=["engineer"]), timeout=5
            )
            assert replacement.status == session_pb2.DISCUSSION_STATUS_RUNNING
            # The owner stops within a lease renewal or two: its agent call is closed, nothing more is asked.
            store_id = suite.session_service.store_id(ANONYMOUS, created.discussion_id)
            discussions = suite.session_service.discussions
            async with asyncio.timeout(10 * LEASE_TTL_SECONDS):
                while discussions.is_here(store_id):  # noqa: ASYNC110 - polling the replica's discussions
                    await asyncio.sleep(0.05)
            async with asyncio.timeout(5):
                await sim.wait_for_record(lambda r: r.topic == "deleted elsewhere" and r.finished_at is not None)
            asked = len([r for r in sim.requests if r.topic == "deleted elsewhere"])
            await asyncio.sleep(3)  # past the round's latency: a runner still going would have asked again
            assert len([r for r in sim.requests if r.topic == "deleted elsewhere"]) == asked
            for stub in (owner, other):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.GetDiscussion(
                        session_pb2.GetDiscussionRequest(discussion_id=created.discussion_id), timeout=5
                    )
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            await other.CancelDiscussion(
                session_pb2.CancelDiscussionRequest(discussion_id=replacement.discussion_id), timeout=5
            )
    finally:
        await other_host.stop(grace_seconds=0)


async def test_a_delete_through_another_replica_takes_a_queued_discussion_out_of_its_replicas_queue(
    make_suite: MakeSuite,
    redis_url: str,  # noqa: F811
) -> None:
    suite = await one_slot_suite_on_redis(make_suite, redis_url, max_queued_sessions=1)
    other_host = await second_replica(suite)
    try:
        async with grpc.aio.insecure_channel(other_host.address) as channel:
            owner, other = suite.session(), session_pb2_grpc.SessionServiceStub(channel)
            create = session_pb2.CreateDiscussionRequest
            running = await owner.CreateDiscussion(create(topic="runs", personas=["engineer"]), timeout=5)
            queued = await owner.CreateDiscussion(create(topic="waits", personas=["engineer"]), timeout=5)
            assert queued.status == session_pb2.DISCUSSION_STATUS_QUEUED

            await other.DeleteDiscussion(session_pb2.DeleteDiscussionRequest(discussion_id=queued.discussion_id))

            # Its queue place is free at once, and its replica lets go of it within a renewal or two.
            waiting = await other.CreateDiscussion(create(topic="queues", personas=["engineer"]), timeout=5)
            assert waiting.status == session_pb2.DISCUSSION_STATUS_QUEUED
            discussions = suite.session_service.discussions
            store_id = suite.session_service.store_id(ANONYMOUS, queued.discussion_id)
            async with asyncio.timeout(10 * LEASE_TTL_SECONDS):
                while discussions.is_here(store_id):  # noqa: ASYNC110 - polling the replica's discussions
                    await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await owner.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=queued.discussion_id))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            for stub, discussion in ((owner, running), (other, waiting)):  # each through the replica holding it
                await stub.CancelDiscussion(
                    session_pb2.CancelDiscussionRequest(discussion_id=discussion.discussion_id), timeout=5
                )
    finally:
        await other_host.stop(grace_seconds=0)
