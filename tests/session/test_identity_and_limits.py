"""Identity, isolation between principals, rate limits, the queue, lapsed leases, memory watch, retention."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Awaitable, Callable

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.gen.roundtable.session.v1 import session_pb2
from services.session.keys import add_key
from services.shared.errors import retry_delay_seconds
from tests.suite import Suite

MakeSuite = Callable[..., Awaitable[Suite]]
Create = session_pb2.CreateDiscussionRequest


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def quota_limit(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    quota = error_details_pb2.QuotaFailure()
    for detail in status.details:
        if detail.Unpack(quota):
            return quota.violations[0].description
    raise AssertionError("no QuotaFailure detail")


async def drain(stub: object, discussion_id: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
    async for _ in stub.StreamDiscussion(  # type: ignore[attr-defined]
        session_pb2.StreamDiscussionRequest(discussion_id=discussion_id), metadata=metadata
    ):
        pass


@pytest.fixture
def keys(tmp_path: pathlib.Path) -> tuple[pathlib.Path, str, str]:
    path = tmp_path / "api_keys.toml"
    return path, add_key(path, "alice"), add_key(path, "bob")


async def test_keys_file_holds_hashes_only(keys: tuple[pathlib.Path, str, str]) -> None:
    path, alice, bob = keys
    text = path.read_text()
    assert alice not in text and bob not in text
    assert 'principal = "alice"' in text


async def test_callers_need_a_valid_key_when_anonymous_is_off(
    make_suite: MakeSuite, keys: tuple[pathlib.Path, str, str]
) -> None:
    path, alice, _ = keys
    suite = await make_suite(session={"api_keys_file": path, "allow_anonymous": False})
    stub = suite.session()
    for metadata, words in (
        ((), "needs an API key"),
        ((("authorization", "Bearer rt_wrong"),), "not valid"),
        ((("authorization", f"Basic {alice}"),), "Bearer <key>"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListDiscussions(session_pb2.ListDiscussionsRequest(), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert words in (caught.value.details() or "")
    listed = await stub.ListDiscussions(session_pb2.ListDiscussionsRequest(), metadata=bearer(alice))
    assert list(listed.discussions) == []


async def test_one_principal_cannot_see_or_touch_anothers_discussion(
    make_suite: MakeSuite, keys: tuple[pathlib.Path, str, str]
) -> None:
    path, alice, bob = keys
    suite = await make_suite(
        session={"api_keys_file": path, "allow_anonymous": False}, simulator={"first_token_latency_ms": 300}
    )
    stub = suite.session()
    running = await stub.CreateDiscussion(Create(topic="alice's secret", personas=["engineer"]), metadata=bearer(alice))
    done = await stub.CreateDiscussion(Create(topic="alice's other", personas=["engineer"]), metadata=bearer(alice))
    await drain(stub, done.discussion_id, bearer(alice))
    for target in (running.discussion_id, done.discussion_id):  # live and stored alike
        calls: list[Awaitable[object]] = [
            stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=target), metadata=bearer(bob)),
            stub.CancelDiscussion(session_pb2.CancelDiscussionRequest(discussion_id=target), metadata=bearer(bob)),
            stub.DeleteDiscussion(session_pb2.DeleteDiscussionRequest(discussion_id=target), metadata=bearer(bob)),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await drain(stub, target, bearer(bob))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    bobs = await stub.ListDiscussions(session_pb2.ListDiscussionsRequest(), metadata=bearer(bob))
    assert list(bobs.discussions) == []
    alices = await stub.ListDiscussions(session_pb2.ListDiscussionsRequest(), metadata=bearer(alice))
    assert {d.discussion_id for d in alices.discussions} == {running.discussion_id, done.discussion_id}
    # Bob's attempts changed nothing: Alice's discussion runs on to the end.
    await drain(stub, running.discussion_id, bearer(alice))
    final = await stub.GetDiscussion(
        session_pb2.GetDiscussionRequest(discussion_id=running.discussion_id), metadata=bearer(alice)
    )
    assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED


async def test_a_burst_past_the_rate_limit_is_refused_for_that_principal_only(
    make_suite: MakeSuite, keys: tuple[pathlib.Path, str, str]
) -> None:
    path, alice, bob = keys
    # 200 units a minute, 20 per create: 10 creates each.
    suite = await make_suite(
        session={
            "api_keys_file": path,
            "allow_anonymous": False,
            "enable_rate_limiting": True,
            "rate_limit_per_minute": 200,
            "create_cost": 20,
        }
    )
    stub = suite.session()

    async def create(key: str, i: int) -> grpc.StatusCode | grpc.aio.AioRpcError:
        try:
            await stub.CreateDiscussion(Create(topic=f"burst {i}", personas=["engineer"]), metadata=bearer(key))
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            return error

    outcomes = await asyncio.gather(*(create(alice, i) for i in range(100)), *(create(bob, i) for i in range(10)))
    alices, bobs = outcomes[:100], outcomes[100:]
    assert sum(o == grpc.StatusCode.OK for o in alices) == 10
    refused = [o for o in alices if isinstance(o, grpc.aio.AioRpcError)]
    assert len(refused) == 90
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert quota_limit(error) == "rate_limit_per_minute"
        delay = retry_delay_seconds(error)
        assert delay is not None and 0 < delay <= 60
    assert bobs == [grpc.StatusCode.OK] * 10


async def test_global_cap_queues_in_order_then_refuses(make_suite: MakeSuite) -> None:
    suite = await make_suite(
        session={"max_concurrent_sessions": 10, "max_queued_sessions": 5},
        simulator={"first_token_latency_ms": 400},
    )
    stub = suite.session()
    results: list[session_pb2.Discussion | grpc.aio.AioRpcError] = []
    for i in range(20):  # one at a time, so arrival order is known
        try:
            results.append(await stub.CreateDiscussion(Create(topic=f"cap {i}", personas=["engineer"])))
        except grpc.aio.AioRpcError as error:
            results.append(error)
    accepted = [r for r in results if isinstance(r, session_pb2.Discussion)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert [d.status for d in accepted] == [session_pb2.DISCUSSION_STATUS_RUNNING] * 10 + [
        session_pb2.DISCUSSION_STATUS_QUEUED
    ] * 5
    assert len(refused) == 5
    for refusal in refused:
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert quota_limit(refusal) == "max_queued_sessions"
        assert (retry_delay_seconds(refusal) or 0) > 0
    await asyncio.gather(*(drain(stub, d.discussion_id) for d in accepted))
    started_at = {}
    for doc in accepted:
        final = await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=doc.discussion_id))
        assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED
        events = [
            e async for e in stub.StreamDiscussion(session_pb2.StreamDiscussionRequest(discussion_id=doc.discussion_id))
        ]
        running = next(e for e in events if e.status_changed.status == session_pb2.DISCUSSION_STATUS_RUNNING)
        started_at[doc.discussion_id] = running.time.ToNanoseconds()
    queued_ids = [d.discussion_id for d in accepted[10:]]
    assert sorted(queued_ids, key=started_at.__getitem__) == queued_ids  # admitted in arrival order


async def test_a_slot_held_by_a_dead_runner_is_reused_once_its_lease_lapses(make_suite: MakeSuite) -> None:
    suite = await make_suite(session={"max_concurrent_sessions": 1, "lease_ttl_seconds": 0.6})
    # A runner that took the only slot and died without releasing it (nothing renews its lease).
    assert await suite.session_service.admission.admit("0" * 32, "ghost")
    stub = suite.session()
    created = await stub.CreateDiscussion(Create(topic="after the ghost", personas=["engineer"]))
    assert created.status == session_pb2.DISCUSSION_STATUS_QUEUED
    async with asyncio.timeout(10):
        await drain(stub, created.discussion_id)
    final = await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=created.discussion_id))
    assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED


async def test_cancelling_a_queued_discussion_takes_it_out_of_the_queue(make_suite: MakeSuite) -> None:
    suite = await make_suite(
        session={"max_concurrent_sessions": 1, "max_queued_sessions": 2}, simulator={"first_token_latency_ms": 500}
    )
    stub = suite.session()
    first = await stub.CreateDiscussion(Create(topic="first", personas=["engineer"]))
    waiting = await stub.CreateDiscussion(Create(topic="waiting", personas=["engineer"]))
    assert waiting.status == session_pb2.DISCUSSION_STATUS_QUEUED
    cancelled = await stub.CancelDiscussion(session_pb2.CancelDiscussionRequest(discussion_id=waiting.discussion_id))
    assert cancelled.status == session_pb2.DISCUSSION_STATUS_CANCELLED
    assert suite.session_service.admission.queued() == 0
    await drain(stub, first.discussion_id)
    sim_topics = {r.topic for r in suite.simulator.simulator.requests}
    assert "waiting" not in sim_topics


async def test_memory_watch_turns_new_discussions_away(make_suite: MakeSuite) -> None:
    suite = await make_suite(session={"enable_memory_monitoring": True, "memory_limit_rss_mb": 1})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.session().CreateDiscussion(Create(topic="no room", personas=["engineer"]))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota_limit(caught.value) == "memory"
    assert "short of memory" in (caught.value.details() or "")


async def test_a_principal_can_keep_only_so_many_discussions(make_suite: MakeSuite) -> None:
    suite = await make_suite(session={"max_retained_discussions_per_principal": 3})
    stub = suite.session()
    kept = [await stub.CreateDiscussion(Create(topic=f"keep {i}", personas=["engineer"])) for i in range(3)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateDiscussion(Create(topic="one too many", personas=["engineer"]))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota_limit(caught.value) == "max_retained_discussions_per_principal"
    await drain(stub, kept[0].discussion_id)
    await stub.DeleteDiscussion(session_pb2.DeleteDiscussionRequest(discussion_id=kept[0].discussion_id))
    again = await stub.CreateDiscussion(Create(topic="room again", personas=["engineer"]))
    assert again.discussion_id


async def test_deltas_stop_being_recorded_at_the_event_cap_but_the_discussion_completes(make_suite: MakeSuite) -> None:
    suite = await make_suite(
        session={"max_events_per_discussion": 100},
        agents={"delta_flush_chars": 1, "delta_flush_interval_ms": 0, "llm_max_tokens": 200},
    )
    stub = suite.session()
    created = await stub.CreateDiscussion(Create(topic="chatty", personas=["engineer", "scientist"], rounds=2))
    events = [
        e async for e in stub.StreamDiscussion(session_pb2.StreamDiscussionRequest(discussion_id=created.discussion_id))
    ]
    assert len(events) <= 100
    assert events[-1].status_changed.status == session_pb2.DISCUSSION_STATUS_COMPLETED
    final = await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=created.discussion_id))
    assert all(len(r.text.split()) >= 200 for r in final.results)  # full texts, from the completed events
