"""What only Redis admission has to show: replicas share one set of slots, atomically, on Redis' clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.session.redis.admission import RedisAdmission
from services.session.redis.connection import Client, connect
from services.shared.errors import ResourceExhausted
from tests.redis_cluster import redis_cluster, redis_cluster_url, redis_url  # noqa: F401  (fixtures)
from tests.redis_server import redis_server  # noqa: F401  (fixture)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Client]:  # noqa: F811
    """A client of the shared, emptied redis-server, then of the cluster."""
    opened = connect(redis_url)
    yield opened
    await opened.aclose()


def replica(client: Client, name: str, capacity: int = 2, max_queued: int = 2, ttl: float = 30) -> RedisAdmission:
    return RedisAdmission(
        client,
        capacity=capacity,
        max_queued=max_queued,
        max_per_principal=100,
        lease_ttl_seconds=ttl,
        replica_id=name,
    )


async def test_replicas_share_one_set_of_slots(client: Client) -> None:
    east, west = replica(client, "east"), replica(client, "west")
    assert await east.admit("e1", "alice") is True
    assert await west.admit("w1", "bob") is True
    assert await west.admit("w2", "bob") is False  # the fleet's two slots are taken
    assert await east.admit("e2", "alice") is False
    with pytest.raises(ResourceExhausted) as caught:
        await east.admit("e3", "alice")
    assert caught.value.limit == "max_queued_sessions"
    assert (east.active(), east.queued()) == (2, 2)
    # Counts are as of a replica's own last call (they feed metrics); the heartbeat's reap refreshes them.
    assert (west.active(), west.queued()) == (2, 1)
    await west.reap()
    assert (west.active(), west.queued()) == (2, 2)


async def test_a_slot_freed_on_one_replica_goes_to_the_replica_holding_the_next_in_line(client: Client) -> None:
    east, west = replica(client, "east", capacity=1), replica(client, "west", capacity=1)
    await east.admit("running-on-east", "alice")
    await west.admit("queued-on-west", "bob")
    await east.admit("queued-on-east", "alice")

    # East frees the slot; the head of the queue is west's, so east starts nothing...
    assert await east.release("running-on-east", 2.0) == []
    # ...and west collects it on its next release or reap (its heartbeat).
    assert await west.reap() == ["queued-on-west"]
    assert await west.renew("queued-on-west") is True
    assert await west.release("queued-on-west") == []
    assert await east.reap() == ["queued-on-east"]


async def test_every_key_the_scripts_write_is_one_they_name_in_keys(client: Client) -> None:
    # A key a script builds itself is invisible to a cluster's routing: every key must come from KEYS.
    east, west = replica(client, "east", capacity=1, ttl=0.5), replica(client, "west", capacity=1, ttl=0.5)
    await east.admit("running-on-east", "alice")
    await west.admit("queued-on-west", "bob")
    await east.release("running-on-east", 2.0)  # promotes west's discussion into the inbox, addressed to west
    await east.admit("queued-on-east", "carol")
    await east.adopt("adopted", "dave")

    written = {key.decode() async for key in client.scan_iter(match="*")}

    assert written and written <= set(east._keys), written - set(east._keys)
    assert await client.hget("{rt:adm}:inbox", "queued-on-west") == b"west"


async def test_a_dead_replicas_queue_places_are_dropped(client: Client) -> None:
    survivor = replica(client, "survivor", capacity=1, ttl=1.0)
    doomed = replica(client, "doomed", capacity=1, ttl=1.0)
    await survivor.admit("running", "alice")
    await doomed.admit("stranded", "bob")
    await survivor.admit("next", "alice")

    for _ in range(3):  # the survivor's heartbeat keeps its lease; the doomed replica never calls again
        await asyncio.sleep(0.5)
        assert await survivor.renew("running") is True
        await survivor.reap()
    assert survivor.queued() == 1

    assert await survivor.release("running") == ["next"]


async def test_concurrent_admits_from_two_replicas_never_exceed_the_caps(client: Client) -> None:
    east, west = replica(client, "east", capacity=10, max_queued=5), replica(client, "west", capacity=10, max_queued=5)

    async def attempt(number: int) -> str:
        gate = east if number % 2 else west
        try:
            return "admitted" if await gate.admit(f"d{number}", f"p{number % 7}") else "queued"
        except ResourceExhausted:
            return "refused"

    outcomes = await asyncio.gather(*(attempt(n) for n in range(60)))

    assert (outcomes.count("admitted"), outcomes.count("queued"), outcomes.count("refused")) == (10, 5, 45)
    assert (await client.zcard("{rt:adm}:leases"), await client.zcard("{rt:adm}:queue")) == (10, 5)


async def test_leases_run_on_redis_clock(client: Client) -> None:
    gate = replica(client, "east", ttl=30)
    await gate.admit("d1", "alice")

    seconds, microseconds = await client.time()
    expires_ms = await client.zscore("{rt:adm}:leases", "d1")
    assert expires_ms is not None
    assert abs(expires_ms - (seconds * 1000 + microseconds // 1000 + 30_000)) < 1_000
    assert await client.hget("{rt:adm}:leased-count", "alice") == b"1"


async def test_exactly_one_replica_adopts_a_discussion_whose_lease_lapsed(client: Client) -> None:
    dead = replica(client, "dead", capacity=1, ttl=0.5)
    await dead.admit("orphan", "alice")
    survivors = [replica(client, f"survivor-{n}", capacity=1, ttl=0.5) for n in range(4)]
    assert [await s.adopt("orphan", "alice") for s in survivors] == [False] * 4  # still held

    await asyncio.sleep(0.7)  # the dead replica never renewed
    adopted = await asyncio.gather(*(s.adopt("orphan", "alice") for s in survivors))

    assert sorted(adopted) == [False, False, False, True]
    winner = survivors[adopted.index(True)]
    assert await winner.renew("orphan") is True
    # The "dead" replica was only stalled: it learns it lost the discussion and must stop its copy.
    assert await dead.renew("orphan") is False
    assert await winner.renew("orphan") is True


async def test_a_restarted_replica_resuming_a_discussion_takes_its_lease_over(client: Client) -> None:
    before_restart, after_restart = replica(client, "process-1"), replica(client, "process-2")
    await before_restart.admit("resumed", "alice")

    await after_restart.admit_unchecked("resumed", "alice")

    assert await after_restart.renew("resumed") is True
    assert await before_restart.renew("resumed") is False
    assert after_restart.active() == 1
