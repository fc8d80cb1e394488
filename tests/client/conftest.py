"""Fixtures of the client SDK tests: a client on the shared suite, and helpers to check event streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
from roundtable_client import Client, DiscussionStatus, Event, StatusChanged

from tests.suite import Suite, start_suite

MakeSuite = Callable[..., Awaitable[Suite]]
PERSONAS = ("scientist", "economist")


@pytest.fixture
async def client(suite: Suite) -> AsyncIterator[Client]:
    """A Client of the shared suite's session service."""
    async with Client(suite.session_host.address) as running:
        yield running


def assert_whole_stream(events: Sequence[Event], *, first_sequence: int = 1) -> None:
    """Every event once, in order, no gap from first_sequence, and the last one a terminal status."""
    sequences = [event.sequence for event in events]
    assert sequences == list(range(first_sequence, first_sequence + len(events))), sequences
    last = events[-1]
    assert isinstance(last, StatusChanged) and last.status.terminal, last
    assert not any(isinstance(event, StatusChanged) and event.status.terminal for event in events[:-1])


def final_status(events: Sequence[Event]) -> DiscussionStatus:
    """The terminal status a stream ended with."""
    last = events[-1]
    assert isinstance(last, StatusChanged)
    return last.status


PRINCIPAL_CAP = 20


async def warm_up(address: str, count: int = PRINCIPAL_CAP) -> None:
    """Run `count` discussions to the end, so the server's RetryInfo estimates come from real durations.

    A fresh server assumes 30 s a discussion until one finishes, and tells the n-th refused caller
    to come back in n · 30 s / cap (up to two minutes); one that has been running knows better.
    """
    async with Client(address) as client:

        async def one(index: int) -> None:
            _ = [event async for event in client.discuss(f"warm-up {index}", personas=PERSONAS[:1])]

        await asyncio.gather(*(one(index) for index in range(count)))


@pytest.fixture(scope="module")
async def capped_suite(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    """A suite whose per-principal cap is PRINCIPAL_CAP (running plus queued), warmed up."""
    running = await start_suite(
        tmp_path_factory.mktemp("capped"),
        session={"max_concurrent_sessions_per_principal": PRINCIPAL_CAP},
        simulator={"first_token_latency_ms": 100, "tokens_per_second": 200},
    )
    try:
        await warm_up(running.session_host.address)
        yield running
    finally:
        await running.stop()
