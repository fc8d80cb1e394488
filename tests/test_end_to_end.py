"""The suite end to end through real servers: a discussion from create to COMPLETED, replay, health."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2
from tests.suite import Suite, run_to_end

DEFAULT_DEBATERS = ["科学家", "哲学家", "经济学家", "工程师"]
MODERATOR = "主持人"


async def test_discussion_runs_to_completion_with_every_result(suite: Suite) -> None:
    stub = suite.session()
    final, events = await run_to_end(
        stub, session_pb2.CreateDiscussionRequest(topic="Should cities ban cars?", rounds=2)
    )
    assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED, final.error
    assert list(final.personas) == [*DEFAULT_DEBATERS, MODERATOR]
    answers = {(r.agent, r.round): r for r in final.results}
    for agent in DEFAULT_DEBATERS:
        for round_number in (1, 2):
            result = answers[(agent, round_number)]
            assert result.status == discussion_pb2.AGENT_STATUS_COMPLETED
            # The simulator answers "<persona> on «<topic>»: …" from the prompt it was sent.
            assert result.text.startswith(f"{agent} on «Should cities ban cars?»")
            assert result.usage.total_tokens > 0
    assert final.summary.startswith(f"{MODERATOR} on «Should cities ban cars?»")
    assert set(final.completed_agents) == set(DEFAULT_DEBATERS) | {MODERATOR}
    assert final.usage.total_tokens == sum(r.usage.total_tokens for r in final.results)
    # Events: gap-free sequence, one terminal status last.
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].status_changed.status == session_pb2.DISCUSSION_STATUS_COMPLETED
    assert final.last_sequence == events[-1].sequence
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("round_completed") == 2
    assert kinds.count("summary_completed") == 1
    assert kinds.count("agent_completed") == len(DEFAULT_DEBATERS) * 2
    # The streamed deltas of an answer add up to its final text.
    deltas = "".join(e.agent_delta.text for e in events if e.agent_delta.agent == "科学家" and e.agent_delta.round == 1)
    assert deltas.strip() == answers[("科学家", 1)].text


async def test_replay_after_sequence_gives_exactly_the_missing_events(suite: Suite) -> None:
    stub = suite.session()
    final, events = await run_to_end(
        stub, session_pb2.CreateDiscussionRequest(topic="Is nuclear power green?", personas=["scientist"], rounds=1)
    )
    assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED
    for cut in (0, 1, len(events) // 2, len(events) - 1, len(events)):
        replayed = [
            e
            async for e in stub.StreamDiscussion(
                session_pb2.StreamDiscussionRequest(discussion_id=final.discussion_id, after_sequence=cut),
                timeout=10,
            )
        ]
        assert replayed == events[cut:]


async def test_stream_joined_mid_discussion_sees_every_later_event(suite: Suite) -> None:
    stub = suite.session()
    created = await stub.CreateDiscussion(session_pb2.CreateDiscussionRequest(topic="Remote work", rounds=2))
    first = stub.StreamDiscussion(session_pb2.StreamDiscussionRequest(discussion_id=created.discussion_id))
    seen: list[session_pb2.DiscussionEvent] = []
    async for event in first:
        seen.append(event)
        if len(seen) == 3:
            break
    first.cancel()
    rest = [
        e
        async for e in stub.StreamDiscussion(
            session_pb2.StreamDiscussionRequest(discussion_id=created.discussion_id, after_sequence=3)
        )
    ]
    everything = seen + rest
    assert [e.sequence for e in everything] == list(range(1, len(everything) + 1))
    assert everything[-1].status_changed.status == session_pb2.DISCUSSION_STATUS_COMPLETED


async def test_health_serving_and_reflection_on_every_service(suite: Suite) -> None:
    for host in (suite.session_host, suite.agents_host, suite.monitor_host):
        async with grpc.aio.insecure_channel(host.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", *host.service.grpc_services):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, (host.service.name, service)
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            async for response in responses:
                names = {s.name for s in response.list_services_response.service}
                assert set(host.service.grpc_services) <= names
                assert "grpc.health.v1.Health" in names
                break
