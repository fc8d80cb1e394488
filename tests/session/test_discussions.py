"""A discussion's life without any server: Discussions over the memory store, memory admission and a fake agents port.

Promotion after every kind of release, resume, adopt, forget, cancel while queued, expiry while running,
timeouts in the queue: what was reached only through real servers before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from google.protobuf.message import Message

from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2
from services.session.admission import MemoryAdmission
from services.session.agents_client import AgentEvents, AgentRunFailed, PersonaInfo, Roster
from services.session.cancel_relay import LocalCancelRelay
from services.session.discussions import (
    AlreadyEnded,
    Discussions,
    IdTaken,
    NewDiscussion,
    UnknownDiscussion,
)
from services.session.stores.memory import MemoryStore
from services.shared.errors import ResourceExhausted, Unavailable

OWNER = "alice"
LEASE_TTL_SECONDS = 0.3


@dataclass
class FakeAgents:
    """The agents port, in memory: each run answers every round at once, unless its topic is held."""

    runs: list[tuple[str, int]] = field(default_factory=list)  # (topic, first round) per call
    released: list[str] = field(default_factory=list)
    held: dict[str, asyncio.Event] = field(default_factory=dict)
    # Topics whose next call fails as a lost replica would (how many times).
    lose_replica: dict[str, int] = field(default_factory=dict)

    def hold(self, topic: str) -> asyncio.Event:
        """Runs of this topic wait (after their first event) until the returned event is set."""
        return self.held.setdefault(topic, asyncio.Event())

    async def run(self, doc: session_pb2.Discussion, principal: str) -> AsyncIterator[AgentEvents]:
        """Each remaining round: started, one delta, completed, round completed, per persona."""
        first_round = doc.completed_rounds + 1
        self.runs.append((doc.topic, first_round))
        for round_number in range(first_round, doc.rounds + 1):
            for agent in doc.personas:
                yield [("agent_started", discussion_pb2.AgentStarted(agent=agent, round=round_number))]
                if self.lose_replica.get(doc.topic, 0) > 0:
                    self.lose_replica[doc.topic] -= 1
                    raise AgentRunFailed("UNAVAILABLE", "connection reset", replica_lost=True)
                if doc.topic in self.held:
                    await self.held[doc.topic].wait()
                # Arrived together, as a lane delivers them: two deltas of one answer, then the answer.
                answer: Message = discussion_pb2.AgentCompleted(
                    agent=agent, round=round_number, text=f"answer on {doc.topic}"
                )
                yield [
                    ("agent_delta", discussion_pb2.AgentDelta(agent=agent, round=round_number, text="answer ")),
                    ("agent_delta", discussion_pb2.AgentDelta(agent=agent, round=round_number, text=f"on {doc.topic}")),
                    ("agent_completed", answer),
                ]
            yield [("round_completed", discussion_pb2.RoundCompleted(round=round_number, completed_agents=1))]

    async def release(self, discussion_id: str) -> None:
        """Remember the release."""
        self.released.append(discussion_id)

    async def roster(self) -> Roster:
        """One persona."""
        return Roster(personas=(PersonaInfo("engineer"),), default_roster=("engineer",))


@dataclass
class Replica:
    """One session replica's discussions, with the parts the test inspects."""

    discussions: Discussions
    store: MemoryStore
    admission: MemoryAdmission
    agents: FakeAgents


class Clock:
    """A monotonic clock the test moves by hand (admission's leases)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def make_replica(
    *,
    capacity: int = 1,
    max_queued: int = 10,
    store: MemoryStore | None = None,
    admission: MemoryAdmission | None = None,
    clock: Callable[[], float] = time.monotonic,
    resume_interrupted: bool = True,
    shared_state: bool = False,
    max_retained: int = 1000,
) -> Replica:
    """Discussions over the memory parts (shared with another replica when given)."""
    store = store or MemoryStore()
    admission = admission or MemoryAdmission(
        capacity=capacity, max_queued=max_queued, max_per_principal=100, lease_ttl_seconds=60, clock=clock
    )
    agents = FakeAgents()
    discussions = Discussions(
        store=store,
        admission=admission,
        agents=agents,
        cancel_relay=LocalCancelRelay(),
        lease_ttl_seconds=LEASE_TTL_SECONDS,
        max_events_per_discussion=10_000,
        max_retained_per_principal=max_retained,
        resume_interrupted=resume_interrupted,
        shared_state=shared_state,
    )
    return Replica(discussions, store, admission, agents)


_ids = iter(range(1, 1_000_000))


def new(
    topic: str, *, rounds: int = 1, ttl_seconds: float = 3600, timeout_seconds: float = 0, **kwargs: object
) -> NewDiscussion:
    """A validated request under a fresh store id."""
    return NewDiscussion(
        discussion_id=f"{next(_ids):032x}",
        topic=topic,
        personas=["engineer"],
        rounds=rounds,
        request_id=str(kwargs.get("request_id", "")),
        token_budget=0,
        ttl_seconds=ttl_seconds,
        timeout_seconds=timeout_seconds,
        proposed_id=bool(kwargs.get("proposed_id", False)),
    )


async def status_of(replica: Replica, discussion_id: str) -> int:
    """The discussion's status as its owner reads it."""
    return (await replica.discussions.read(discussion_id, OWNER)).status


