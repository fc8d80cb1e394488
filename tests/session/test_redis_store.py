"""What only the Redis store has to show: one hash slot per script, replicas sharing it, blocking reads, the stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from redis.crc import key_slot

from services.gen.roundtable.session.v1 import session_pb2
from services.session.redis import connection as redis_connection
from services.session.redis.admission import RedisAdmission
from services.session.redis.connection import Client, Script, connect
from services.session.redis.rate_limit import RedisRateLimiter
from services.session.stores.redis import RedisStore
from services.shared.errors import RoundtableError
from tests.redis_cluster import redis_cluster, redis_cluster_url, redis_url  # noqa: F401  (fixtures)
from tests.redis_server import redis_server  # noqa: F401  (fixture)
from tests.session.test_store_contract import ALICE, ALL, BOB, COMPLETED, discussion_id, event, make_discussion


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:  # noqa: F811
    """Two stores on one Redis, each with its own connections: two session replicas."""
    first, second = await RedisStore.open(connect(redis_url)), await RedisStore.open(connect(redis_url))
    yield first, second
    await first.close()
    await second.close()


async def test_every_script_touches_keys_of_one_hash_slot(
    replicas: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = replicas
    calls: list[list[str]] = []
    real_call, real_queue = Script.__call__, Script.queue

    async def recording_call(self: Script, client: Client, keys: Any, args: Any) -> Any:
        calls.append(list(keys))
        return await real_call(self, client, keys, args)

    def recording_queue(self: Script, pipe: Any, keys: Any, args: Any) -> None:
        calls.append(list(keys))
        real_queue(self, pipe, keys, args)

    monkeypatch.setattr(Script, "__call__", recording_call)
    monkeypatch.setattr(Script, "queue", recording_queue)

    first = make_discussion(1, request_id="again")
    await store.create(ALICE, first)
    await store.create(ALICE, make_discussion(2, request_id="again"))  # loses the claim
    await store.create(BOB, make_discussion(3))
    await store.append_events([event(1, 2), event(1, 3)])
    await store.append_events([event(1, 1)])  # late: the stream is rewritten
    first.status = COMPLETED
    await store.save(first)
    await store.touch(first.discussion_id, 5_000.0, 9_000_000.0)
    await store.list_page(ALICE, COMPLETED, 10, "")
    await store.delete(first.discussion_id)
    gate = RedisAdmission(store.client, capacity=1, max_queued=1, max_per_principal=5, lease_ttl_seconds=30)
    await gate.admit("a", ALICE)
    await gate.admit("b", BOB)
    await gate.renew("a")
    await gate.release("a", 3.0)
    await gate.reap()
    await gate.admit_unchecked("c", ALICE)
    await RedisRateLimiter(store.client, 100).spend(ALICE, 1)

    assert len(calls) > 15
    for keys in calls:
        assert len({key_slot(k.encode()) for k in keys}) == 1, keys
    # The keys the admission scripts derive (per principal, per replica) share the declared keys' slot.
    every_key = [k.decode() async for k in store.client.scan_iter(match="*adm*")]
    assert len({key_slot(k.encode()) for k in every_key}) == 1, every_key
    # And one discussion's document and event stream live together.
    doc_keys = [k async for k in store.client.scan_iter(match=f"*{discussion_id(3)}*")]
    assert len({key_slot(k) for k in doc_keys}) == 1


async def test_two_replicas_racing_one_request_id_make_one_discussion(
    replicas: tuple[RedisStore, RedisStore],
) -> None:
    first, second = replicas
    attempts = [make_discussion(n, request_id="double-click") for n in range(1, 41)]

    results = await asyncio.gather(
        *(([first, second][n % 2]).create(ALICE, doc) for n, doc in enumerate(attempts, start=1))
    )

    winners = {d.discussion_id for d in results}
    assert len(winners) == 1
    for store in replicas:
        page, _ = await store.list_page(ALICE, ALL, 100, "")
        assert [d.discussion_id for d in page] == list(winners)
        assert await store.expired(float("inf"), 100) == list(winners)
        assert [d.discussion_id for d in await store.unfinished()] == list(winners)


async def test_any_replica_reads_what_another_wrote(replicas: tuple[RedisStore, RedisStore]) -> None:
    writer, reader = replicas
    doc = make_discussion(1)
    await writer.create(ALICE, doc)
    await writer.append_events([event(1, s) for s in range(1, 4)])
    doc.status = COMPLETED
    await writer.save(doc)
    await reader.touch(doc.discussion_id, 2_000.0, 3_000_000.0)

    fetched = await reader.get(doc.discussion_id)
    assert fetched is not None and fetched.status == COMPLETED
    assert fetched.expires_at.ToSeconds() == 3_000_000
    assert [e.sequence for e in await reader.events_after(doc.discussion_id, 0, 10)] == [1, 2, 3]
    assert await reader.owned(ALICE) == (1, 3_000_000.0)
    assert await reader.delete(doc.discussion_id) is True
    assert await writer.get(doc.discussion_id) is None
    assert await writer.owned(ALICE) == (0, None)


async def test_a_blocking_read_wakes_when_another_replica_appends(replicas: tuple[RedisStore, RedisStore]) -> None:
    writer, reader = replicas
    await writer.create(ALICE, make_discussion(1))
    await writer.append_events([event(1, 1)])

    assert await reader.wait_for_events(discussion_id(1), 0, 1.0) is True  # already there
    started = asyncio.get_running_loop().time()
    assert await reader.wait_for_events(discussion_id(1), 1, 0.2) is False
    assert asyncio.get_running_loop().time() - started < 1.0

    waiting = asyncio.create_task(reader.wait_for_events(discussion_id(1), 1, 5.0))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await writer.append_events([event(1, 2)])
    assert await asyncio.wait_for(waiting, 2.0) is True


async def test_events_live_in_a_stream_whose_ids_are_the_sequence_numbers(redis_url: str) -> None:  # noqa: F811
    store = await RedisStore.open(connect(redis_url))
    try:
        await store.create(ALICE, make_discussion(1))
        await store.append_events([event(1, 3), event(1, 5)])
        await store.append_events([event(1, 4), event(1, 1), event(1, 5, "duplicate")])

        assert await store.last_sequence(discussion_id(1)) == 5
        assert await store.last_sequence(discussion_id(2)) == 0
        entries: Any = await store.client.xrange(f"rt:{{d:{discussion_id(1)}}}:events")
        assert [entry_id for entry_id, _ in entries] == [b"1-0", b"3-0", b"4-0", b"5-0"]
        texts = [e.agent_delta.text for e in await store.events_after(discussion_id(1), 0, 10)]
        assert texts == ["chunk 1", "chunk 3", "chunk 4", "chunk 5"]
    finally:
        await store.close()


async def test_a_listing_skips_an_index_entry_whose_document_is_gone(redis_url: str) -> None:  # noqa: F811
    store = await RedisStore.open(connect(redis_url))
    try:
        for number in (1, 2, 3):
            await store.create(ALICE, make_discussion(number, created_seconds=number))
        # What a crash between deleting the document and its index entries leaves behind.
        await store.client.delete(f"rt:{{d:{discussion_id(2)}}}")

        page, _ = await store.list_page(ALICE, ALL, 10, "")
        assert [d.discussion_id for d in page] == [discussion_id(3), discussion_id(1)]
        assert await store.get(discussion_id(2)) is None
        # The sweep still finds it, and deleting it clears what was left.
        assert discussion_id(2) in await store.expired(float("inf"), 10)
        assert await store.delete(discussion_id(2)) is False
        assert discussion_id(2) not in await store.expired(float("inf"), 10)
    finally:
        await store.close()


async def test_save_and_touch_never_resurrect_a_deleted_discussion(redis_url: str) -> None:  # noqa: F811
    store = await RedisStore.open(connect(redis_url))
    try:
        doc = make_discussion(1)
        await store.create(ALICE, doc)
        await store.delete(doc.discussion_id)

        doc.status = session_pb2.DISCUSSION_STATUS_RUNNING
        await store.save(doc)
        await store.touch(doc.discussion_id, 1.0, 2.0)
        await store.append_events([event(1, 1)])

        assert await store.client.keys("*{d:*") == []
        assert await store.expired(float("inf"), 10) == []
        assert await store.unfinished() == []
        assert await store.owned(ALICE) == (0, None)
    finally:
        await store.close()


def test_the_unavailable_error_maps_to_unavailable() -> None:
    error = redis_connection.RedisUnavailable("Redis is unavailable (get): refused")
    assert isinstance(error, RoundtableError)
    assert error.code == grpc.StatusCode.UNAVAILABLE


async def test_connect_does_no_io_until_first_use() -> None:
    client = connect("redis://127.0.0.1:1/0")  # nothing listens on port 1
    await client.aclose()
