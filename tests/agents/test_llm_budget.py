"""The fleet LLM budget's contract: the in-memory and the Redis budget pass one suite (buckets, settle, fairness)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

import pytest
from prometheus_client import REGISTRY

from services.agents.llm_budget import (
    TRANSIT_ALLOWANCE_SECONDS,
    BucketReading,
    BudgetLimits,
    FleetBudget,
    LLMBudget,
    LLMBudgetExhausted,
    MemoryBuckets,
    Reservation,
    UnlimitedBudget,
    build_budget,
)
from services.agents.llm_budget_redis import bucket_key, claims_key, connect
from tests.redis_cluster import layout_url, redis_cluster, redis_cluster_url, redis_url  # noqa: F401  (fixtures)
from tests.redis_server import redis_server  # noqa: F401  (fixture the redis cases use)

BACKEND = "https://llm.example/v1#0123456789ab"
OTHER_BACKEND = "https://other.example/v1#ba9876543210"
_numbers = itertools.count()


class MakeBudget(Protocol):
    """Builds a budget of the kind under test; `name` is its backend's metrics label."""

    def __call__(self, limits: Mapping[str, BudgetLimits], *, name: str = "") -> LLMBudget: ...


def fresh_name() -> str:
    """A metrics label no other test uses (every test shares prometheus_client's registry)."""
    return f"test-backend-{next(_numbers)}"


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def make_budget(request: pytest.FixtureRequest) -> AsyncIterator[MakeBudget]:
    """Builds budgets of one kind (Redis: a real redis-server or a 3-master cluster, emptied), closed at the end."""
    layout = "cluster" if request.param == "redis-cluster" else "single"
    url = "" if request.param == "memory" else layout_url(request, layout)
    built: list[LLMBudget] = []

    def make(limits: Mapping[str, BudgetLimits], *, name: str = "") -> LLMBudget:
        budget = build_budget(limits, redis_url=url, names={backend: name or fresh_name() for backend in limits})
        built.append(budget)
        return budget

    yield make
    for budget in built:
        await budget.close()


def limits(requests_per_minute: int = 0, tokens_per_minute: int = 0) -> dict[str, BudgetLimits]:
    return {BACKEND: BudgetLimits(requests_per_minute, tokens_per_minute)}


def soon(seconds: float) -> float:
    """A deadline `seconds` from now, on the clock reserve() reads."""
    return time.monotonic() + seconds


async def reserve(
    budget: LLMBudget, tokens: int = 0, principal: str = "alice", within: float | None = None
) -> Reservation:
    return await budget.reserve(BACKEND, principal, tokens, None if within is None else soon(within))


async def granted_now(budget: LLMBudget, tokens: int = 0) -> bool:
    """Whether a reserve is granted at once (well before any refill could make room)."""
    try:
        await reserve(budget, tokens, within=0.3)
    except LLMBudgetExhausted:
        return False
    return True


def gauge(name: str, backend: str) -> float:
    return REGISTRY.get_sample_value(name, {"backend": backend}) or 0.0


async def eventually(condition: Callable[[], bool], within_seconds: float = 5.0) -> None:
    deadline = time.monotonic() + within_seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- which budget the configuration gives -----------------------------------------------------------


async def test_build_budget_is_unlimited_without_limits_and_in_memory_without_redis() -> None:
    assert isinstance(build_budget({}), UnlimitedBudget)
    assert isinstance(build_budget({BACKEND: BudgetLimits(0, 0)}, redis_url="redis://127.0.0.1:1/0"), UnlimitedBudget)
    memory = build_budget(limits(requests_per_minute=1))
    assert isinstance(memory, FleetBudget)
    # A backend without an entry in the limits is unlimited: no wait though the other's bucket is empty.
    await reserve(memory)
    assert not await granted_now(memory)
    await memory.reserve(OTHER_BACKEND, "alice", 10**9, soon(0.1))
    await memory.close()


def test_limits_are_never_negative() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        BudgetLimits(-1, 0)


# --- the contract, memory and Redis alike ------------------------------------------------------------