async def until(condition: Callable[[], Awaitable[bool]], timeout_seconds: float = 5.0) -> None:
    """Wait until the condition holds (fails the test after the timeout)."""
    async with asyncio.timeout(timeout_seconds):
        while not await condition():  # noqa: ASYNC110 - polling state the test reads
            await asyncio.sleep(0.01)


async def ends(replica: Replica, discussion_id: str, status: int = session_pb2.DISCUSSION_STATUS_COMPLETED) -> None:
    """Wait until the discussion has this (terminal) status."""

    async def reached() -> bool:
        return await status_of(replica, discussion_id) == status

    await until(reached)


@pytest.fixture
async def one_slot() -> AsyncIterator[Replica]:
    replica = make_replica(capacity=1)
    await replica.discussions.start()
    yield replica
    await replica.discussions.close()


async def running_and_queued(replica: Replica) -> tuple[str, str]:
    """A held discussion in the one slot and one waiting behind it."""
    replica.agents.hold("first")
    first, _ = await replica.discussions.create(OWNER, new("first"))
    second, _ = await replica.discussions.create(OWNER, new("second"))
    assert (first.status, second.status) == (
        session_pb2.DISCUSSION_STATUS_RUNNING,
        session_pb2.DISCUSSION_STATUS_QUEUED,
    )
    return first.discussion_id, second.discussion_id


# --- promotion after every kind of release ---------------------------------------------------------------


async def test_the_queued_discussion_runs_when_the_running_one_completes(one_slot: Replica) -> None:
    first, second = await running_and_queued(one_slot)
    one_slot.agents.held["first"].set()
    await ends(one_slot, first)
    await ends(one_slot, second)
    assert [topic for topic, _ in one_slot.agents.runs] == ["first", "second"]

    async def all_released() -> bool:
        return (one_slot.admission.active(), one_slot.admission.queued()) == (0, 0)

    await until(all_released)


async def test_the_queued_discussion_runs_when_the_running_one_is_cancelled(one_slot: Replica) -> None:
    first, second = await running_and_queued(one_slot)
    cancelled = await one_slot.discussions.cancel(first, OWNER)
    assert cancelled.status == session_pb2.DISCUSSION_STATUS_CANCELLED
    assert first in one_slot.agents.released
    await ends(one_slot, second)


async def test_the_queued_discussion_runs_when_the_running_one_is_deleted(one_slot: Replica) -> None:
    first, second = await running_and_queued(one_slot)
    await one_slot.discussions.delete(first, OWNER)
    with pytest.raises(UnknownDiscussion):
        await one_slot.discussions.read(first, OWNER)
    assert await one_slot.store.events_after(first, 0, 10) == []
    assert first in one_slot.agents.released
    await ends(one_slot, second)


async def test_the_queued_discussion_runs_when_the_running_one_fails(one_slot: Replica) -> None:
    one_slot.agents.lose_replica["first"] = 99  # lost on every attempt: the run gives up, FAILED
    one_slot.agents.hold("first")
    first, _ = await one_slot.discussions.create(OWNER, new("first"))
    second, _ = await one_slot.discussions.create(OWNER, new("second"))
    await until(lambda: _ended(one_slot, first.discussion_id), timeout_seconds=15)
    assert await status_of(one_slot, first.discussion_id) == session_pb2.DISCUSSION_STATUS_FAILED
    one_slot.agents.held.clear()
    await ends(one_slot, second.discussion_id)


async def _ended(replica: Replica, discussion_id: str) -> bool:
    return await status_of(replica, discussion_id) not in (
        session_pb2.DISCUSSION_STATUS_RUNNING,
        session_pb2.DISCUSSION_STATUS_QUEUED,
    )


