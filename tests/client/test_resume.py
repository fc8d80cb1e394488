"""events() resumes by itself: a proxy that cuts the connection mid-stream, and a restart of the session
service mid-discussion, are invisible to the caller — every event once, in order, to the terminal status."""

from __future__ import annotations

import asyncio
import time

from roundtable_client import Client, DiscussionStatus, Event, Retry

from tests.client.conftest import PERSONAS, MakeSuite, assert_whole_stream, final_status
from tests.client.cutting_proxy import cutting_proxy

# About 0.5 s an answer: a 2-round discussion streams for a couple of seconds, long enough to cut it twice.
PACED_SIMULATOR = {"first_token_latency_ms": 300, "tokens_per_second": 100}


async def test_a_proxy_cutting_the_connection_mid_stream_is_invisible(make_suite: MakeSuite) -> None:
    suite = await make_suite(simulator=PACED_SIMULATOR)
    retries: list[Retry] = []
    async with (
        cutting_proxy(suite.session_host.address) as proxy,
        Client(proxy.address, on_retry=retries.append) as client,
    ):
        created = await client.create("Cut me off, twice", personas=PERSONAS, rounds=2)
        events: list[Event] = []
        async for event in client.events(created.discussion_id):
            events.append(event)
            if len(events) in (2, 6):  # mid-stream, while the discussion runs
                proxy.cut()
    assert proxy.cuts == 2
    assert_whole_stream(events)
    assert final_status(events) == DiscussionStatus.COMPLETED
    reopened = [retry for retry in retries if retry.method == "StreamDiscussion"]
    assert len(reopened) >= 2, retries
    assert proxy.connections >= 3


async def test_a_restart_of_the_session_service_mid_discussion_is_invisible(make_suite: MakeSuite) -> None:
    suite = await make_suite(simulator=PACED_SIMULATOR)
    retries: list[Retry] = []
    async with Client(suite.session_host.address, on_retry=retries.append) as client:
        created = await client.create("Survive a restart", personas=PERSONAS, rounds=2)
        events: list[Event] = []
        restarted: asyncio.Task[None] | None = None
        async for event in client.events(created.discussion_id):
            events.append(event)
            if len(events) == 3:
                restarted = asyncio.create_task(suite.restart_session())
        assert restarted is not None
        await restarted
    assert_whole_stream(events)
    assert final_status(events) == DiscussionStatus.COMPLETED
    assert any(retry.method == "StreamDiscussion" for retry in retries), "the stream never broke"


async def test_a_connection_gone_silent_mid_stream_is_found_by_keepalive_and_resumed(make_suite: MakeSuite) -> None:
    """No reset, no FIN: the bytes just stop (a dead peer, a partition). The client's pings go unanswered,
    it drops the connection within its ping timeout (default 10 s after a ping, one every 30 s at least),
    and the stream is reopened on a fresh one."""
    suite = await make_suite(simulator={"first_token_latency_ms": 2000, "tokens_per_second": 100})
    retries: list[Retry] = []
    async with (
        cutting_proxy(suite.session_host.address) as proxy,
        Client(proxy.address, on_retry=retries.append, resume_timeout_seconds=90) as client,
    ):
        created = await client.create("Are you still there?", personas=PERSONAS, rounds=2)
        events: list[Event] = []
        frozen_at = 0.0
        async for event in client.events(created.discussion_id):
            events.append(event)
            if len(events) == 2:
                proxy.freeze()
                frozen_at = time.monotonic()
            if len(events) == 3:
                silent_seconds = time.monotonic() - frozen_at
    assert_whole_stream(events)
    assert final_status(events) == DiscussionStatus.COMPLETED
    assert [retry.code.name for retry in retries if retry.method == "StreamDiscussion"] == ["UNAVAILABLE"]
    assert proxy.cuts == 0 and proxy.connections >= 2
    # Keepalive every 30 s, 10 s to answer, a reopening's backoff: found well before gRPC's own 60 s.
    assert silent_seconds < 45, silent_seconds