async def test_a_burst_gets_exactly_what_the_bucket_holds_and_the_rest_waits(make_budget: MakeBudget) -> None:
    budget = make_budget(limits(requests_per_minute=20))
    calls = [asyncio.create_task(reserve(budget, principal=f"p{number % 7}")) for number in range(200)]
    await eventually(lambda: sum(call.done() for call in calls) >= 20)
    # One request refills every 3 s: nothing more can be granted in the next half second.
    await asyncio.sleep(0.5)
    assert sum(call.done() for call in calls) == 20
    assert all(call.exception() is None for call in calls if call.done())
    await budget.close()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert sum(isinstance(result, LLMBudgetExhausted) for result in results) == 180, "close() wakes every waiter"


async def test_the_buckets_refill_over_time(make_budget: MakeBudget) -> None:
    budget = make_budget(limits(requests_per_minute=120, tokens_per_minute=6000))
    for _ in range(120):
        await reserve(budget)
    started = time.monotonic()
    await reserve(budget, within=5)  # one request refills every 0.5 s
    assert 0.3 <= time.monotonic() - started < 2.5
    await reserve(budget, tokens=6000, within=5)  # empties the tokens; 100 refill a second
    started = time.monotonic()
    await reserve(budget, tokens=50, within=5)
    assert 0.3 <= time.monotonic() - started < 2.5


async def test_a_burst_from_full_buckets_starts_the_refill_a_transit_allowance_later(make_budget: MakeBudget) -> None:
    # The provider's bucket starts refilling only when our first call reaches it: ours must not run ahead.
    budget = make_budget(limits(tokens_per_minute=6000))  # 100 tokens a second
    await reserve(budget, tokens=6000)
    started = time.monotonic()
    await asyncio.sleep(TRANSIT_ALLOWANCE_SECONDS * 0.4)  # 20 tokens would have refilled by now
    with pytest.raises(LLMBudgetExhausted):
        await reserve(budget, tokens=1, within=TRANSIT_ALLOWANCE_SECONDS * 0.3)
    await reserve(budget, tokens=10, within=5)
    assert time.monotonic() - started >= TRANSIT_ALLOWANCE_SECONDS + 0.05


async def test_settle_refunds_what_the_call_did_not_use(make_budget: MakeBudget) -> None:
    budget = make_budget(limits(tokens_per_minute=1000))
    reservation = await reserve(budget, tokens=1000)
    assert not await granted_now(budget, tokens=600)
    await reservation.settle(400)
    assert await granted_now(budget, tokens=590)


async def test_settle_charges_more_when_the_call_used_more(make_budget: MakeBudget) -> None:
    budget = make_budget(limits(tokens_per_minute=1000))
    reservation = await reserve(budget, tokens=500)
    await reservation.settle(900)
    # 1000 − 900 = 100 left: the over-use is charged, so 300 more do not fit.
    assert not await granted_now(budget, tokens=300)
    assert await granted_now(budget, tokens=90)


async def test_a_reservation_larger_than_the_bucket_is_clamped_to_it(make_budget: MakeBudget) -> None:
    budget = make_budget(limits(tokens_per_minute=1000))
    assert await granted_now(budget, tokens=5000)
    assert not await granted_now(budget, tokens=100)


async def test_settle_is_idempotent(make_budget: MakeBudget) -> None:
    budget = make_budget(limits(tokens_per_minute=1000))
    first = await reserve(budget, tokens=600)
    await reserve(budget, tokens=400)
    await first.settle(0)
    await first.settle(0)  # a second settle gives nothing back
    await first.settle(10_000)  # nor charges anything
    assert not await granted_now(budget, tokens=700)
    assert await granted_now(budget, tokens=590)


async def test_a_cancelled_waiter_leaves_and_its_place_goes_to_the_next(make_budget: MakeBudget) -> None:
    name = fresh_name()
    budget = make_budget(limits(requests_per_minute=30), name=name)
    for _ in range(30):
        await reserve(budget)
    exhausted_at = time.monotonic()
    leaving = asyncio.create_task(reserve(budget, principal="alice"))
    staying = asyncio.create_task(reserve(budget, principal="bob"))
    await eventually(lambda: gauge("roundtable_llm_budget_waiting_calls", name) == 2)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert gauge("roundtable_llm_budget_waiting_calls", name) == 1
    await asyncio.wait_for(staying, 10)
    # The first request refilled (after 2 s) went to bob; had alice's departure cost a place, 4 s.
    assert time.monotonic() - exhausted_at < 3.5
    assert gauge("roundtable_llm_budget_waiting_calls", name) == 0


