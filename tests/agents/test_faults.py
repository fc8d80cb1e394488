"""LLM faults through real servers and the simulator: retries as told, failing personas, cancel, deadlines, caps."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest

from services.gen.roundtable.agents.v1 import agents_pb2
from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2
from services.simulator.app import RequestRecord
from tests.suite import Suite, run_to_end

MakeSuite = Callable[..., Awaitable[Suite]]
COMPLETED = discussion_pb2.AGENT_STATUS_COMPLETED
FAILED = discussion_pb2.AGENT_STATUS_FAILED


def records_of(suite: Suite, topic: str) -> list[RequestRecord]:
    return [r for r in suite.simulator.simulator.requests if r.topic == topic]


async def test_fifty_discussions_complete_through_429s_and_500s_and_every_retry_waits_as_told(
    make_suite: MakeSuite,
) -> None:
    # 15 % of calls get 429 and 15 % of the rest 500 (≈30 % fail); both carry a Retry-After the
    # SDK must honour. Eight retries make a call that fails for good a 1-in-50,000 event.
    suite = await make_suite(
        simulator={
            "fail_429_rate": 0.15,
            "fail_500_rate": 0.18,
            "retry_after_seconds": 0.2,
            "error_retry_after_seconds": 0.3,
            "seed": 11,
        },
        agents={"llm_max_retries": 8},
    )
    stub = suite.session()
    topics = [f"fault drill {number}" for number in range(50)]
    finished = await asyncio.gather(
        *(
            run_to_end(stub, session_pb2.CreateDiscussionRequest(topic=topic, personas=["scientist", "economist"]))
            for topic in topics
        )
    )

    for doc, _ in finished:
        assert doc.status == session_pb2.DISCUSSION_STATUS_COMPLETED, doc.error
        assert [r.status for r in doc.results] == [COMPLETED, COMPLETED, COMPLETED]
        assert doc.summary
    records = [r for r in suite.simulator.simulator.requests if r.topic in set(topics)]
    failed = [r for r in records if r.outcome in ("429", "500")]
    # 150 calls (2 debaters + the moderator, 50 times), each answered exactly once.
    assert sum(r.outcome == "ok" for r in records) == 150
    assert {r.outcome for r in failed} == {"429", "500"}
    assert 0.2 <= len(failed) / len(records) <= 0.4
    retries = [r for r in records if r.retry_count > 0]
    # Every failure was retried, and every retry is tied to the attempt it repeats.
    assert len(retries) == len(failed)
    by_id = {r.request_id: r for r in records}
    excess = []
    for retry in retries:
        assert retry.retry_of is not None, retry
        previous = by_id[retry.retry_of]
        assert previous.outcome in ("429", "500")
        assert retry.retry_count == previous.retry_count + 1
        told = 0.2 if previous.outcome == "429" else 0.3
        assert retry.told_to_wait_seconds == told
        assert retry.waited_seconds is not None
        # Never sooner than told (the SDK's own backoff would be 0.5 s or more with jitter, never 0.2).
        assert retry.waited_seconds >= told, retry
        excess.append(retry.waited_seconds - told)
    # ...and not much later either: the wait is the one the server asked for.
    assert statistics.median(excess) < 0.15, excess
    print(
        f"\n{len(records)} requests, {len(failed)} failed ({len(failed) / len(records):.0%}), "
        f"retries waited told+{statistics.median(excess) * 1000:.0f} ms median, +{max(excess) * 1000:.0f} ms max"
    )


async def test_a_persona_that_always_fails_fails_alone_and_the_discussion_completes(make_suite: MakeSuite) -> None:
    suite = await make_suite(
        simulator={"fail_personas": ["经济学家"], "error_retry_after_seconds": 0.05}, agents={"llm_max_retries": 2}
    )
    doc, _ = await run_to_end(
        suite.session(),
        session_pb2.CreateDiscussionRequest(
            topic="one bad apple", personas=["scientist", "economist", "engineer", "moderator"], rounds=2
        ),
    )

    assert doc.status == session_pb2.DISCUSSION_STATUS_COMPLETED
    results = {(r.agent, r.round): r for r in doc.results}
    for round_number in (1, 2):
        failed = results[("经济学家", round_number)]
        assert failed.status == FAILED
        assert "HTTP 500" in failed.error and "经济学家" in failed.error
        for persona in ("科学家", "工程师"):
            assert results[(persona, round_number)].status == COMPLETED
            assert results[(persona, round_number)].text
    assert results[("主持人", 3)].status == COMPLETED and doc.summary
    economist_calls = [r for r in records_of(suite, "one bad apple") if r.persona == "经济学家"]
    assert len(economist_calls) == 2 * 3  # two rounds, each one call and two retries


async def test_when_every_persona_fails_the_discussion_fails_with_each_reason(make_suite: MakeSuite) -> None:
    suite = await make_suite(
        simulator={"fail_personas": ["科学家", "经济学家"], "error_retry_after_seconds": 0.05},
        agents={"llm_max_retries": 1},
    )
    doc, _ = await run_to_end(
        suite.session(), session_pb2.CreateDiscussionRequest(topic="nobody home", personas=["scientist", "economist"])
    )

    assert doc.status == session_pb2.DISCUSSION_STATUS_FAILED
    assert doc.error.startswith("every agent failed")
    for persona in ("科学家", "经济学家"):
        assert f"{persona}: LLM backend simulator answered HTTP 500" in doc.error
    assert not doc.summary
    assert {r.persona for r in records_of(suite, "nobody home")} == {"科学家", "经济学家"}


async def test_cancel_closes_the_calls_in_flight_and_no_call_follows(make_suite: MakeSuite) -> None:
    # Slow answers (2 s each) so the cancel lands mid-stream in round 1 of 2.
    suite = await make_suite(simulator={"tokens_per_second": 12}, agents={"release_grace_seconds": 3600})
    stub, agents = suite.session(), suite.agents()
    created = await stub.CreateDiscussion(
        session_pb2.CreateDiscussionRequest(
            topic="stop mid-sentence", personas=["scientist", "economist", "moderator"], rounds=2
        )
    )
    sim = suite.simulator.simulator
    async with asyncio.timeout(5):
        await sim.wait_for_record(lambda r: r.topic == "stop mid-sentence" and r.pieces_sent >= 2)

    cancelled_at = time.monotonic()
    cancelled = await stub.CancelDiscussion(session_pb2.CancelDiscussionRequest(discussion_id=created.discussion_id))
    assert cancelled.status == session_pb2.DISCUSSION_STATUS_CANCELLED
    await asyncio.sleep(1.5)  # time enough for round 2 or a retry to have started, if anything were left

    calls = records_of(suite, "stop mid-sentence")
    assert sorted(r.persona for r in calls) == ["科学家", "经济学家"]
    for call in calls:
        assert call.started_at < cancelled_at
        assert call.client_disconnected and call.finished_at is not None
        assert call.finished_at - cancelled_at < 1.0
    stats = await agents.GetAgentStats(agents_pb2.GetAgentStatsRequest(session_id=created.discussion_id))
    assert not stats.session_present


async def test_a_passing_deadline_ends_the_calls_and_reports_them_before_it(make_suite: MakeSuite) -> None:
    suite = await make_suite(simulator={"hang_rate": 1.0})
    agents = suite.agents()
    started = time.monotonic()
    call = agents.RunDiscussion(
        agents_pb2.RunDiscussionRequest(
            session_id="deadline-1", topic="too slow", personas=["科学家", "工程师", "主持人"], rounds=2
        ),
        timeout=2.0,
    )
    events = [event async for event in call]
    ended = time.monotonic() - started

    failed = [e.agent_failed for e in events if e.WhichOneof("event") == "agent_failed"]
    assert sorted(f.agent for f in failed) == ["工程师", "科学家"]
    assert all("timed out" in f.reason for f in failed), failed
    assert ended < 2.0  # the failures arrived before the caller's deadline, not as DEADLINE_EXCEEDED
    calls = records_of(suite, "too slow")
    assert len(calls) == 2 and all(r.client_disconnected for r in calls)


async def test_the_configured_call_timeout_bounds_a_silent_backend(make_suite: MakeSuite) -> None:
    suite = await make_suite(simulator={"hang_rate": 1.0}, agents={"llm_timeout_seconds": 0.5})
    started = time.monotonic()
    events = [
        event
        async for event in suite.agents().RunDiscussion(
            agents_pb2.RunDiscussionRequest(session_id="timeout-1", topic="silence", personas=["科学家"], rounds=1),
            timeout=30,
        )
    ]
    (failed,) = [e.agent_failed for e in events if e.WhichOneof("event") == "agent_failed"]
    assert failed.reason == "LLM call timed out after 0.5 s"
    assert time.monotonic() - started < 2.0
    async with asyncio.timeout(1):
        await suite.simulator.simulator.wait_for_record(lambda r: r.topic == "silence" and r.client_disconnected)


async def test_the_agent_set_cap_holds_under_500_sessions(make_suite: MakeSuite) -> None:
    suite = await make_suite(agents={"max_agent_sets": 100, "release_grace_seconds": 3600})
    agents = suite.agents()
    # More sessions at once than the cap, so even running sets have to make room.
    slots = asyncio.Semaphore(150)
    done = asyncio.Event()
    highest_seen = 0

    async def run(number: int) -> list[agents_pb2.AgentEvent]:
        async with slots:
            request = agents_pb2.RunDiscussionRequest(
                session_id=f"lru-{number}", topic=f"lru {number}", personas=["工程师"], rounds=1
            )
            return [event async for event in agents.RunDiscussion(request, timeout=60)]

    async def watch() -> None:
        nonlocal highest_seen
        while not done.is_set():
            stats = await agents.GetAgentStats(agents_pb2.GetAgentStatsRequest())
            highest_seen = max(highest_seen, stats.live_agent_sets)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    runs = await asyncio.gather(*(run(number) for number in range(500)))
    done.set()
    await watcher

    assert all(any(e.WhichOneof("event") == "agent_completed" for e in events) for events in runs)
    stats = await agents.GetAgentStats(agents_pb2.GetAgentStatsRequest(session_id="lru-499"))
    assert 0 < highest_seen <= 100
    assert (stats.live_agent_sets, stats.max_agent_sets) == (100, 100)
    assert (stats.created_agent_sets_total, stats.released_agent_sets_total) == (500, 400)
    assert stats.session_present


async def test_a_negative_token_budget_is_refused(suite: Suite) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in suite.agents().RunDiscussion(
            agents_pb2.RunDiscussionRequest(
                session_id="budget-bad", topic="x", personas=["科学家"], rounds=1, token_budget=-5
            )
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "token_budget" in (caught.value.details() or "")
