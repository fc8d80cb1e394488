"""The session's Redis pieces on a real 3-master Redis Cluster: discussions end to end, a lost master, stages."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from redis.asyncio.cluster import RedisCluster

from services.agents.llm_budget import BudgetLimits, LLMBudgetUnavailable
from services.agents.llm_budget_redis import FailoverBuckets, RedisBuckets
from services.agents.llm_budget_redis import connect as budget_connect
from services.gen.roundtable.session.v1 import session_pb2
from services.session.redis import connection as redis_connection
from services.session.redis.connection import RedisUnavailable, connect
from services.session.stores.redis import RedisStore
from services.shared.processes import free_port
from services.shared.redis_client import is_cluster_url
from tests.redis_cluster import (  # noqa: F401  (fixtures)
    LocalRedisCluster,
    redis_cluster,
    redis_cluster_url,
    redis_url,
    running_redis_cluster,
)
from tests.redis_server import redis_server  # noqa: F401  (fixture)
from tests.session.test_redis_suite import on_redis
from tests.session.test_store_contract import make_discussion
from tests.suite import Suite, run_to_end

MakeSuite = Callable[..., Awaitable[Suite]]
DISCUSSIONS = 12
BACKEND = "https://llm.example/v1#0123456789ab"
BUDGET_LIMITS = BudgetLimits(requests_per_minute=60, tokens_per_minute=6000)


async def test_discussions_run_end_to_end_on_a_redis_cluster_and_spread_over_its_masters(
    make_suite: MakeSuite,
    redis_cluster: LocalRedisCluster,  # noqa: F811
) -> None:
    redis_cluster.flush()
    suite = await make_suite(session={"enable_rate_limiting": True})
    await on_redis(suite, redis_cluster.url)
    stub = suite.session()

    finished = await asyncio.gather(
        *(
            run_to_end(
                stub,
                session_pb2.CreateDiscussionRequest(
                    topic=f"Topic {number}", personas=["scientist", "engineer"], rounds=1, request_id=f"r{number}"
                ),
            )
            for number in range(DISCUSSIONS)
        )
    )

    for final, events in finished:
        assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED, final.error
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    listed = await stub.ListDiscussions(session_pb2.ListDiscussionsRequest(page_size=50), timeout=10)
    assert {d.discussion_id for d in listed.discussions} == {final.discussion_id for final, _ in finished}
    # Each discussion's keys hash by its own id: the documents and event logs spread over every master.
    keys_per_master = []
    for port in redis_cluster.ports:
        node = connect(f"redis://127.0.0.1:{port}")
        try:
            keys_per_master.append(len([key async for key in node.scan_iter(match="rt:{d:*")]))
        finally:
            await node.aclose()
    assert sum(keys_per_master) == 2 * DISCUSSIONS  # a document and an event stream each
    assert sum(count > 0 for count in keys_per_master) >= 2, keys_per_master  # one master: a 1-in-177,000 chance

    await stub.DeleteDiscussion(session_pb2.DeleteDiscussionRequest(discussion_id=finished[0][0].discussion_id))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=finished[0][0].discussion_id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_lost_master_makes_the_store_and_the_llm_budget_unavailable_not_broken() -> None:
    with running_redis_cluster(node_timeout_ms=1000) as cluster:
        store = await RedisStore.open(connect(cluster.url))
        try:
            created = [await store.create("alice", make_discussion(number)) for number in range(12)]
            client = store.client
            assert isinstance(client, RedisCluster)
            lost = client.get_node(host="127.0.0.1", port=cluster.ports[0])
            ids = [d.discussion_id for d in created]
            on_lost = [i for i in ids if client.get_node_from_key(f"rt:{{d:{i}}}") is lost]
            elsewhere = [i for i in ids if i not in on_lost]
            assert on_lost and elsewhere, "twelve ids over three masters"

            # A client whose URL names a node that is gone first finds the cluster through the next one.
            nodes = ",".join(f"127.0.0.1:{port}" for port in [free_port(), *cluster.ports])
            starting = connect(f"redis+cluster://{nodes}")
            assert await starting.exists(f"rt:{{d:{elsewhere[0]}}}") == 1
            await starting.aclose()

            cluster.kill_node(0)
            # Its slots answer UNAVAILABLE at once (the connection is refused); the others still serve.
            with pytest.raises(RedisUnavailable):
                await store.get(on_lost[0])
            assert await store.get(elsewhere[0]) is not None
            # Once the others declare it failed, the whole cluster refuses (CLUSTERDOWN): still UNAVAILABLE.
            async with asyncio.timeout(15):
                while cluster.cluster_state(1) != "fail":  # noqa: ASYNC110 - waiting for the failure report
                    await asyncio.sleep(0.2)
            with pytest.raises(RedisUnavailable):
                await store.get(elsewhere[0])
            # A client starting now, naming the lost master: UNAVAILABLE too, not redis-py's own exception.
            starting = connect(cluster.node_url(0))
            with pytest.raises(RedisUnavailable):
                await RedisStore.open(starting)
            await starting.aclose()
            # The LLM budget on the same cluster: open budgets alone on this replica, closed refuses.
            opened, closed = (
                FailoverBuckets(RedisBuckets(budget_connect(cluster.url)), policy) for policy in ("open", "closed")
            )
            try:
                assert (await opened.take(BACKEND, BUDGET_LIMITS, 10)).granted and opened.redis_down
                with pytest.raises(LLMBudgetUnavailable):
                    await closed.take(BACKEND, BUDGET_LIMITS, 10)
            finally:
                await opened.close()
                await closed.close()
        finally:
            await store.close()


async def test_ordered_stages_take_one_round_trip_on_a_server_and_one_each_on_a_cluster(
    redis_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A cluster pipeline sends each node its share at once: only separate round trips keep cross-slot order.
    client = connect(redis_url)
    round_trips = []
    real_execute_pipeline = redis_connection.execute_pipeline

    async def counted(*args: Any) -> list[Any]:
        round_trips.append(args[2])
        return await real_execute_pipeline(*args)

    monkeypatch.setattr(redis_connection, "execute_pipeline", counted)
    try:

        def index(pipe: redis_connection.Pipeline) -> None:
            pipe.set("rt:{idx}:probe", "index")

        def document(pipe: redis_connection.Pipeline) -> None:
            pipe.set("rt:{d:1}", "doc")

        replies = await redis_connection.execute_in_order(client, [], index, document)
    finally:
        await client.aclose()

    assert replies == [True, True]
    assert len(round_trips) == (2 if is_cluster_url(redis_url) else 1)