async def test_a_waiter_past_its_deadline_gets_exhausted_and_leaves_the_queue(make_budget: MakeBudget) -> None:
    name = fresh_name()
    budget = make_budget(limits(requests_per_minute=1), name=name)
    await reserve(budget)
    started = time.monotonic()
    with pytest.raises(LLMBudgetExhausted):
        await reserve(budget, within=0.2)
    assert time.monotonic() - started < 1.5
    with pytest.raises(LLMBudgetExhausted):
        await budget.reserve(BACKEND, "alice", 0, time.monotonic() - 1)  # already past: no wait at all
    assert gauge("roundtable_llm_budget_waiting_calls", name) == 0


async def test_cool_down_pauses_every_call_and_never_shortens(make_budget: MakeBudget) -> None:
    name = fresh_name()
    budget = make_budget(limits(requests_per_minute=600), name=name)
    cooldowns_before = REGISTRY.get_sample_value("roundtable_llm_budget_cooldowns_total", {"backend": name}) or 0.0
    await budget.cool_down(BACKEND, 1.0)
    await budget.cool_down(BACKEND, 0.1)  # a shorter Retry-After later does not end the pause early
    started = time.monotonic()
    with pytest.raises(LLMBudgetExhausted):
        await reserve(budget, within=0.5)
    await reserve(budget, within=5)
    assert 0.8 <= time.monotonic() - started < 3
    assert REGISTRY.get_sample_value("roundtable_llm_budget_cooldowns_total", {"backend": name}) == cooldowns_before + 2


async def test_waiting_principals_are_served_round_robin(make_budget: MakeBudget) -> None:
    budget = make_budget(limits(tokens_per_minute=60_000))
    await reserve(budget, tokens=10**9)  # empties the bucket; 1000 tokens refill a second
    order: list[str] = []

    async def call(principal: str) -> None:
        await reserve(budget, tokens=50, principal=principal)
        order.append(principal)

    calls = [asyncio.create_task(call("a")) for _ in range(50)]
    await asyncio.sleep(0.05)  # a's 50 queue first
    calls += [asyncio.create_task(call("b")) for _ in range(5)]
    try:
        await eventually(lambda: len(order) >= 12, within_seconds=15)
        assert order[:12].count("b") == 5, "".join(order[:12])
    finally:
        await budget.close()
        await asyncio.gather(*calls, return_exceptions=True)


async def test_metrics_show_reserved_remaining_and_waiting(make_budget: MakeBudget) -> None:
    name = fresh_name()
    budget = make_budget(limits(requests_per_minute=10, tokens_per_minute=1000), name=name)
    waits_before = REGISTRY.get_sample_value("roundtable_llm_budget_wait_seconds_count") or 0.0
    reservation = await reserve(budget, tokens=300)
    assert gauge("roundtable_llm_budget_reserved_tokens", name) == 300
    assert gauge("roundtable_llm_budget_remaining_tokens", name) == pytest.approx(700, abs=5)
    assert gauge("roundtable_llm_budget_remaining_requests", name) == pytest.approx(9, abs=0.1)
    await reservation.settle(100)
    assert gauge("roundtable_llm_budget_reserved_tokens", name) == 0
    waiting = asyncio.create_task(reserve(budget, tokens=1000))
    await eventually(lambda: gauge("roundtable_llm_budget_waiting_calls", name) == 1)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert gauge("roundtable_llm_budget_waiting_calls", name) == 0
    assert REGISTRY.get_sample_value("roundtable_llm_budget_wait_seconds_count") == waits_before + 2


async def test_reserve_after_close_is_exhausted(make_budget: MakeBudget) -> None:
    budget = make_budget(limits(requests_per_minute=10))
    await budget.close()
    with pytest.raises(LLMBudgetExhausted):
        await reserve(budget)


# --- Redis: one budget for the fleet -------------------------------------------------------------------


