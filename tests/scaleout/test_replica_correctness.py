"""Correctness with more than one replica (issue 12, items 4, 7, 6): 2 session replicas on Redis behind Envoy.

A cancel reaches the owner from any replica; a follower on any replica gets every event up to the
terminal one; the monitor counts the fleet's running discussions and its capacity once.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from services.cli.replicas import Fleet
from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.gen.roundtable.session.v1 import session_pb2
from tests.scaleout.conftest import fleet_options, require_tools
from tests.scaleout.test_scaleout import COMPLETED, PERSONAS, TERMINAL, client, simulator

logger = logging.getLogger(__name__)

CANCELLED = session_pb2.DISCUSSION_STATUS_CANCELLED
# Longer than the follower's store poll (2 s): a follower that ends on the finished document alone
# has given up before the terminal event reaches the log.
TERMINAL_EVENT_DELAY_SECONDS = 3.0
CAPACITY = 500  # fleet_options' --max-concurrent-sessions: one cap for the whole fleet (Redis admission)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def slow_terminal_fleet(tmp_path: pathlib.Path) -> AsyncIterator[Fleet]:
    """A fleet whose owners pause between saving a finished document and appending its terminal event."""
    require_tools()
    options = fleet_options(tmp_path)
    session_args = (*options.session_args, "--terminal-event-delay-seconds", str(TERMINAL_EVENT_DELAY_SECONDS))
    async with Fleet.start(fleet_options(tmp_path, session_args=session_args)) as running:
        yield running


async def test_a_follower_on_the_other_replica_gets_the_terminal_event_even_when_it_lags_the_document(
    slow_terminal_fleet: Fleet,
) -> None:
    """Item 7: the far stream must not end on the finished document before the log's terminal event."""
    fleet = slow_terminal_fleet
    await simulator(fleet, "/_sim/config", {"first_token_latency_ms": 100, "tokens_per_second": 200})
    owner, other = fleet.session_replicas
    async with client(owner.address) as at_owner, client(other.address) as elsewhere:
        discussion_id, served = await at_owner.create("The last word arrives everywhere", rounds=1)
        assert served == owner.instance_id
        (far, _), (near, _) = await asyncio.gather(elsewhere.stream(discussion_id), at_owner.stream(discussion_id))
    near_events = [event for _, event in near]
    far_events = [event for _, event in far]
    assert near_events[-1].status_changed.status == COMPLETED
    assert far_events == near_events, (
        f"the far stream ended at sequence {far_events[-1].sequence} "
        f"({far_events[-1].WhichOneof('event')}), the owner's at {near_events[-1].sequence}"
    )


@pytest.fixture(scope="module")
async def module_fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    """One fleet for the cancel and fleet-figure tests."""
    require_tools()
    async with Fleet.start(fleet_options(tmp_path_factory.mktemp("fleet"))) as running:
        yield running


async def test_a_cancel_through_the_replica_that_does_not_run_it_cancels_within_a_second(
    module_fleet: Fleet,
) -> None:
    """Item 4: the non-owner answers as the owner would: CANCELLED now, FAILED_PRECONDITION once finished."""
    fleet = module_fleet
    await simulator(fleet, "/_sim/config", {"first_token_latency_ms": 1500, "tokens_per_second": 16})
    owner, other = fleet.session_replicas
    async with client(owner.address) as at_owner, client(other.address) as elsewhere:
        discussion_id, served = await at_owner.create("Cancelled from afar", rounds=2)
        assert served == owner.instance_id
        await at_owner.wait_for(
            [discussion_id], lambda doc: doc.status == session_pb2.DISCUSSION_STATUS_RUNNING, 10, "running"
        )
        started = time.monotonic()
        cancelled = await elsewhere.stub.CancelDiscussion(
            session_pb2.CancelDiscussionRequest(discussion_id=discussion_id), timeout=10
        )
        cancel_seconds = time.monotonic() - started
        logger.info("cancelled through the other replica in %.3f s", cancel_seconds)
        assert cancelled.status == CANCELLED, session_pb2.DiscussionStatus.Name(cancelled.status)
        assert cancelled.discussion_id == discussion_id
        assert cancel_seconds < 1.5, f"the cancel took {cancel_seconds:.2f} s"
        # The owner ended it: its own copy and the event log say CANCELLED, and its stream ends there.
        at_owner_doc, _ = await at_owner.get(discussion_id)
        assert at_owner_doc.status == CANCELLED
        events, _ = await at_owner.stream(discussion_id, deadline_seconds=5)
        assert events[-1][1].status_changed.status == CANCELLED
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await elsewhere.stub.CancelDiscussion(
                session_pb2.CancelDiscussionRequest(discussion_id=discussion_id), timeout=10
            )
        assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_cancel_through_envoy_without_a_session_id_reaches_the_owner(module_fleet: Fleet) -> None:
    """Item 4, as `roundtable cancel` does it: created and cancelled through Envoy, wherever each call lands."""
    fleet = module_fleet
    await simulator(fleet, "/_sim/config", {"first_token_latency_ms": 1500, "tokens_per_second": 16})
    async with client(fleet.session_address) as api:
        ids = []
        for index in range(4):  # some land on each replica: every cancel must work wherever it lands
            created = await api.stub.CreateDiscussion(
                session_pb2.CreateDiscussionRequest(topic=f"cancel {index}", personas=PERSONAS, rounds=2), timeout=10
            )
            ids.append(created.discussion_id)
        for discussion_id in ids:
            cancelled = await api.stub.CancelDiscussion(
                session_pb2.CancelDiscussionRequest(discussion_id=discussion_id), timeout=10
            )
            assert cancelled.status == CANCELLED


async def test_the_monitor_counts_the_fleets_running_discussions_and_its_capacity_once(module_fleet: Fleet) -> None:
    """Item 6: three discussions running on two replicas read as three, against one fleet-wide cap."""
    fleet = module_fleet
    await simulator(fleet, "/_sim/config", {"first_token_latency_ms": 4000, "tokens_per_second": 16})
    first, second = fleet.session_replicas
    async with (
        client(first.address) as at_first,
        client(second.address) as at_second,
        grpc.aio.insecure_channel(fleet.monitor_address) as channel,
    ):
        ids = [
            (await at_first.create("counted once, a"))[0],
            (await at_first.create("counted once, b"))[0],
            (await at_second.create("counted once, c"))[0],
        ]
        monitor: monitor_pb2_grpc.MonitorServiceAsyncStub = monitor_pb2_grpc.MonitorServiceStub(channel)
        seen: list[tuple[int, int]] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # reports come every 2 s
            stats = await monitor.GetConcurrencyStats(monitor_pb2.GetConcurrencyStatsRequest(), timeout=5)
            seen.append((stats.active_sessions, stats.session_capacity))
            per_replica = {row.instance_id: row.active_sessions for row in stats.instances if row.service == "session"}
            if per_replica == {first.instance_id: 2, second.instance_id: 1}:
                break
            await asyncio.sleep(0.5)
        assert (stats.active_sessions, stats.session_capacity) == (3, CAPACITY), seen[-5:]
        for discussion_id in ids:
            await at_first.stub.CancelDiscussion(
                session_pb2.CancelDiscussionRequest(discussion_id=discussion_id), timeout=10
            )
        done = await at_first.wait_for(ids, lambda doc: doc.status in TERMINAL, 10, "finished")
        assert {doc.status for doc in done.values()} == {CANCELLED}
