"""Admission as a component: leases that lapse, a FIFO queue, per-principal caps, retry estimates.

Every case runs on MemoryAdmission and on RedisAdmission against a real redis-server and a real Redis Cluster.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from services.session.admission import (
    MAX_RETRY_AFTER_SECONDS,
    MIN_RETRY_AFTER_SECONDS,
    Admission,
    MemoryAdmission,
    WaitingCallers,
)
from services.session.redis.admission import RedisAdmission
from services.session.redis.connection import Client, connect
from services.shared.errors import ResourceExhausted
from tests.redis_cluster import layout_url, redis_cluster, redis_cluster_url  # noqa: F401  (fixtures)
from tests.redis_server import redis_server  # noqa: F401  (fixture the redis cases use)

_prefixes = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Gates:
    """Builds admissions of one kind, and lets time pass for them."""

    kind: str
    client: Client | None = None
    clock: Clock = field(default_factory=Clock)

    def make(
        self, capacity: int = 2, max_queued: int = 2, per_principal: int = 10, lease_ttl_seconds: float = 30
    ) -> Admission:
        if self.client is None:
            return MemoryAdmission(
                capacity=capacity,
                max_queued=max_queued,
                max_per_principal=per_principal,
                lease_ttl_seconds=lease_ttl_seconds,
                clock=self.clock,
            )
        return RedisAdmission(
            self.client,
            capacity=capacity,
            max_queued=max_queued,
            max_per_principal=per_principal,
            lease_ttl_seconds=lease_ttl_seconds,
            key_prefix=f"t{next(_prefixes)}",
        )

    async def advance(self, seconds: float) -> None:
        """Memory: move the injected clock. Redis: leases run on Redis' clock, so really wait."""
        if self.client is None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def gates(request: pytest.FixtureRequest) -> AsyncIterator[Gates]:
    """A builder of admissions of each kind (Redis: one redis-server, and a 3-master cluster)."""
    if request.param == "memory":
        yield Gates("memory")
        return
    client = connect(layout_url(request, "cluster" if request.param == "redis-cluster" else "single"))
    yield Gates("redis", client=client)
    await client.aclose()


async def test_slots_then_queue_then_refusal_naming_the_limit(gates: Gates) -> None:
    gate = gates.make()
    assert [await gate.admit(f"d{i}", "alice") for i in range(4)] == [True, True, False, False]
    with pytest.raises(ResourceExhausted) as caught:
        await gate.admit("d4", "alice")
    assert caught.value.limit == "max_queued_sessions"
    assert caught.value.retry_after_seconds > 0
    assert (gate.active(), gate.queued()) == (2, 2)


async def test_queued_discussions_are_admitted_in_arrival_order(gates: Gates) -> None:
    gate = gates.make(capacity=1, max_queued=3)
    for name in ("first", "q1", "q2", "q3"):
        await gate.admit(name, "alice")
    assert await gate.release("first", duration_seconds=5) == ["q1"]
    assert await gate.release("q1") == ["q2"]
    assert await gate.release("q3") == []  # leaving the queue frees no slot
    assert await gate.release("q2") == []
    assert (gate.active(), gate.queued()) == (0, 0)


async def test_a_lease_that_is_not_renewed_lapses_and_its_slot_is_reused(gates: Gates) -> None:
    # Memory: a 30 s ttl on the injected clock. Redis: a 1 s ttl in real time, with margins for a busy machine.
    ttl, renew_after, still_held_after, lapsed_after = (30, 29, 29, 2) if gates.kind == "memory" else (1, 0.5, 0.5, 0.7)
    gate = gates.make(capacity=1, max_queued=1, lease_ttl_seconds=ttl)
    assert await gate.admit("crashed-runner", "alice")
    assert not await gate.admit("waiting", "bob")
    await gates.advance(renew_after)
    assert await gate.renew("crashed-runner") is True  # renewed in time: still held
    await gates.advance(still_held_after)
    assert await gate.reap() == []
    await gates.advance(lapsed_after)  # more than a ttl since the last renewal: the runner is gone
    assert await gate.reap() == ["waiting"]
    assert await gate.renew("crashed-runner") is False
    assert await gate.renew("waiting") is True


async def test_a_principal_cannot_hold_more_than_its_share(gates: Gates) -> None:
    gate = gates.make(capacity=10, max_queued=10, per_principal=3)
    for i in range(3):
        await gate.admit(f"a{i}", "alice")
    with pytest.raises(ResourceExhausted) as caught:
        await gate.admit("a3", "alice")
    assert caught.value.limit == "max_concurrent_sessions_per_principal"
    assert caught.value.subject == "principal:alice"
    assert await gate.admit("b0", "bob")  # others are unaffected
    await gate.release("a0")
    assert await gate.admit("a3", "alice")