async def test_two_replicas_share_one_quota_and_one_cooldown(redis_url: str) -> None:  # noqa: F811
    # Two budgets with their own connections: two agent replicas.
    first = build_budget(limits(requests_per_minute=20), redis_url=redis_url)
    second = build_budget(limits(requests_per_minute=20), redis_url=redis_url)
    try:
        calls = [asyncio.create_task(reserve(budget)) for budget in (first, second) for _ in range(30)]
        await eventually(lambda: sum(call.done() for call in calls) >= 20)
        await asyncio.sleep(0.5)
        assert sum(call.done() for call in calls) == 20, "the replicas together get what one bucket holds"
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await first.close()
        await second.close()

    first = build_budget(limits(requests_per_minute=600), redis_url=redis_url)
    second = build_budget(limits(requests_per_minute=600), redis_url=redis_url)
    try:
        await first.cool_down(BACKEND, 1.0)
        started = time.monotonic()
        await reserve(second, within=5)
        assert time.monotonic() - started >= 0.8, "a 429 seen by one replica pauses the other"
    finally:
        await first.close()
        await second.close()


async def test_redis_keys_are_hash_tagged_per_backend_and_expire(redis_url: str) -> None:  # noqa: F811
    budget = build_budget(limits(requests_per_minute=60, tokens_per_minute=6000), redis_url=redis_url)
    client = connect(redis_url)
    try:
        await reserve(budget, tokens=100)
        key = bucket_key("roundtable", BACKEND)
        assert key.startswith("{roundtable:llm-budget:") and "}:buckets" in key
        assert BACKEND not in key
        assert await client.keys("*") == [key.encode()]
        # Full again after the transit allowance and a second (one request, 100 tokens refill at 1/s and
        # 100/s), plus a second of slack.
        assert 0 < await client.pttl(key) <= (TRANSIT_ALLOWANCE_SECONDS + 2) * 1000 + 100
        await budget.cool_down(BACKEND, 30)
        assert 29_000 < await client.pttl(key) <= 31_100, "a cooldown keeps the key until it ends"
    finally:
        await budget.close()
        await client.aclose()


# 200 tokens a second: a 400-token head needs 2 s of refill, a 150-token call 0.75 s.
STREAM_TPM = 12_000
SMALL_TOKENS = 150


async def stream_of_small_calls(budget: LLMBudget, count: int) -> tuple[list[asyncio.Task[Reservation]], list[float]]:
    """`count` small calls from eight principals queued on `budget`, and the times (monotonic) of their grants."""
    granted_at: list[float] = []

    async def call(number: int) -> Reservation:
        reservation = await reserve(budget, tokens=SMALL_TOKENS, principal=f"p{number % 8}")
        granted_at.append(time.monotonic())
        return reservation

    return [asyncio.create_task(call(number)) for number in range(count)], granted_at


async def test_a_large_call_on_one_replica_is_not_starved_by_small_calls_on_another(redis_url: str) -> None:  # noqa: F811
    # Replica B's thirty small calls would keep taking every 150 tokens the refill brings for 22 s; replica A's
    # single 400-token call must be served once the refill has brought 400 (plus one small grant), not then.
    replica_a = build_budget(limits(tokens_per_minute=STREAM_TPM), redis_url=redis_url)
    replica_b = build_budget(limits(tokens_per_minute=STREAM_TPM), redis_url=redis_url)
    await reserve(replica_b, tokens=10**9)  # empties the bucket
    small_calls, small_granted_at = await stream_of_small_calls(replica_b, 30)
    try:
        await asyncio.sleep(1.0)  # B's stream is under way
        asked = time.monotonic()
        await reserve(replica_a, tokens=400, principal="light", within=6)
        waited = time.monotonic() - asked
        # 2 s of refill for the 400 tokens, 0.75 s for the small grant that may have just taken what was there.
        assert waited < 2.75 + 1.5, waited
        # And B is not starved in turn: its stream goes on at the refill's pace once A has been served.
        served = time.monotonic()
        await eventually(lambda: sum(at > served for at in small_granted_at) >= 3, within_seconds=2.25 + 2)
    finally:
        await replica_a.close()
        await replica_b.close()
        await asyncio.gather(*small_calls, return_exceptions=True)


