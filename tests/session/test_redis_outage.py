"""Redis going away: every call fails fast with RedisUnavailable, admission fails closed, and it all comes back."""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from services.session.redis.admission import RedisAdmission
from services.session.redis.connection import RedisUnavailable, connect
from services.session.redis.rate_limit import RedisRateLimiter
from services.session.stores.redis import RedisStore
from tests.redis_server import RedisServer, running_redis
from tests.session.test_store_contract import ALICE, ALL, BOB, COMPLETED, discussion_id, event, make_discussion

OUTAGE_SECONDS = 3.0
FAIL_FAST_SECONDS = 1.0


@pytest.fixture
def own_redis(tmp_path: pathlib.Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (it gets stopped), fsyncing every write so a crash loses nothing acked."""
    with running_redis(tmp_path, appendfsync="always") as server:
        yield server


async def fails_fast(call: Callable[[], Awaitable[Any]]) -> float:
    """Run a call that must raise RedisUnavailable; returns how long it took."""
    started = time.monotonic()
    with pytest.raises(RedisUnavailable):
        await call()
    return time.monotonic() - started


@pytest.mark.parametrize("how", ["stopped", "killed"])
async def test_calls_fail_fast_while_redis_is_down_and_every_acknowledged_write_survives(
    own_redis: RedisServer, how: str
) -> None:
    store = await RedisStore.open(connect(own_redis.url))
    gate = RedisAdmission(store.client, capacity=10, max_queued=20, max_per_principal=50, lease_ttl_seconds=30)
    limiter = RedisRateLimiter(store.client, 6_000)
    acknowledged = []
    for number in range(1, 21):
        doc = make_discussion(number, created_seconds=number, request_id=f"r{number}" if number % 2 else "")
        assert await store.create(ALICE, doc) == doc
        await store.append_events([event(number, s) for s in (1, 2, 3)])
        await gate.admit(doc.discussion_id, ALICE)
        acknowledged.append(doc)
    acknowledged[0].status = COMPLETED
    acknowledged[0].summary = "finished before the outage"
    await store.save(acknowledged[0])
    assert (gate.active(), gate.queued()) == (10, 10)

    if how == "killed":
        own_redis.kill()
    else:
        own_redis.stop()
    late = make_discussion(99)
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "get": lambda: store.get(discussion_id(1)),
        "owner": lambda: store.owner(discussion_id(1)),
        "get_with_owner": lambda: store.get_with_owner(discussion_id(1)),
        "create": lambda: store.create(BOB, late),
        "save": lambda: store.save(acknowledged[1]),
        "touch": lambda: store.touch(discussion_id(2), 10.0, 2_000_000.0),
        "append_events": lambda: store.append_events([event(2, 4)]),
        "events_after": lambda: store.events_after(discussion_id(2), 0, 100),
        "list_page": lambda: store.list_page(ALICE, ALL, 50, ""),
        "owned": lambda: store.owned(ALICE),
        "delete": lambda: store.delete(discussion_id(3)),
        "expired": lambda: store.expired(time.time(), 10),
        "unfinished": lambda: store.unfinished(),
        "admit": lambda: gate.admit("refused-while-down", BOB),  # fails closed: never a slot
        "renew": lambda: gate.renew(discussion_id(1)),
        "reap": lambda: gate.reap(),
        "rate limit": lambda: limiter.spend(BOB, 1),
    }
    slowest: dict[str, float] = {}
    outage_started = time.monotonic()
    while time.monotonic() - outage_started < OUTAGE_SECONDS:
        for name, call in calls.items():
            slowest[name] = max(slowest.get(name, 0.0), await fails_fast(call))
        await asyncio.sleep(0.2)
    assert max(slowest.values()) < FAIL_FAST_SECONDS, slowest
    assert await gate.release(discussion_id(20)) == []  # best effort: the lease lapses by itself

    own_redis.start()  # same port, same directory: the AOF is replayed
    # The same clients reconnect by themselves, and reload the scripts Redis forgot.
    for doc in acknowledged:
        assert await store.get(doc.discussion_id) == doc
        assert [e.sequence for e in await store.events_after(doc.discussion_id, 0, 10)] == [1, 2, 3]
    replay = await store.create(ALICE, make_discussion(50, request_id="r1"))
    assert replay.discussion_id == discussion_id(1)
    pages = await store.list_page(ALICE, ALL, 50, "")
    assert [d.discussion_id for d in pages[0]] == [discussion_id(n) for n in range(20, 0, -1)]
    assert len(await store.unfinished()) == 19
    assert await store.owned(ALICE) == (20, 1_000_000.0)
    assert await store.create(BOB, late) == late
    assert await gate.renew(discussion_id(1)) is True  # leases were kept, on Redis' clock
    assert await gate.release(discussion_id(1), 5.0) == [discussion_id(11)]
    assert await gate.admit("after-the-outage", BOB) is False  # slots full, queued
    await limiter.spend(BOB, 1)
    await store.close()


async def test_a_hung_redis_costs_each_call_one_timeout_not_a_hang(own_redis: RedisServer) -> None:
    store = await RedisStore.open(connect(own_redis.url))
    gate = RedisAdmission(store.client, capacity=10, max_queued=10, max_per_principal=10, lease_ttl_seconds=30)
    await store.create(ALICE, make_discussion(1))

    own_redis.pause()
    try:
        timings = [
            await fails_fast(lambda: store.get(discussion_id(1))),
            await fails_fast(lambda: store.append_events([event(1, 1)])),
            await fails_fast(lambda: store.list_page(ALICE, ALL, 10, "")),
            await fails_fast(lambda: gate.admit("while-hung", ALICE)),
        ]
    finally:
        own_redis.resume()
    assert max(timings) < FAIL_FAST_SECONDS, timings

    assert await store.get(discussion_id(1)) == make_discussion(1)
    assert await gate.admit("after", ALICE) is True
    await store.close()
