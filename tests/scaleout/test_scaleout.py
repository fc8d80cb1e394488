"""Scale-out, issue 6's done-when list: 2 session + 2 agent replicas behind a real Envoy, state in a real Redis.

Clients mint the discussion id (`secrets.token_hex(16)`) and send it as `x-session-id` on the create
and on every later call, so Envoy hashes every call of a discussion, the create included, onto one
session replica; the session replica names itself in the trailing metadata `x-roundtable-instance`.
Which agent replica holds a discussion's agents: GetAgentStats(session_id) on each agent replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import secrets
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from services.cli.replicas import Fleet
from services.gen.roundtable.agents.v1 import agents_pb2, agents_pb2_grpc
from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from services.session.auth import ANONYMOUS
from services.session.ids import IdScope
from services.session.redis.connection import connect
from services.session.stores.redis import RedisStore
from tests.scaleout.conftest import LEASE_TTL_SECONDS

logger = logging.getLogger(__name__)

SESSION_ID_HEADER = "x-session-id"
INSTANCE_HEADER = "x-roundtable-instance"
PERSONAS = ["scientist", "economist"]
ROUNDS = 2
COMPLETED = session_pb2.DISCUSSION_STATUS_COMPLETED
RUNNING = session_pb2.DISCUSSION_STATUS_RUNNING
TERMINAL = {
    session_pb2.DISCUSSION_STATUS_COMPLETED,
    session_pb2.DISCUSSION_STATUS_FAILED,
    session_pb2.DISCUSSION_STATUS_CANCELLED,
    session_pb2.DISCUSSION_STATUS_TIMED_OUT,
    session_pb2.DISCUSSION_STATUS_INTERRUPTED,
}
# A slow simulator: one answer takes first-token latency + 16 tokens at this pace, about 2.5 s, so a
# 2-round discussion (round 1, round 2, the summary: three answers in a row) runs about 7.5 s.
SLOW = {"first_token_latency_ms": 1500, "tokens_per_second": 16}
SLOW_DISCUSSION_SECONDS = 3 * (1.5 + 16 / 16)
FAST = {"first_token_latency_ms": 50, "tokens_per_second": 400}
MARGIN_SECONDS = 10.0

pytestmark = pytest.mark.timeout(120)


# --- clients -----------------------------------------------------------------------------------------


def status_name(status: int) -> str:
    """DISCUSSION_STATUS_… for messages."""
    return session_pb2.DiscussionStatus.Name(status)  # type: ignore[arg-type]


async def served_by(call: Any) -> str:
    """The instance id the session replica put in the trailing metadata of a finished call."""
    trailers = await call.trailing_metadata()
    return str(dict(trailers or ()).get(INSTANCE_HEADER, ""))


@dataclass
class Client:
    """Session service calls to one address (Envoy or a replica directly), x-session-id on every one."""

    stub: session_pb2_grpc.SessionServiceAsyncStub

    async def create(self, topic: str, *, rounds: int = ROUNDS, deadline_seconds: float = 10.0) -> tuple[str, str]:
        """Create a discussion under an id minted here; (its id, the replica that created it)."""
        session_id = secrets.token_hex(16)
        call = self.stub.CreateDiscussion(
            session_pb2.CreateDiscussionRequest(topic=topic, personas=PERSONAS, rounds=rounds),
            metadata=((SESSION_ID_HEADER, session_id),),
            timeout=deadline_seconds,
        )
        created = await call
        assert created.discussion_id == session_id, (
            "CreateDiscussion did not take the id proposed in x-session-id "
            f"(sent {session_id}, got {created.discussion_id})"
        )
        return created.discussion_id, await served_by(call)

    async def get(self, discussion_id: str, deadline_seconds: float = 5.0) -> tuple[session_pb2.Discussion, str]:
        """The document and the replica that served it."""
        call = self.stub.GetDiscussion(
            session_pb2.GetDiscussionRequest(discussion_id=discussion_id),
            metadata=((SESSION_ID_HEADER, discussion_id),),
            timeout=deadline_seconds,
        )
        return await call, await served_by(call)

    async def stream(
        self, discussion_id: str, after_sequence: int = 0, deadline_seconds: float = 60.0
    ) -> tuple[list[tuple[float, session_pb2.DiscussionEvent]], str]:
        """Every event until the terminal status, each with the monotonic time it arrived; and the replica."""
        call = self.stub.StreamDiscussion(
            session_pb2.StreamDiscussionRequest(discussion_id=discussion_id, after_sequence=after_sequence),
            metadata=((SESSION_ID_HEADER, discussion_id),),
            timeout=deadline_seconds,
        )
        events = [(time.monotonic(), event) async for event in call]
        return events, await served_by(call)

    async def wait_for(
        self, discussion_ids: Iterable[str], done: Any, timeout_seconds: float, what: str
    ) -> dict[str, session_pb2.Discussion]:
        """Poll until done(document) holds for every discussion; their documents then."""
        pending = set(discussion_ids)
        latest: dict[str, session_pb2.Discussion] = {}
        deadline = time.monotonic() + timeout_seconds
        while True:
            for discussion_id in sorted(pending):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    latest[discussion_id], _ = await self.get(discussion_id)
                    if done(latest[discussion_id]):
                        pending.discard(discussion_id)
            if not pending:
                return latest
            if time.monotonic() > deadline:
                states = Counter(status_name(latest[d].status) if d in latest else "unreadable" for d in pending)
                raise AssertionError(f"{len(pending)} discussions not {what} within {timeout_seconds:g} s: {states}")
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def client(address: str) -> AsyncIterator[Client]:
    """A Client on its own channel."""
    async with grpc.aio.insecure_channel(address) as channel:
        yield Client(session_pb2_grpc.SessionServiceStub(channel))


async def agent_holders(fleet: Fleet, discussion_ids: Iterable[str]) -> dict[str, list[str]]:
    """For each discussion, the agent replicas that hold its agent set (asked directly, not through Envoy)."""
    holders: dict[str, list[str]] = defaultdict(list)
    ids = list(discussion_ids)
    # Agent sets are keyed by store ids, scoped to the owner (services/session/ids.py): anonymous here.
    store = await RedisStore.open(connect(fleet.redis_url))
    try:
        scope = IdScope(await store.id_secret())
    finally:
        await store.close()
    for replica in fleet.agent_replicas:
        if not replica.alive:
            continue
        async with grpc.aio.insecure_channel(replica.address) as channel:
            stub: agents_pb2_grpc.AgentServiceAsyncStub = agents_pb2_grpc.AgentServiceStub(channel)
            for discussion_id in ids:
                store_id = scope.store_id(ANONYMOUS, discussion_id)
                stats = await stub.GetAgentStats(agents_pb2.GetAgentStatsRequest(session_id=store_id), timeout=5)
                if stats.session_present:
                    holders[discussion_id].append(replica.instance_id)
    return {discussion_id: holders.get(discussion_id, []) for discussion_id in ids}


# --- the simulator's control endpoints ----------------------------------------------------------------


async def simulator(fleet: Fleet, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST body to) one of the simulator's /_sim/ endpoints."""
    url = fleet.simulator_url + path
    data = None if body is None else json.dumps(body).encode()

    def fetch() -> Any:
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    return await asyncio.to_thread(fetch)