async def test_a_replica_that_dies_waiting_does_not_block_the_fleet_for_long(redis_url: str) -> None:  # noqa: F811
    # A's 2,000-token head needs 10 s of refill; while it waits, B's small calls hold back for it. A dies
    # (its budget closes without taking): within a few seconds B is served again, not after those 10 s.
    replica_a = build_budget(limits(tokens_per_minute=STREAM_TPM), redis_url=redis_url)
    replica_b = build_budget(limits(tokens_per_minute=STREAM_TPM), redis_url=redis_url)
    await reserve(replica_b, tokens=10**9)  # empties the bucket
    large = asyncio.create_task(reserve(replica_a, tokens=2000, principal="light"))
    await asyncio.sleep(0.5)  # A's head has asked and waits
    small_calls, small_granted_at = await stream_of_small_calls(replica_b, 10)
    try:
        await asyncio.sleep(2.0)
        assert small_granted_at == [], "while A waits for room, B's calls leave it to A"
        await replica_a.close()
        died = time.monotonic()
        await eventually(lambda: len(small_granted_at) >= 1, within_seconds=6)
        # A's claim lapses within twice the longest wait it was told (1 s) plus a second; a live claim would
        # have held B back until the bucket held 2,150 tokens, 10.75 s after it was emptied.
        assert small_granted_at[0] - died < 4.0, small_granted_at[0] - died
    finally:
        await replica_b.close()
        await asyncio.gather(large, *small_calls, return_exceptions=True)


async def test_the_claims_of_waiting_replicas_share_the_buckets_slot_and_expire(redis_url: str) -> None:  # noqa: F811
    replica_a = build_budget(limits(tokens_per_minute=STREAM_TPM), redis_url=redis_url)
    replica_b = build_budget(limits(tokens_per_minute=STREAM_TPM), redis_url=redis_url)
    client = connect(redis_url)
    try:
        await reserve(replica_b, tokens=10**9)
        with pytest.raises(LLMBudgetExhausted):
            await reserve(replica_a, tokens=400, within=0.3)
        key = claims_key("roundtable", BACKEND)
        assert key.split("}")[0] == bucket_key("roundtable", BACKEND).split("}")[0], "one hash slot on a cluster"
        assert len(await client.hgetall(key)) == 2, "A's claim and the sequence"
        # Twice the longest sleep (1 s) plus the 1 s margin, plus the key's second of slack.
        assert 0 < await client.pttl(key) <= 4_100
        # A gave up: its claim lapses, and B (asking for as much) is served by the refill alone.
        await reserve(replica_b, tokens=400, within=2.0 + TRANSIT_ALLOWANCE_SECONDS + 1.5)
    finally:
        await replica_a.close()
        await replica_b.close()
        await client.aclose()


async def test_a_principal_starting_to_wait_is_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    budget = build_budget(limits(requests_per_minute=1))
    await reserve(budget)
    with caplog.at_level(logging.DEBUG, logger="services.agents.llm_budget"):
        with pytest.raises(LLMBudgetExhausted):
            await reserve(budget, principal="light", within=0.1)
    await budget.close()
    assert any("'light' starts waiting" in record.getMessage() for record in caplog.records), caplog.text


class CountingBuckets(MemoryBuckets):
    """MemoryBuckets that count the takes asked of them: the store round trips a Redis budget would make."""

    def __init__(self) -> None:
        super().__init__()
        self.takes = 0

    async def take(self, backend: str, limits: BudgetLimits, tokens: int) -> BucketReading:
        self.takes += 1
        return await super().take(backend, limits, tokens)


async def test_only_the_head_of_the_queue_asks_the_store() -> None:
    store = CountingBuckets()
    budget = FleetBudget(store, limits(tokens_per_minute=60_000), names={BACKEND: fresh_name()})
    await reserve(budget, tokens=10**9)  # empties the bucket; 1000 tokens (ten calls) refill a second
    granted: list[Reservation] = []

    async def call(number: int) -> None:
        granted.append(await reserve(budget, tokens=100, principal=f"p{number % 10}"))

    calls = [asyncio.create_task(call(number)) for number in range(100)]
    try:
        await eventually(lambda: len(granted) >= 10, within_seconds=15)
        takes, grants = store.takes, len(granted)
    finally:
        await budget.close()
        await asyncio.gather(*calls, return_exceptions=True)
    # Each grant costs one take and each wake-up (about one per grant here) another; a hundred waiters
    # polling on their own would have cost a hundred takes per refill.
    assert takes <= 1 + 2 * grants + 5, (takes, grants)