async def test_queued_places_count_towards_the_principal_cap_until_they_leave(gates: Gates) -> None:
    gate = gates.make(capacity=1, max_queued=5, per_principal=2)
    await gate.admit("running", "alice")
    await gate.admit("waiting", "alice")
    with pytest.raises(ResourceExhausted):
        await gate.admit("third", "alice")
    await gate.release("waiting")
    assert not await gate.admit("third", "alice")


async def test_retry_estimate_follows_observed_durations_and_the_queue(gates: Gates) -> None:
    gate = gates.make(capacity=2, max_queued=0)
    await gate.admit("a", "x")
    await gate.admit("b", "x")
    for _ in range(30):  # discussions have been taking 4 s
        await gate.release("a", duration_seconds=4.0)
        await gate.admit("a", "x")
    with pytest.raises(ResourceExhausted) as caught:
        await gate.admit("d", "x")
    # Two running, each ~4 s long: one frees about every 2 s.
    assert 1.5 < caught.value.retry_after_seconds < 2.5
    assert caught.value.limit == "max_concurrent_sessions"


async def test_a_renewed_lease_outlives_the_older_ones_that_lapse_around_it(gates: Gates) -> None:
    # The first lease granted is renewed; the two granted after it are not. Exactly those two lapse, and
    # their slots and their principal's share go to the queue in order (MemoryAdmission sweeps leases in
    # expiry order, so this fails if a renewal does not move a lease behind the ones it now outlives).
    ttl, renew_after, others_lapsed_after = (30, 20, 15) if gates.kind == "memory" else (1, 0.6, 0.6)
    gate = gates.make(capacity=3, max_queued=2, per_principal=2, lease_ttl_seconds=ttl)
    assert [await gate.admit(name, "alice" if name == "renewed" else "bob") for name in ("renewed", "b1", "b2")] == [
        True,
        True,
        True,
    ]
    assert [await gate.admit(name, "carol") for name in ("w1", "w2")] == [False, False]
    await gates.advance(renew_after)
    assert await gate.renew("renewed") is True
    await gates.advance(others_lapsed_after)  # b1 and b2 are a ttl old; "renewed" is not
    assert await gate.reap() == ["w1", "w2"]
    assert [await gate.renew(name) for name in ("renewed", "b1", "b2", "w1", "w2")] == [True, False, False, True, True]
    assert (gate.active(), gate.queued()) == (3, 0)
    assert not await gate.admit("b3", "bob")  # bob's lapsed leases no longer count: queued, not refused


async def test_refused_callers_are_told_to_come_back_one_after_another_within_a_bound(gates: Gates) -> None:
    gate = gates.make(capacity=10, max_queued=10, per_principal=2)
    await gate.admit("a0", "alice")
    await gate.admit("a1", "alice")
    delays = []
    for attempt in range(20):
        with pytest.raises(ResourceExhausted) as caught:
            await gate.admit(f"more-{attempt}", "alice")
        delays.append(caught.value.retry_after_seconds)
    # Discussions assumed 30 s long, alice holds 2: one of hers ends every 15 s. The n-th waiting caller
    # is told n of those, not all the same moment (a thundering herd on the one slot that frees).
    assert delays[:3] == pytest.approx([15.0, 30.0, 45.0])
    assert delays == sorted(delays)
    assert delays[-1] == MAX_RETRY_AFTER_SECONDS

    full = gates.make(capacity=1, max_queued=0)
    await full.admit("running", "bob")
    told = []
    for attempt in range(3):
        with pytest.raises(ResourceExhausted) as caught:
            await full.admit(f"turned-away-{attempt}", "carol")
        told.append(caught.value.retry_after_seconds)
    assert told == pytest.approx([30.0, 60.0, 90.0])


def test_a_caller_whose_return_time_passed_no_longer_counts_as_waiting() -> None:
    clock = Clock()
    waiting = WaitingCallers(clock)
    assert [waiting.retry_after("global", 2.0) for _ in range(3)] == [2.0, 4.0, 6.0]
    clock.now += 4.0  # the first two came back (and were served or refused anew)
    assert waiting.retry_after("global", 2.0) == 4.0
    assert waiting.retry_after("global", 2.0, ahead=10) == 26.0  # ten queued ahead, two waiting: the 13th
    assert waiting.retry_after("principal:x", 0.01) == MIN_RETRY_AFTER_SECONDS
