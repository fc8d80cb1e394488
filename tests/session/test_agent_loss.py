"""Losing the agent replica mid-discussion: the session service re-runs the round on a new replica."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from services.agents.service import AgentsService
from services.agents.settings import AgentsSettings
from services.gen.roundtable.session.v1 import session_pb2
from services.shared.server import ServiceHost
from tests.suite import Suite

MakeSuite = Callable[..., Awaitable[Suite]]


async def test_a_discussion_survives_its_agent_replica_and_the_new_one_rebuilds_from_the_transcript(
    make_suite: MakeSuite,
) -> None:
    suite = await make_suite(simulator={"first_token_latency_ms": 700})
    stub = suite.session()
    created = await stub.CreateDiscussion(
        session_pb2.CreateDiscussionRequest(topic="replica loss", personas=["scientist", "economist"], rounds=2)
    )
    request = session_pb2.GetDiscussionRequest(discussion_id=created.discussion_id)
    async with asyncio.timeout(20):
        while (await stub.GetDiscussion(request)).completed_rounds < 1:  # noqa: ASYNC110 - state of another service
            await asyncio.sleep(0.05)
    round_one = {r.agent: r.text for r in (await stub.GetDiscussion(request)).results if r.round == 1}
    # The agent replica dies mid-round-2; a new one (no agent sets at all) comes up at the same address.
    old = suite.agents_host
    settings = old.settings.model_copy(update={"port": old.port})
    assert isinstance(settings, AgentsSettings)
    await old.stop(grace_seconds=0)
    suite.agents_host = ServiceHost(settings, AgentsService(settings))
    await suite.agents_host.start()

    async with asyncio.timeout(30):
        events = [
            e
            async for e in stub.StreamDiscussion(
                session_pb2.StreamDiscussionRequest(discussion_id=created.discussion_id)
            )
        ]
    final = await stub.GetDiscussion(request)
    assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED, final.error
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert {(r.agent, r.round) for r in final.results} == {
        ("科学家", 1),
        ("经济学家", 1),
        ("科学家", 2),
        ("经济学家", 2),
        ("主持人", 3),
    }
    assert {r.agent: r.text for r in final.results if r.round == 1} == round_one  # round 1 was not run again
    # The new replica's round-2 prompts carry the other agent's round-1 answer, from the transcript.
    late = [
        r for r in suite.simulator.simulator.requests if r.topic == "replica loss" and "Round 2." in str(r.messages)
    ]
    assert late
    for record in late:
        other = "经济学家" if record.persona == "科学家" else "科学家"
        assert round_one[other] in str(record.messages)