def llm_step(messages: list[dict[str, str]]) -> str:
    """Which step of a discussion an LLM request is: "round 1", "round 2", … or "summary" (see agents/prompts.py)."""
    users = [message["content"] for message in messages if message["role"] == "user"]
    last = users[-1] if users else ""
    if last.startswith("Round "):
        return "round " + last.split(".", 1)[0].split()[1]
    if last.startswith("The panel's final answers"):
        return "summary"
    return "round 1"


# --- documents ----------------------------------------------------------------------------------------


def outcome(doc: session_pb2.Discussion) -> dict[str, Any]:
    """What a user keeps of a discussion: status, every result, the summary, the usage."""
    return {
        "status": status_name(doc.status),
        "personas": list(doc.personas),
        "results": sorted(
            (result.agent, result.round, result.status, result.text, result.error) for result in doc.results
        ),
        "summary": doc.summary,
        "completed_rounds": doc.completed_rounds,
        "usage": (doc.usage.prompt_tokens, doc.usage.completion_tokens, doc.usage.total_tokens),
        "last_sequence": doc.last_sequence,
    }


def completed_results(doc: session_pb2.Discussion) -> dict[tuple[str, int], str]:
    """(agent, round) → text of every completed result."""
    return {
        (result.agent, result.round): result.text
        for result in doc.results
        if result.status == discussion_pb2.AGENT_STATUS_COMPLETED
    }


