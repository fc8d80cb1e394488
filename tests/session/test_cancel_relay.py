"""The cancel relay between session replicas: Redis pub/sub, across idle spells and a Redis restart."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from services.session.cancel_relay import LocalCancelRelay
from services.session.redis.cancel_relay import LISTEN_TIMEOUT_SECONDS, RedisCancelRelay
from services.session.redis.connection import connect
from tests.redis_cluster import LocalRedisCluster, redis_cluster  # noqa: F401  (fixture)
from tests.redis_server import RedisServer, running_redis

# As the session service connects: one Redis command may take at most this long.
REDIS_TIMEOUT_SECONDS = 0.5


class Heard:
    """The discussion ids one replica's handler was given."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.changed = asyncio.Event()

    async def handle(self, discussion_id: str) -> None:
        self.ids.append(discussion_id)
        self.changed.set()

    async def wait_for(self, discussion_id: str, timeout_seconds: float) -> None:
        async with asyncio.timeout(timeout_seconds):
            while discussion_id not in self.ids:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with running_redis() as started:
        yield started


@pytest.fixture(params=["single", "cluster"])
def relay_urls(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Where two replicas' relays connect: one redis-server, or a 3-master cluster named by two different nodes."""
    if request.param == "single":
        with running_redis() as started:
            yield [started.url, started.url]
        return
    cluster: LocalRedisCluster = request.getfixturevalue("redis_cluster")
    cluster.flush()
    yield [cluster.node_url(1), cluster.node_url(2)]


async def started_relay(url: str, heard: Heard) -> RedisCancelRelay:
    relay = RedisCancelRelay(connect(url, timeout_seconds=REDIS_TIMEOUT_SECONDS), key_prefix="test")
    relay.start(heard.handle)
    assert await relay.wait_subscribed(5)
    return relay


async def with_relays(urls: list[str]) -> tuple[list[RedisCancelRelay], list[Heard]]:
    heard = [Heard() for _ in urls]
    return [await started_relay(url, one) for url, one in zip(urls, heard, strict=True)], heard


async def stop_all(relays: list[RedisCancelRelay]) -> None:
    for relay in relays:
        await relay.stop()


async def test_a_request_reaches_every_replica_even_after_an_idle_spell(relay_urls: list[str]) -> None:
    relays, (first, second) = await with_relays(relay_urls)
    try:
        # Idle past both the listen timeout and the command timeout: the subscription must still stand.
        await asyncio.sleep(max(LISTEN_TIMEOUT_SECONDS, REDIS_TIMEOUT_SECONDS) * 2)
        assert await relays[0].request("discussion-a") == 2
        await asyncio.gather(first.wait_for("discussion-a", 2), second.wait_for("discussion-a", 2))
        assert (first.ids, second.ids) == (["discussion-a"], ["discussion-a"])
    finally:
        await stop_all(relays)


async def test_after_a_redis_restart_the_replicas_subscribe_again(server: RedisServer) -> None:
    relays, (first, second) = await with_relays([server.url, server.url])
    try:
        server.stop()
        await asyncio.sleep(1.0)
        server.start()

        async def both_subscribed() -> bool:
            return await relays[0].request("probe") == 2

        async with asyncio.timeout(10):
            while not await both_subscribed():  # noqa: ASYNC110 - waiting for the resubscription
                await asyncio.sleep(0.2)
        assert await relays[1].request("discussion-b") == 2
        await asyncio.gather(first.wait_for("discussion-b", 2), second.wait_for("discussion-b", 2))
    finally:
        await stop_all(relays)


async def test_a_single_replica_has_nobody_to_tell() -> None:
    relay = LocalCancelRelay()
    relay.start(Heard().handle)
    assert await relay.request("discussion-c") == 0
    await relay.stop()
