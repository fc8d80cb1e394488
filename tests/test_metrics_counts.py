"""Metrics tell the truth: after 100 discussions the counters equal what the test did, with no id labels."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

import grpc
import pytest
from prometheus_client import REGISTRY, generate_latest

from services.gen.roundtable.session.v1 import session_pb2
from tests.suite import Suite, run_to_end

MakeSuite = Callable[..., Awaitable[Suite]]
SESSION = "roundtable.session.v1.SessionService"
AGENTS = "roundtable.agents.v1.AgentService"


def handled(service: str, method: str, code: str, side: str = "server") -> float:
    labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": method, "grpc_code": code}
    if method in ("StreamDiscussion", "RunDiscussion"):
        labels["grpc_type"] = "server_stream"
    return REGISTRY.get_sample_value(f"grpc_{side}_handled_total", labels) or 0.0


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def snapshot(transport: str) -> dict[str, float]:
    if transport == "lanes":
        run_ok = counter("roundtable_agent_lane_runs_ended_total", grpc_code="OK")
        run_client_ok = counter("roundtable_lane_runs_ended_total", grpc_code="OK")
    else:
        run_ok = handled(AGENTS, "RunDiscussion", "OK")
        run_client_ok = handled(AGENTS, "RunDiscussion", "OK", side="client")
    return {
        "create_ok": handled(SESSION, "CreateDiscussion", "OK"),
        "create_invalid": handled(SESSION, "CreateDiscussion", "INVALID_ARGUMENT"),
        "stream_ok": handled(SESSION, "StreamDiscussion", "OK"),
        "get_ok": handled(SESSION, "GetDiscussion", "OK"),
        "get_not_found": handled(SESSION, "GetDiscussion", "NOT_FOUND"),
        "run_ok": run_ok,
        "run_client_ok": run_client_ok,
        "created": counter("roundtable_discussions_created_total"),
        "completed": counter("roundtable_discussions_finished_total", status="DISCUSSION_STATUS_COMPLETED"),
        "answers": counter("roundtable_agent_runs_total", outcome="completed"),
    }


@pytest.mark.parametrize("transport", ["lanes", "calls"])
async def test_counters_equal_what_was_done_and_no_label_names_a_session(make_suite: MakeSuite, transport: str) -> None:
    suite = await make_suite(session={"agents_transport": transport})
    stub = suite.session()
    before = snapshot(transport)
    topics = [f"metrics topic {i}" for i in range(100)]
    outcomes = await asyncio.gather(
        *(run_to_end(stub, session_pb2.CreateDiscussionRequest(topic=t, personas=["engineer"])) for t in topics)
    )
    for _ in range(7):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.CreateDiscussion(session_pb2.CreateDiscussionRequest(topic=" "))
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id="f" * 32))
    await asyncio.sleep(0.2)  # client-side counts are recorded by a callback once each call ends
    after = snapshot(transport)
    delta = {key: after[key] - before[key] for key in before}
    assert delta == {
        "create_ok": 100,
        "create_invalid": 7,
        "stream_ok": 100,
        "get_ok": 100,  # run_to_end fetches the final document once
        "get_not_found": 3,
        "run_ok": 100,
        "run_client_ok": 100,
        "created": 100,
        "completed": 100,
        "answers": 200,  # the engineer's answer and the moderator's summary
    }
    exposition = generate_latest(REGISTRY).decode()
    ids = {final.discussion_id for final, _ in outcomes}
    assert not any(discussion_id in exposition for discussion_id in ids)
    assert not any(topic in exposition for topic in topics)
    assert "anonymous" not in exposition  # the principal
    assert not re.search(r'="[0-9a-f]{32}"', exposition)