def assert_whole(doc: session_pb2.Discussion) -> None:
    """COMPLETED with a completed answer from every debater in every round, once each, and a summary."""
    assert doc.status == COMPLETED, f"{doc.discussion_id}: {status_name(doc.status)} {doc.error}"
    debaters = [persona for persona in doc.personas if persona != "主持人"]
    done = Counter((r.agent, r.round) for r in doc.results if r.status == discussion_pb2.AGENT_STATUS_COMPLETED)
    for persona, round_number in itertools.product(debaters, range(1, doc.rounds + 1)):
        assert done[(persona, round_number)] == 1, (doc.discussion_id, persona, round_number, done)
    assert doc.summary, doc.discussion_id


async def create_many(api: Client, count: int, topic: str) -> dict[str, str]:
    """Create `count` discussions at once; discussion id → the session replica that created it."""
    created = await asyncio.gather(*(api.create(f"{topic} #{index} {secrets.token_hex(4)}") for index in range(count)))
    return dict(created)


# --- 1. affinity --------------------------------------------------------------------------------------


async def test_every_call_of_a_discussion_reaches_one_session_and_one_agent_replica(shared_fleet: Fleet) -> None:
    """Create, stream and get, all through Envoy, land on one session replica; the agents on one agent replica."""
    fleet = shared_fleet
    await simulator(fleet, "/_sim/config", FAST)
    async with client(fleet.session_address) as api:
        owners = await create_many(api, 16, "Affinity")
        reached: dict[str, set[str]] = {discussion_id: {owner} for discussion_id, owner in owners.items()}

        async def follow(discussion_id: str) -> None:
            events, instance = await api.stream(discussion_id)
            reached[discussion_id].add(instance)
            assert events[-1][1].status_changed.status == COMPLETED, events[-1][1]
            for _ in range(3):
                _doc, instance = await api.get(discussion_id)
                reached[discussion_id].add(instance)

        await asyncio.gather(*(follow(discussion_id) for discussion_id in owners))

    split = {discussion_id: replicas for discussion_id, replicas in reached.items() if len(replicas) != 1}
    assert not split, f"calls of one discussion reached several session replicas: {split}"
    session_replicas = {replicas.pop() for replicas in reached.values()}
    assert session_replicas == {"session-1", "session-2"}, f"not both session replicas got discussions: {reached}"

    holders = await agent_holders(fleet, owners)
    not_one = {discussion_id: found for discussion_id, found in holders.items() if len(found) != 1}
    assert not not_one, f"agent sets not on exactly one agent replica: {not_one}"
    assert {found[0] for found in holders.values()} == {"agents-1", "agents-2"}, holders
    logger.warning(
        "affinity: session replicas %s, agent replicas %s",
        Counter(owners.values()),
        Counter(found[0] for found in holders.values()),
    )


# --- 2. any replica is correct ------------------------------------------------------------------------