async def test_a_cancel_while_queued_frees_the_place_and_the_discussion_never_runs(one_slot: Replica) -> None:
    _first, second = await running_and_queued(one_slot)
    third, _ = await one_slot.discussions.create(OWNER, new("third"))
    cancelled = await one_slot.discussions.cancel(second, OWNER)
    assert cancelled.status == session_pb2.DISCUSSION_STATUS_CANCELLED
    assert one_slot.admission.queued() == 1
    with pytest.raises(AlreadyEnded):
        await one_slot.discussions.cancel(second, OWNER)
    one_slot.agents.held["first"].set()
    await ends(one_slot, third.discussion_id)
    assert "second" not in [topic for topic, _ in one_slot.agents.runs]


async def test_a_slot_whose_holder_vanished_goes_to_the_queue_when_its_lease_lapses() -> None:
    clock = Clock()
    replica = make_replica(capacity=1, clock=clock)
    await replica.discussions.start()
    try:
        # A holder that never renews (a create whose process died after admit()).
        assert await replica.admission.admit("0" * 32, "ghost")
        waiting, _ = await replica.discussions.create(OWNER, new("waits for the ghost"))
        assert waiting.status == session_pb2.DISCUSSION_STATUS_QUEUED
        clock.now += 61  # past the ghost's lease ttl; the heartbeat reaps it within a third of a ttl
        await ends(replica, waiting.discussion_id)
    finally:
        await replica.discussions.close()


