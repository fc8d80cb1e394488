"""The rate limiter contract on memory (moving window) and Redis (GCRA), and what only the Redis one shows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.session.rate_limit import RateLimiter, WindowRateLimiter
from services.session.redis.connection import Client, connect
from services.session.redis.rate_limit import RedisRateLimiter
from services.shared.errors import ResourceExhausted
from tests.redis_cluster import layout_url, redis_cluster, redis_cluster_url, redis_url  # noqa: F401  (fixtures)
from tests.redis_server import redis_server  # noqa: F401  (fixture)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Client]:  # noqa: F811
    """A client of the shared, emptied redis-server, then of the cluster."""
    opened = connect(redis_url)
    yield opened
    await opened.aclose()


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    """200 units a minute, of each kind."""
    if request.param == "memory":
        yield WindowRateLimiter(200)
        return
    opened = connect(layout_url(request, "cluster" if request.param == "redis-cluster" else "single"))
    yield RedisRateLimiter(opened, 200)
    await opened.aclose()


async def refused(limiter: RateLimiter, principal: str, cost: int) -> ResourceExhausted | None:
    try:
        await limiter.spend(principal, cost)
    except ResourceExhausted as error:
        return error
    return None


async def test_a_burst_spends_exactly_the_allowance_then_names_the_limit(limiter: RateLimiter) -> None:
    outcomes = [await refused(limiter, "alice", 20) for _ in range(15)]

    assert [o is None for o in outcomes] == [True] * 10 + [False] * 5
    error = outcomes[-1]
    assert error is not None
    assert error.limit == "rate_limit_per_minute"
    assert error.subject == "principal:alice"
    assert 0 < error.retry_after_seconds <= 60


async def test_principals_have_their_own_allowance(limiter: RateLimiter) -> None:
    for _ in range(10):
        await limiter.spend("alice", 20)
    assert await refused(limiter, "alice", 1) is not None
    assert await refused(limiter, "bob", 200) is None


async def test_a_call_costing_more_than_the_allowance_is_refused(limiter: RateLimiter) -> None:
    assert await refused(limiter, "alice", 201) is not None
    assert await refused(limiter, "alice", 200) is None


async def test_concurrent_spends_never_overdraw(limiter: RateLimiter) -> None:
    outcomes = await asyncio.gather(*(refused(limiter, "alice", 20) for _ in range(100)))

    assert sum(o is None for o in outcomes) == 10


async def test_redis_units_come_back_continuously(client: Client) -> None:
    limiter = RedisRateLimiter(client, 600)  # one unit every 0.1 s
    await limiter.spend("alice", 600)
    error = await refused(limiter, "alice", 3)
    assert error is not None and 0.2 < error.retry_after_seconds <= 0.3

    await asyncio.sleep(0.35)
    await limiter.spend("alice", 3)


async def test_replicas_share_one_allowance(client: Client, redis_url: str) -> None:  # noqa: F811
    other = connect(redis_url)
    try:
        east, west = RedisRateLimiter(client, 100), RedisRateLimiter(other, 100)
        await east.spend("alice", 60)
        assert await refused(west, "alice", 60) is not None
        await west.spend("alice", 40)
        assert await refused(east, "alice", 1) is not None
    finally:
        await other.aclose()


async def test_an_idle_principal_leaves_nothing_behind(client: Client) -> None:
    await RedisRateLimiter(client, 60_000).spend("alice", 1)  # refills in a millisecond

    await asyncio.sleep(0.05)
    assert await client.keys("rt:rate:*") == []