async def test_the_replica_that_does_not_own_a_discussion_serves_the_same_document_and_live_events(
    shared_fleet: Fleet,
) -> None:
    """Get and Stream straight to the non-owning session replica: the same document, the events live."""
    fleet = shared_fleet
    await simulator(fleet, "/_sim/config", {"first_token_latency_ms": 600, "tokens_per_second": 32})
    async with client(fleet.session_address) as api:
        discussion_id, owner = await api.create("Any replica is correct")
    other = next(replica for replica in fleet.session_replicas if replica.instance_id != owner)
    owning = fleet.replica(owner)
    async with client(other.address) as elsewhere, client(owning.address) as at_owner:
        # Both streams open while the discussion has barely started: what follows must arrive live.
        (far, far_instance), (near, near_instance) = await asyncio.gather(
            elsewhere.stream(discussion_id), at_owner.stream(discussion_id)
        )
        await at_owner.wait_for([discussion_id], lambda doc: doc.status in TERMINAL, 10, "finished")
        (far_doc, far_get), (near_doc, near_get) = await asyncio.gather(
            elsewhere.get(discussion_id), at_owner.get(discussion_id)
        )
    assert (far_instance, far_get) == (other.instance_id, other.instance_id)
    assert (near_instance, near_get) == (owner, owner)
    assert [event for _, event in far] == [event for _, event in near], "the two replicas streamed different events"
    kinds = [event.WhichOneof("event") for _, event in far]
    assert kinds[-1] == "status_changed" and far[-1][1].status_changed.status == COMPLETED, kinds
    assert [event.sequence for _, event in far] == list(range(1, len(far) + 1))
    # Live, not replayed at the end: round 1's answers reached the far reader well before the end.
    first_answer = next(arrived for arrived, event in far if event.WhichOneof("event") == "agent_completed")
    assert far[-1][0] - first_answer > 1.0, "the non-owning replica did not stream the events as they happened"
    assert outcome(far_doc) == outcome(near_doc)
    assert_whole(far_doc)


async def test_once_the_stream_says_completed_every_replica_reads_completed(shared_fleet: Fleet) -> None:
    """Read-your-writes across replicas: a Get right after the stream's last event agrees with it."""
    fleet = shared_fleet
    await simulator(fleet, "/_sim/config", FAST)
    async with client(fleet.session_address) as api:
        owners = await create_many(api, 8, "Read after the stream")

        async def read_after_stream(discussion_id: str) -> list[str]:
            events, _ = await api.stream(discussion_id)
            last = events[-1][1].status_changed.status
            stale: list[str] = []
            for replica in fleet.session_replicas:
                async with client(replica.address) as direct:
                    doc, _ = await direct.get(discussion_id)
                if doc.status != last:
                    stale.append(f"{replica.instance_id} read {status_name(doc.status)}")
            return stale

        stale = await asyncio.gather(*(read_after_stream(discussion_id) for discussion_id in owners))
    found = {discussion_id: reads for discussion_id, reads in zip(owners, stale, strict=True) if reads}
    assert not found, f"after the stream ended COMPLETED, Get still answered otherwise: {found}"


# --- 3. kill -9 of a session replica ------------------------------------------------------------------