async def test_a_create_whose_write_fails_gives_its_slot_to_the_queue(
    one_slot: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    _first, second = await running_and_queued(one_slot)
    one_slot.agents.held["first"].set()
    await ends(one_slot, second)
    one_slot.agents.hold("third")
    _third, _ = await one_slot.discussions.create(OWNER, new("third"))
    fourth, _ = await one_slot.discussions.create(OWNER, new("fourth"))
    original = one_slot.store.create

    async def broken(owner: str, doc: session_pb2.Discussion) -> session_pb2.Discussion:
        raise RuntimeError("disk full")

    monkeypatch.setattr(one_slot.store, "create", broken)
    with pytest.raises(RuntimeError):
        await one_slot.discussions.create(OWNER, new("never stored"))
    monkeypatch.setattr(one_slot.store, "create", original)
    assert one_slot.admission.queued() == 1  # only the fourth: the failed one left no place behind
    one_slot.agents.held["third"].set()
    await ends(one_slot, fourth.discussion_id)


async def test_a_discussion_promoted_while_it_is_being_stored_still_runs(
    one_slot: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_slot.agents.hold("first")
    first, _ = await one_slot.discussions.create(OWNER, new("first"))
    write = one_slot.store.create

    async def write_after_the_first_ends(owner: str, doc: session_pb2.Discussion) -> session_pb2.Discussion:
        one_slot.agents.held["first"].set()
        await ends(one_slot, first.discussion_id)
        await asyncio.sleep(0.05)  # the first's task frees its slot after its last event
        return await write(owner, doc)

    monkeypatch.setattr(one_slot.store, "create", write_after_the_first_ends)
    second, _ = await one_slot.discussions.create(OWNER, new("second"))
    await ends(one_slot, second.discussion_id)


# --- create: replays, ids, limits ----------------------------------------------------------------------


async def test_a_replayed_create_returns_the_original_and_takes_no_slot(one_slot: Replica) -> None:
    request = new("once", request_id="r-1", proposed_id=True)
    one_slot.agents.hold("once")
    first, created = await one_slot.discussions.create(OWNER, request)
    again, created_again = await one_slot.discussions.create(OWNER, request)
    assert (created, created_again) == (True, False)
    assert again.discussion_id == first.discussion_id
    assert one_slot.admission.active() == 1
    with pytest.raises(IdTaken):  # the same proposed id for another create
        await one_slot.discussions.create(OWNER, dataclasses.replace(request, request_id="r-2"))
    one_slot.agents.held["once"].set()
    await ends(one_slot, first.discussion_id)


async def test_creates_are_refused_while_draining_and_past_the_retention_limit() -> None:
    replica = make_replica(capacity=5, max_retained=1)
    await replica.discussions.start()
    try:
        first, _ = await replica.discussions.create(OWNER, new("kept"))
        with pytest.raises(ResourceExhausted) as refused:
            await replica.discussions.create(OWNER, new("one too many"))
        assert refused.value.limit == "max_retained_discussions_per_principal"
        await replica.discussions.drain(grace_seconds=5)
        with pytest.raises(Unavailable):
            await replica.discussions.create("bob", new("while draining"))
        await ends(replica, first.discussion_id)
    finally:
        await replica.discussions.close()


async def test_others_discussions_are_unknown_to_every_operation(one_slot: Replica) -> None:
    doc, _ = await one_slot.discussions.create(OWNER, new("mine"))
    for operation in (
        one_slot.discussions.read(doc.discussion_id, "mallory"),
        one_slot.discussions.cancel(doc.discussion_id, "mallory"),
        one_slot.discussions.delete(doc.discussion_id, "mallory"),
    ):
        with pytest.raises(UnknownDiscussion):
            await operation
    await ends(one_slot, doc.discussion_id)


# --- follow --------------------------------------------------------------------------------------------


async def test_a_follower_gets_every_event_in_order_up_to_the_terminal_one(one_slot: Replica) -> None:
    one_slot.agents.hold("followed")
    doc, _ = await one_slot.discussions.create(OWNER, new("followed", rounds=2))
    events: list[session_pb2.DiscussionEvent] = []

    async def follow() -> None:
        async for event in one_slot.discussions.follow(doc.discussion_id, 0):
            events.append(event)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    one_slot.agents.held["followed"].set()
    async with asyncio.timeout(5):
        await follower
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].status_changed.status == session_pb2.DISCUSSION_STATUS_COMPLETED
    assert sum(e.WhichOneof("event") == "round_completed" for e in events) == 2
    # The two deltas that arrived together were recorded as one, with the text of both.
    deltas = [e.agent_delta.text for e in events if e.WhichOneof("event") == "agent_delta"]
    assert deltas == ["answer on followed", "answer on followed"]


async def test_a_follower_of_a_deleted_discussion_stops(one_slot: Replica) -> None:
    first, _ = await running_and_queued(one_slot)
    seen: list[int] = []

    async def follow() -> None:
        async for event in one_slot.discussions.follow(first, 0):
            seen.append(event.sequence)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    await one_slot.discussions.delete(first, OWNER)
    async with asyncio.timeout(5):
        await follower
    assert seen  # it saw the start before the record went


# --- the agent replica lost mid-round ---------------------------------------------------------------------


async def test_a_lost_agent_replica_re_runs_the_interrupted_round(one_slot: Replica) -> None:
    one_slot.agents.lose_replica["flaky"] = 1
    doc, _ = await one_slot.discussions.create(OWNER, new("flaky", rounds=2))
    await until(lambda: _ended(one_slot, doc.discussion_id))
    assert await status_of(one_slot, doc.discussion_id) == session_pb2.DISCUSSION_STATUS_COMPLETED
    assert one_slot.agents.runs == [("flaky", 1), ("flaky", 1)]


# --- resume and adopt ----------------------------------------------------------------------------------


async def test_a_restart_resumes_a_suspended_discussion_after_its_completed_rounds() -> None:
    store = MemoryStore()
    first = make_replica(store=store)
    await first.discussions.start()
    doc, _ = await first.discussions.create(OWNER, new("resumed", rounds=2))
    await ends(first, doc.discussion_id)
    # As if the process had stopped after round one of two: RUNNING, one round done, round two missing.
    stored = await store.get(doc.discussion_id)
    assert stored is not None
    stored.status = session_pb2.DISCUSSION_STATUS_RUNNING
    stored.completed_rounds = 1
    del stored.results[1:]
    stored.ClearField("completed_agents")
    await store.save(stored)
    await first.discussions.close()

    restarted = make_replica(store=store)
    await restarted.discussions.start()
    try:
        await ends(restarted, doc.discussion_id)
        assert restarted.agents.runs == [("resumed", 2)]  # only the round that was missing
    finally:
        await restarted.discussions.close()


async def test_a_restart_without_resume_marks_leftovers_interrupted_and_re_queues_queued_ones() -> None:
    store = MemoryStore()
    first = make_replica(store=store)
    await first.discussions.start()
    first.agents.hold("cut short")
    running, _ = await first.discussions.create(OWNER, new("cut short"))
    queued, _ = await first.discussions.create(OWNER, new("still waiting"))
    await first.discussions.drain(grace_seconds=0)  # SUSPEND: both stay unfinished in the store
    await first.discussions.close()

    restarted = make_replica(store=store, resume_interrupted=False)
    await restarted.discussions.start()
    try:
        assert await status_of(restarted, running.discussion_id) == session_pb2.DISCUSSION_STATUS_INTERRUPTED
        await ends(restarted, queued.discussion_id)  # a queued one goes back in line and runs
        assert [topic for topic, _ in restarted.agents.runs] == ["still waiting"]
    finally:
        await restarted.discussions.close()


async def test_a_replica_adopts_a_running_discussion_whose_replica_died() -> None:
    clock = Clock()
    store = MemoryStore()
    admission = MemoryAdmission(capacity=2, max_queued=0, max_per_principal=10, lease_ttl_seconds=60, clock=clock)
    dead = make_replica(store=store, admission=admission, shared_state=True)
    await dead.discussions.start()
    dead.agents.hold("orphan")
    doc, _ = await dead.discussions.create(OWNER, new("orphan"))
    await dead.discussions.close()  # stops renewing: as a replica killed with -9, its task is simply gone
    task = dead.discussions._running[doc.discussion_id].task
    assert task is not None
    task.cancel()  # not a stop: nothing is recorded, the store still says RUNNING

    survivor = make_replica(store=store, admission=admission, shared_state=True)
    await survivor.discussions.start()
    try:
        await survivor.discussions.resume_leftovers(running_only=True)
        assert not survivor.discussions.is_here(doc.discussion_id)  # the lease is still live: not an orphan
        clock.now += 61
        await survivor.discussions.resume_leftovers(running_only=True)  # (or its heartbeat does, first)
        await ends(survivor, doc.discussion_id)
        assert survivor.agents.runs == [("orphan", 1)]
    finally:
        await survivor.discussions.close()


# --- expiry and timeouts -------------------------------------------------------------------------------


async def test_expiry_removes_a_queued_discussion_and_its_place_but_not_a_running_one(one_slot: Replica) -> None:
    one_slot.agents.hold("runs long")
    running, _ = await one_slot.discussions.create(OWNER, new("runs long", ttl_seconds=0.2))
    queued, _ = await one_slot.discussions.create(OWNER, new("waits", ttl_seconds=0.2))
    await asyncio.sleep(0.3)
    assert await one_slot.discussions.expire_due() == 1
    with pytest.raises(UnknownDiscussion):
        await one_slot.discussions.read(queued.discussion_id, OWNER)
    assert one_slot.admission.queued() == 0
    assert queued.discussion_id in one_slot.agents.released
    # The running one is past its ttl too, but it is moving: left to its runner.
    assert await status_of(one_slot, running.discussion_id) == session_pb2.DISCUSSION_STATUS_RUNNING
    one_slot.agents.held["runs long"].set()
    await ends(one_slot, running.discussion_id)
    await asyncio.sleep(0.3)
    assert await one_slot.discussions.expire_due() == 1
    with pytest.raises(UnknownDiscussion):
        await one_slot.discussions.read(running.discussion_id, OWNER)
    assert "waits" not in [topic for topic, _ in one_slot.agents.runs]


async def test_a_queued_discussion_past_its_timeout_ends_timed_out_without_running(one_slot: Replica) -> None:
    first, _ = await running_and_queued(one_slot)
    late, _ = await one_slot.discussions.create(OWNER, new("too late", timeout_seconds=0.2))
    await ends(one_slot, late.discussion_id, session_pb2.DISCUSSION_STATUS_TIMED_OUT)
    one_slot.agents.held["first"].set()
    await ends(one_slot, first)
    assert "too late" not in [topic for topic, _ in one_slot.agents.runs]


async def test_a_running_discussion_past_its_timeout_ends_timed_out(one_slot: Replica) -> None:
    one_slot.agents.hold("slow")
    doc, _ = await one_slot.discussions.create(OWNER, new("slow", timeout_seconds=0.2))
    await ends(one_slot, doc.discussion_id, session_pb2.DISCUSSION_STATUS_TIMED_OUT)

    async def slot_freed() -> bool:
        # Its task frees the slot just after recording the terminal status.
        return one_slot.admission.active() == 0

    await until(slot_freed)


async def test_many_discussions_at_once_each_end_with_their_own_answers() -> None:
    replica = make_replica(capacity=20, max_queued=200)
    await replica.discussions.start()
    try:
        docs = await asyncio.gather(*(replica.discussions.create(OWNER, new(f"topic {i}")) for i in range(100)))
        for doc, _ in docs:
            await ends(replica, doc.discussion_id)
            final = await replica.discussions.read(doc.discussion_id, OWNER)
            assert {r.text for r in final.results} == {f"answer on {doc.topic}"}

        async def all_released() -> bool:
            # A discussion's task frees its slot just after its terminal status is recorded.
            return (replica.admission.active(), replica.admission.queued()) == (0, 0)

        await until(all_released)
        assert replica.discussions.running_count() == replica.discussions.queued_count() == 0
    finally:
        await replica.discussions.close()
