"""Isolation: many concurrent discussions, each with results of its own topic and agents of its own."""

from __future__ import annotations

import asyncio

from services.gen.roundtable.session.v1 import session_pb2
from tests.suite import Suite, run_to_end

CONCURRENT_DISCUSSIONS = 200


async def test_concurrent_discussions_stay_isolated(suite: Suite) -> None:
    await check_concurrent_discussions_stay_isolated(suite)


async def check_concurrent_discussions_stay_isolated(suite: Suite) -> None:
    """200 discussions at once: each ends with answers to its own topic, by agents of its own, events in order."""
    stub = suite.session()
    topics = [f"Topic number {i}: the future of city {i}" for i in range(CONCURRENT_DISCUSSIONS)]
    outcomes = await asyncio.gather(
        *(
            run_to_end(stub, session_pb2.CreateDiscussionRequest(topic=t, personas=["scientist", "economist"]))
            for t in topics
        )
    )
    instance_owner: dict[str, str] = {}
    for topic, (final, events) in zip(topics, outcomes, strict=True):
        assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED, final.error
        # Each discussion's own events, gapless and in order, whatever else shared its way to the agents.
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert {e.discussion_id for e in events} == {final.discussion_id}
        assert final.topic == topic
        assert {(r.agent, r.round) for r in final.results} == {("科学家", 1), ("经济学家", 1), ("主持人", 2)}
        for result in final.results:
            # Every answer was written for this discussion's topic and no other.
            assert f"«{topic}»" in result.text, result.text
            # No agent instance serves two sessions.
            owner = instance_owner.setdefault(result.agent_instance_id, final.discussion_id)
            assert owner == final.discussion_id, f"instance {result.agent_instance_id} shared"
    assert len({final.discussion_id for final, _ in outcomes}) == CONCURRENT_DISCUSSIONS
    # 3 agents (2 debaters + moderator) in each of 200 sets.
    assert len(instance_owner) == 3 * CONCURRENT_DISCUSSIONS