async def test_kill_9_of_a_session_replica_loses_nothing_and_runs_nothing_twice(fleet: Fleet) -> None:
    """20 discussions mid-flight, kill -9 of the busier session replica: reads keep working, all 20 complete."""
    await simulator(fleet, "/_sim/config", SLOW)
    await simulator(fleet, "/_sim/reset", {})
    async with client(fleet.session_address) as api:
        owners = await create_many(api, 20, "Session replica loss")
        assert set(owners.values()) == {"session-1", "session-2"}, Counter(owners.values())
        # Mid-flight: every discussion has finished round 1 and is into round 2.
        await api.wait_for(owners, lambda doc: doc.completed_rounds >= 1, 20, "past round 1")
        victim_id, _ = Counter(owners.values()).most_common(1)[0]
        victim = fleet.replica(victim_id)
        on_victim = [discussion_id for discussion_id, owner in owners.items() if owner == victim_id]
        before = {discussion_id: (await api.get(discussion_id))[0] for discussion_id in owners}
        assert all(doc.status == RUNNING for doc in before.values()), Counter(
            status_name(doc.status) for doc in before.values()
        )

        killed_wall = time.time()
        killed = time.monotonic()
        await fleet.kill(victim)

        unary = UnaryProbe(api, list(owners))
        async with unary.running():
            final = await api.wait_for(
                owners,
                lambda doc: doc.status in TERMINAL,
                LEASE_TTL_SECONDS + SLOW_DISCUSSION_SECONDS + MARGIN_SECONDS,
                "finished",
            )
            took = time.monotonic() - killed
            # A create after the kill works too, whichever replica the new id hashes to.
            after_id, _ = await api.create("Created after the kill")
        assert not unary.failures, f"{len(unary.failures)} of {unary.calls} unary calls failed: {unary.failures[:5]}"
        assert unary.calls > 20

    for doc in final.values():
        assert_whole(doc)
    for discussion_id, doc in before.items():
        kept = completed_results(final[discussion_id])
        lost = {key: text for key, text in completed_results(doc).items() if kept.get(key) != text}
        assert not lost, f"{discussion_id} lost completed results: {lost}"

    requests = await simulator(fleet, "/_sim/requests")
    topics = {doc.topic: discussion_id for discussion_id, doc in final.items()}
    overlaps, retries, repeated = concurrent_runs(requests, topics, killed_wall)
    assert not overlaps, f"a step of a discussion ran twice at once: {overlaps[:5]}"
    # The kill did cut steps short: the adopting replica asked for some of them again.
    assert {key[0] for key in repeated} & set(on_victim), "no step of the killed replica's discussions was re-run"
    survivor = next(replica for replica in fleet.session_replicas if replica is not victim)
    async with client(survivor.address) as direct:
        assert (await direct.get(after_id))[0].discussion_id == after_id
    logger.warning(
        "session kill: %d of 20 discussions were on %s; all 20 COMPLETED %.1f s after the kill "
        "(lease ttl %g s); %d unary calls meanwhile, none failed; %d steps asked for again, %d of them "
        "while the first attempt still ran",
        len(on_victim),
        victim_id,
        took,
        LEASE_TTL_SECONDS,
        unary.calls,
        len(repeated),
        len(retries),
    )


