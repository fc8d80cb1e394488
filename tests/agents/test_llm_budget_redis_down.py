"""The fleet LLM budget when its Redis stops or hangs: open falls back to this replica's limits, closed refuses."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time

import pytest
from prometheus_client import REGISTRY

from services.agents.llm_budget import BudgetLimits, FleetBudget, LLMBudgetExhausted, LLMBudgetUnavailable, build_budget
from services.agents.llm_budget_redis import FailoverBuckets, RedisBuckets, connect
from tests.redis_server import running_redis

BACKEND = "https://llm.example/v1#0123456789ab"


def soon(seconds: float) -> float:
    return time.monotonic() + seconds


def store_errors(name: str) -> float:
    return REGISTRY.get_sample_value("roundtable_llm_budget_store_errors_total", {"backend": name}) or 0.0


async def test_open_falls_back_to_this_replicas_limits_and_returns_to_redis(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = "redis-down-open"
    errors_before = store_errors(name)
    limits = {BACKEND: BudgetLimits(requests_per_minute=10, tokens_per_minute=0)}
    with running_redis(tmp_path) as server:
        store = FailoverBuckets(
            RedisBuckets(connect(server.url)), "open", names={BACKEND: name}, retry_after_seconds=0.3
        )
        budget = FleetBudget(store, limits, names={BACKEND: name})
        try:
            for _ in range(10):
                await budget.reserve(BACKEND, "alice", 0, soon(1))
            server.stop()
            caplog.set_level(logging.WARNING, logger="services.agents.llm_budget_redis")
            # Redis is gone: the replica budgets alone, from a full bucket of the same limits, and still limits.
            for _ in range(10):
                await budget.reserve(BACKEND, "alice", 0, soon(2))
            assert store.redis_down
            with pytest.raises(LLMBudgetExhausted):
                await budget.reserve(BACKEND, "alice", 0, soon(0.5))
            assert store_errors(name) > errors_before
            outage_warnings = [record for record in caplog.records if "Redis is unavailable" in record.getMessage()]
            assert len(outage_warnings) == 1, "one WARNING per outage, not one per call"

            # Back: after the retry interval the shared bucket (empty since the first ten) decides again.
            server.start()
            await asyncio.sleep(0.4)
            with pytest.raises(LLMBudgetExhausted):
                await budget.reserve(BACKEND, "alice", 0, soon(0.5))
            assert not store.redis_down
        finally:
            await budget.close()


async def test_closed_refuses_every_waiting_call_when_redis_stops(tmp_path: pathlib.Path) -> None:
    limits = {BACKEND: BudgetLimits(requests_per_minute=1, tokens_per_minute=0)}
    with running_redis(tmp_path) as server:
        budget = build_budget(limits, redis_url=server.url, when_redis_down="closed", names={BACKEND: "closed"})
        try:
            await budget.reserve(BACKEND, "alice", 0, soon(1))
            waiting = [asyncio.create_task(budget.reserve(BACKEND, p, 0, soon(30))) for p in ("alice", "bob", "carol")]
            await asyncio.sleep(0.1)
            server.stop()
            # The pump asks Redis again within a second: every waiter learns the budget is unavailable.
            results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 10)
            assert all(isinstance(result, LLMBudgetUnavailable) for result in results), results
            with pytest.raises(LLMBudgetUnavailable):
                await budget.reserve(BACKEND, "alice", 0, soon(5))
        finally:
            await budget.close()


async def test_closed_refuses_when_redis_hangs(tmp_path: pathlib.Path) -> None:
    limits = {BACKEND: BudgetLimits(requests_per_minute=100, tokens_per_minute=0)}
    with running_redis(tmp_path) as server:
        budget = build_budget(limits, redis_url=server.url, when_redis_down="closed", names={BACKEND: "hung"})
        try:
            await budget.reserve(BACKEND, "alice", 0, soon(1))
            server.pause()
            started = time.monotonic()
            try:
                with pytest.raises(LLMBudgetUnavailable):
                    await budget.reserve(BACKEND, "alice", 0, soon(30))
            finally:
                server.resume()
            # Bounded by the client's socket timeout, not by the call's deadline.
            assert time.monotonic() - started < 5
        finally:
            await budget.close()
