"""kill -9 of the session replica serving a stream (2 replicas behind Envoy, state in Redis): the iterator goes
on, and the caller gets every event exactly once, sequences gapless, ending with the terminal status."""

from __future__ import annotations

import logging
import pathlib
import time
from collections.abc import AsyncIterator

import pytest
from roundtable_client import Client, DiscussionStatus, Event, Retry, RoundCompleted

from services.cli.replicas import Fleet
from tests.client.conftest import PERSONAS, assert_whole_stream, final_status
from tests.scaleout.conftest import fleet_options, require_tools
from tests.scaleout.test_scaleout import SLOW, client, simulator

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def fleet(tmp_path: pathlib.Path) -> AsyncIterator[Fleet]:
    """2 session + 2 agent replicas behind Envoy on Redis (the scale-out tests' fleet), for one test that kills."""
    require_tools()
    async with Fleet.start(fleet_options(tmp_path)) as running:
        yield running


async def test_kill_9_of_the_replica_serving_the_stream_is_invisible_to_the_caller(fleet: Fleet) -> None:
    await simulator(fleet, "/_sim/config", SLOW)
    retries: list[Retry] = []
    async with Client(fleet.session_address, on_retry=retries.append) as sdk:
        created = await sdk.create("Outlive your replica", personas=PERSONAS, rounds=2)
        async with client(fleet.session_address) as probe:  # the replica Envoy sends this discussion's calls to
            _, owner_id = await probe.get(created.discussion_id)
        victim = fleet.replica(owner_id)
        events: list[Event] = []
        killed_at_sequence = 0
        killed = 0.0
        async for event in sdk.events(created.discussion_id):
            events.append(event)
            if isinstance(event, RoundCompleted) and event.round == 1:  # mid-discussion, the stream open
                await fleet.kill(victim)
                killed, killed_at_sequence = time.monotonic(), event.sequence
        took_seconds = time.monotonic() - killed
    assert killed_at_sequence, "round 1 never completed"
    assert not victim.alive
    assert_whole_stream(events)
    assert final_status(events) == DiscussionStatus.COMPLETED
    reopened = [retry for retry in retries if retry.method == "StreamDiscussion"]
    assert reopened, "the stream never broke: the kill hit the wrong replica"
    logger.warning(
        "kill -9 of %s at sequence %d: the stream reopened %d time(s) (%s), every one of %d events once, "
        "COMPLETED %.1f s after the kill",
        owner_id,
        killed_at_sequence,
        len(reopened),
        ", ".join(sorted({retry.code.name for retry in reopened})),
        len(events),
        took_seconds,
    )