@dataclass
class UnaryProbe:
    """Keeps calling GetDiscussion (and ListDiscussions) through Envoy, recording every failure."""

    api: Client
    discussion_ids: list[str]
    calls: int = 0
    failures: list[str] = field(default_factory=list)

    async def _loop(self) -> None:
        while True:
            for discussion_id in self.discussion_ids:
                self.calls += 1
                try:
                    await self.api.get(discussion_id, deadline_seconds=5)
                except grpc.aio.AioRpcError as error:
                    self.failures.append(f"Get {discussion_id[:8]}: {error.code().name} {error.details()}")
            self.calls += 1
            try:
                await self.api.stub.ListDiscussions(session_pb2.ListDiscussionsRequest(page_size=50), timeout=5)
            except grpc.aio.AioRpcError as error:
                self.failures.append(f"List: {error.code().name} {error.details()}")
            await asyncio.sleep(0.2)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Probe while the block runs."""
        task = asyncio.create_task(self._loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def concurrent_runs(
    requests: list[dict[str, Any]], topics: dict[str, str], killed_wall: float
) -> tuple[list[str], list[str], set[tuple[str, str, str]]]:
    """LLM requests of one discussion, agent and step that overlapped in time; the allowed ones; the repeated steps.

    Allowed: a request that started after the kill overlapping one that started before it (the
    killed replica's call, cut off, while the adopting replica re-runs the step).
    """
    steps: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in requests:
        discussion_id = topics.get(record["topic"])
        if discussion_id is not None:
            steps[(discussion_id, record["persona"], llm_step(record["messages"]))].append(record)
    overlaps: list[str] = []
    retries: list[str] = []
    repeated = {key for key, records in steps.items() if len(records) > 1}
    for key, records in steps.items():
        records.sort(key=lambda record: record["started_at_wall"])
        for earlier, later in itertools.pairwise(records):
            ended = earlier["finished_at_wall"] if earlier["finished_at_wall"] is not None else math.inf
            if later["started_at_wall"] >= ended:
                continue
            note = f"{key}: #{earlier['request_id']} ({earlier['outcome']}) and #{later['request_id']}"
            if earlier["started_at_wall"] < killed_wall <= later["started_at_wall"]:
                retries.append(note)
            else:
                overlaps.append(note)
    return overlaps, retries, repeated


# --- 4. kill -9 of an agent replica -------------------------------------------------------------------


async def test_kill_9_of_an_agent_replica_mid_round_and_its_discussions_still_complete(fleet: Fleet) -> None:
    """The session replicas re-run the interrupted round on the surviving agent replica."""
    await simulator(fleet, "/_sim/config", SLOW)
    async with client(fleet.session_address) as api:
        owners = await create_many(api, 10, "Agent replica loss")
        # Mid-round: every discussion has its agents answering round 1 (first token not out yet).
        await api.wait_for(owners, lambda doc: len(doc.results) > 0, 10, "into round 1")
        holders = await agent_holders(fleet, owners)
        placed = {discussion_id: found[0] for discussion_id, found in holders.items() if len(found) == 1}
        assert len(placed) == len(owners), f"agent sets not on exactly one replica: {holders}"
        victim_id, _ = Counter(placed.values()).most_common(1)[0]
        victim = fleet.replica(victim_id)
        affected = [discussion_id for discussion_id, holder in placed.items() if holder == victim_id]
        await fleet.kill(victim)
        killed = time.monotonic()
        final = await api.wait_for(
            owners, lambda doc: doc.status in TERMINAL, SLOW_DISCUSSION_SECONDS + 2 * MARGIN_SECONDS, "finished"
        )
        took = time.monotonic() - killed
    failed = {d: f"{status_name(doc.status)}: {doc.error}" for d, doc in final.items() if doc.status != COMPLETED}
    assert not failed, f"{len(failed)} discussions did not complete ({len(affected)} were on {victim_id}): {failed}"
    for doc in final.values():
        assert_whole(doc)
    survivor = next(replica for replica in fleet.agent_replicas if replica is not victim)
    moved = await agent_holders(fleet, affected)
    assert all(found == [survivor.instance_id] for found in moved.values()), moved
    logger.warning(
        "agent kill: %d of 10 discussions had their agents on %s; all 10 COMPLETED %.1f s after the kill",
        len(affected),
        victim_id,
        took,
    )


# --- 5. Redis stopped for 5 s -------------------------------------------------------------------------


@dataclass
class OutageCall:
    """One call made while Redis was down."""

    method: str
    code: str
    seconds: float
    deadline_seconds: float


async def timed(method: str, deadline_seconds: float, call: Any) -> OutageCall:
    """Run a call and note how it ended and how long it took."""
    started = time.monotonic()
    code = "OK"
    try:
        await call
    except grpc.aio.AioRpcError as error:
        code = error.code().name
    return OutageCall(method, code, time.monotonic() - started, deadline_seconds)


@pytest.mark.parametrize("how", ["killed", "hung"])
async def test_redis_down_for_5_seconds_fails_fast_and_loses_no_acknowledged_discussion(fleet: Fleet, how: str) -> None:
    """Redis killed (kill -9; AOF, fsync always) or hung (SIGSTOP) for 5 s: creates UNAVAILABLE fast, nothing
    hangs; afterwards every acknowledged discussion is intact and new ones work."""
    assert fleet.redis is not None
    await simulator(fleet, "/_sim/config", FAST)
    async with client(fleet.session_address) as api:
        finished = await create_many(api, 6, "Before the outage")
        done_before = await api.wait_for(finished, lambda doc: doc.status in TERMINAL, 30, "finished")
        for doc in done_before.values():
            assert_whole(doc)
        await simulator(fleet, "/_sim/config", SLOW)
        running = await create_many(api, 4, "Across the outage")
        running_before = await api.wait_for(running, lambda doc: len(doc.results) > 0, 10, "started")

        if how == "killed":
            await fleet.redis.kill()
        else:
            fleet.redis.pause()  # connections stay open, nothing answers: only timeouts end the calls
        down = time.monotonic()
        calls: list[OutageCall] = []
        some_id = next(iter(finished))
        while time.monotonic() - down < 5.0:
            calls += await asyncio.gather(
                timed("CreateDiscussion", 3.0, api.create("During the outage", deadline_seconds=3.0)),
                timed("GetDiscussion", 3.0, api.get(some_id, deadline_seconds=3.0)),
                timed(
                    "ListDiscussions",
                    3.0,
                    api.stub.ListDiscussions(session_pb2.ListDiscussionsRequest(page_size=10), timeout=3.0),
                ),
                timed("StreamDiscussion", 3.0, api.stream(next(iter(running)), deadline_seconds=3.0)),
            )
            await asyncio.sleep(0.2)
        if how == "killed":
            await fleet.redis.start()
        else:
            fleet.redis.resume()
        back = time.monotonic()

        hung = [call for call in calls if call.seconds > call.deadline_seconds + 0.5]
        assert not hung, f"calls hung past their deadline while Redis was down: {hung}"
        creates = [call for call in calls if call.method == "CreateDiscussion"]
        assert creates and all(call.code == "UNAVAILABLE" for call in creates), creates
        slow_creates = [call for call in creates if call.seconds > 1.5]
        assert not slow_creates, f"creates did not fail fast: {slow_creates}"

        # The service recovers by itself: a new discussion is accepted and completes.
        await simulator(fleet, "/_sim/config", FAST)
        new_id = await eventually(lambda: api.create("After the outage"), seconds=20)
        recovered = time.monotonic() - back
        new_doc = await api.wait_for([new_id], lambda doc: doc.status in TERMINAL, 30, "finished")
        assert_whole(new_doc[new_id])

        # Every acknowledged discussion is there: the finished ones unchanged, the running ones ended
        # (not stuck RUNNING) with every answer they had before the outage.
        for discussion_id, before in done_before.items():
            after, _ = await api.get(discussion_id)
            assert outcome(after) == outcome(before), discussion_id
        ended = await api.wait_for(running, lambda doc: doc.status in TERMINAL, 60, "finished after the outage")
        for discussion_id, before in running_before.items():
            kept = completed_results(ended[discussion_id])
            lost = {key: text for key, text in completed_results(before).items() if kept.get(key) != text}
            assert not lost, f"{discussion_id} lost results across the outage: {lost}"
    by_method: dict[str, Counter[str]] = defaultdict(Counter)
    for call in calls:
        by_method[call.method][call.code] += 1
    logger.warning(
        "redis %s: calls during it %s, slowest %.2f s; new discussions accepted %.1f s after Redis returned; "
        "discussions running across it ended %s",
        how,
        {method: dict(codes) for method, codes in by_method.items()},
        max(call.seconds for call in calls),
        recovered,
        Counter(f"{status_name(doc.status)} {doc.error}".strip() for doc in ended.values()),
    )


async def eventually(attempt: Any, seconds: float) -> str:
    """Retry a create until it works (the service recovering); its discussion id."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            discussion_id, _ = await attempt()
            return str(discussion_id)
        except grpc.aio.AioRpcError as error:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"still failing {seconds:g} s after Redis returned: {error.code().name}"
                ) from error
            await asyncio.sleep(0.25)
