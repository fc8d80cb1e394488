"""Concurrency cap, expiry and restart: the limits and lifecycle the session service promises."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.gen.roundtable.agents.v1 import agents_pb2
from services.gen.roundtable.session.v1 import session_pb2
from services.session.auth import ANONYMOUS
from services.shared.errors import retry_delay_seconds
from tests.suite import Suite, run_to_end

MakeSuite = Callable[..., Awaitable[Suite]]


async def _wait_until(condition: Callable[[], Awaitable[bool]], timeout_seconds: float = 10) -> None:
    async with asyncio.timeout(timeout_seconds):
        while not await condition():  # noqa: ASYNC110 - polling state over RPC
            await asyncio.sleep(0.05)


async def test_sixth_concurrent_create_is_refused_with_retry_info(make_suite: MakeSuite) -> None:
    # Slow answers so the first five are still running when the sixth arrives.
    suite = await make_suite(
        session={"max_concurrent_sessions": 5, "max_queued_sessions": 0}, simulator={"first_token_latency_ms": 1500}
    )
    stub = suite.session()
    request = session_pb2.CreateDiscussionRequest(topic="capacity", personas=["engineer"])
    running = await asyncio.gather(*(stub.CreateDiscussion(request, timeout=5) for _ in range(5)))
    assert all(d.status == session_pb2.DISCUSSION_STATUS_RUNNING for d in running)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDiscussion(request, timeout=5)
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "maximum of 5" in (error.details() or "")
    delay = retry_delay_seconds(error)
    assert delay is not None and delay > 0
    status = rpc_status.from_call(error)
    assert status is not None
    quota = error_details_pb2.QuotaFailure()
    assert any(d.Unpack(quota) for d in status.details)
    assert quota.violations[0].description == "max_concurrent_sessions"
    # Once one finishes, a new create gets in.
    async for _ in stub.StreamDiscussion(session_pb2.StreamDiscussionRequest(discussion_id=running[0].discussion_id)):
        pass
    await _wait_until(lambda: _admits(suite))
    again = await stub.CreateDiscussion(request, timeout=5)
    assert again.status == session_pb2.DISCUSSION_STATUS_RUNNING


async def _admits(suite: Suite) -> bool:
    return suite.session_service.admission.active() < suite.session_service.admission.capacity


async def test_idle_discussions_expire_and_release_their_agent_sets(make_suite: MakeSuite) -> None:
    suite = await make_suite(
        session={"session_timeout_hours": 1.5 / 3600, "cleanup_interval_seconds": 0.2},
        agents={"release_grace_seconds": 3600},  # only expiry may release them in this test
    )
    stub, agents = suite.session(), suite.agents()
    finished = [
        (await run_to_end(stub, session_pb2.CreateDiscussionRequest(topic=f"expire {i}", personas=["engineer"])))[0]
        for i in range(3)
    ]
    # The agents, the store and the log files know each by its store id (ids are scoped to their owner).
    store_ids = [suite.session_service.store_id(ANONYMOUS, doc.discussion_id) for doc in finished]
    for doc, store_id in zip(finished, store_ids, strict=True):
        assert doc.status == session_pb2.DISCUSSION_STATUS_COMPLETED
        stats = await agents.GetAgentStats(agents_pb2.GetAgentStatsRequest(session_id=store_id))
        assert stats.session_present, "the agent set lives on until the session expires"

    async def all_gone() -> bool:
        for store_id in store_ids:
            stats = await agents.GetAgentStats(agents_pb2.GetAgentStatsRequest(session_id=store_id))
            if stats.session_present:
                return False
        return True

    await _wait_until(all_gone)
    for doc, store_id in zip(finished, store_ids, strict=True):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=doc.discussion_id))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert await suite.session_service.store.get(store_id) is None
        assert await suite.session_service.store.events_after(store_id, 0, 10) == []


async def test_reading_keeps_a_discussion_alive(make_suite: MakeSuite) -> None:
    suite = await make_suite(session={"session_timeout_hours": 1.0 / 3600, "cleanup_interval_seconds": 0.1})
    stub = suite.session()
    doc, _ = await run_to_end(stub, session_pb2.CreateDiscussionRequest(topic="keep me", personas=["engineer"]))
    for _ in range(12):  # 2.4 s of reads, well past the 1 s ttl
        await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=doc.discussion_id))
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.5)  # no reads: now it goes
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=doc.discussion_id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_completed_discussions_survive_a_restart_on_sqlite(make_suite: MakeSuite) -> None:
    suite = await make_suite()
    stub = suite.session()
    before, events = await run_to_end(stub, session_pb2.CreateDiscussionRequest(topic="durable", rounds=2))
    assert before.status == session_pb2.DISCUSSION_STATUS_COMPLETED
    await suite.restart_session()
    stub = suite.session()
    after = await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=before.discussion_id))
    assert after.results == before.results
    assert after.summary == before.summary
    assert after.status == session_pb2.DISCUSSION_STATUS_COMPLETED
    replayed = [
        e async for e in stub.StreamDiscussion(session_pb2.StreamDiscussionRequest(discussion_id=before.discussion_id))
    ]
    assert replayed == events
    listed = await stub.ListDiscussions(session_pb2.ListDiscussionsRequest())
    assert before.discussion_id in [d.discussion_id for d in listed.discussions]


async def test_with_resume_off_discussions_cut_short_by_a_stop_are_interrupted(make_suite: MakeSuite) -> None:
    suite = await make_suite(simulator={"first_token_latency_ms": 5000}, session={"resume_interrupted": False})
    stub = suite.session()
    created = await stub.CreateDiscussion(session_pb2.CreateDiscussionRequest(topic="cut short", personas=["engineer"]))
    await suite.restart_session()
    after = await suite.session().GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=created.discussion_id))
    assert after.status == session_pb2.DISCUSSION_STATUS_INTERRUPTED
    assert "stopped while this discussion ran" in after.error


@pytest.mark.parametrize("resume", [True, False])
async def test_a_crash_leaves_no_discussion_running_after_restart(make_suite: MakeSuite, resume: bool) -> None:
    suite = await make_suite(session={"resume_interrupted": resume})
    stub = suite.session()
    doc, _ = await run_to_end(stub, session_pb2.CreateDiscussionRequest(topic="crash", personas=["engineer"]))
    # Simulate a process that died mid-run: the stored document still says RUNNING.
    path = suite.session_host.settings.sqlite_path  # type: ignore[attr-defined]
    stale = session_pb2.Discussion()
    stale.CopyFrom(doc)
    stale.status = session_pb2.DISCUSSION_STATUS_RUNNING
    store_id = suite.session_service.store_id(ANONYMOUS, doc.discussion_id)
    stale.discussion_id = store_id
    with sqlite3.connect(path) as db:
        updated = db.execute(
            "UPDATE discussions SET status = ?, document = ? WHERE discussion_id = ?",
            (stale.status, stale.SerializeToString(), store_id),
        )
        assert updated.rowcount == 1
    await suite.restart_session()
    stub = suite.session()

    async def settled() -> bool:
        return not suite.session_service.discussions.is_here(store_id)

    await _wait_until(settled)
    after = await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=doc.discussion_id))
    expected = session_pb2.DISCUSSION_STATUS_COMPLETED if resume else session_pb2.DISCUSSION_STATUS_INTERRUPTED
    assert after.status == expected
    stored = await suite.session_service.store.events_after(store_id, 0, 1000)
    assert stored[-1].status_changed.status == expected
    assert after.results == doc.results  # what was recorded is kept (resuming found nothing left to run)


async def test_cancel_stops_a_running_discussion_and_releases_its_agents(make_suite: MakeSuite) -> None:
    suite = await make_suite(simulator={"first_token_latency_ms": 3000}, agents={"release_grace_seconds": 3600})
    stub, agents = suite.session(), suite.agents()
    created = await stub.CreateDiscussion(session_pb2.CreateDiscussionRequest(topic="stop it", personas=["engineer"]))
    sim = suite.simulator.simulator
    async with asyncio.timeout(5):
        await sim.wait_for_record(lambda r: r.topic == "stop it")
    cancelled = await stub.CancelDiscussion(session_pb2.CancelDiscussionRequest(discussion_id=created.discussion_id))
    assert cancelled.status == session_pb2.DISCUSSION_STATUS_CANCELLED
    # The in-flight LLM request was closed, and the agent set is gone.
    async with asyncio.timeout(1):
        await sim.wait_for_record(lambda r: r.topic == "stop it" and r.client_disconnected)
    store_id = suite.session_service.store_id(ANONYMOUS, created.discussion_id)
    stats = await agents.GetAgentStats(agents_pb2.GetAgentStatsRequest(session_id=store_id))
    assert not stats.session_present
    events = [
        e async for e in stub.StreamDiscussion(session_pb2.StreamDiscussionRequest(discussion_id=created.discussion_id))
    ]
    assert events[-1].status_changed.status == session_pb2.DISCUSSION_STATUS_CANCELLED


async def test_same_request_id_returns_the_same_discussion(suite: Suite) -> None:
    stub = suite.session()
    request = session_pb2.CreateDiscussionRequest(topic="once only", personas=["engineer"], request_id="req-42")
    first, second = await asyncio.gather(stub.CreateDiscussion(request), stub.CreateDiscussion(request))
    assert first.discussion_id == second.discussion_id
