"""Traces of one discussion, exported over OTLP/gRPC to a real receiver the test serves, and tracing off by default.

Most tests run the suite in-process (tests/suite.py), its services sharing one tracer provider; the links
between them are only what crosses the wire (gRPC metadata, the LaneRun's trace_context), as between
processes. One runs `roundtable up`'s fleet (session and agent replicas as processes behind Envoy), each
process with its own provider set up from the OTEL_* variables as in production.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from services.cli.replicas import Fleet
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from services.shared import tracing
from services.shared.logs import JsonFormatter, SessionContextFilter
from tests.scaleout.conftest import fleet_options, require_tools
from tests.suite import Suite

TOPIC = "Should the moon have a speed limit?"
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
CREATE_SPAN = "roundtable.session.v1.SessionService/CreateDiscussion"
AGENTS_CALL_SPAN = "roundtable.agents.v1.AgentService/RunDiscussion"


@dataclass
class ReceivedSpan:
    """A span as the collector got it, with the service.name of the process that sent it."""

    service_name: str
    span: trace_pb2.Span

    @property
    def span_id(self) -> str:
        """The span id, as hex."""
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        """The parent span id, as hex ('' for a root)."""
        return self.span.parent_span_id.hex()

    def attribute(self, key: str) -> str | int | float | bool | None:
        """One attribute's value, None when absent."""
        for attribute in self.span.attributes:
            if attribute.key == key:
                return _value(attribute.value)
        return None


def _value(value: common_pb2.AnyValue) -> str | int | float | bool | None:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """The collector's TraceService: keeps every span exported to it."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        """Store the request's spans."""
        for resource_spans in request.resource_spans:
            service_name = next(
                (str(_value(a.value)) for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(ReceivedSpan(service_name, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        """The spans of one trace."""
        return [s for s in self.spans if s.span.trace_id.hex() == trace_id]


@pytest.fixture
async def otlp_receiver() -> AsyncIterator[tuple[OtlpReceiver, str]]:
    """An OTLP/gRPC trace receiver on a free loopback port, and its endpoint URL."""
    receiver = OtlpReceiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield receiver, f"http://127.0.0.1:{port}"
    await server.stop(0)


@pytest.fixture
async def traced_suite(
    otlp_receiver: tuple[OtlpReceiver, str],
    make_suite: Callable[..., Awaitable[Suite]],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Callable[..., Awaitable[Suite]]]:
    """Tracing on, exporting to the receiver (every span sampled, batches sent at once); off again afterwards."""
    _, endpoint = otlp_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    assert tracing.setup_tracing("roundtable-suite") is not None
    try:
        yield make_suite
    finally:
        await asyncio.to_thread(tracing.shutdown_tracing)


async def _wait_for(receiver: OtlpReceiver, trace_id: str, names: set[str], count_of: dict[str, int]) -> None:
    """Flush and wait until the trace holds spans of every name (and at least count_of[name] of some)."""
    provider = tracing.provider()  # None when the spans come from other processes: they export on their own
    deadline = time.monotonic() + 20
    while True:
        if provider is not None:
            # In a thread: the exporter's call needs this event loop free to answer it.
            await asyncio.to_thread(provider.force_flush)
        spans = receiver.of_trace(trace_id)
        found = {s.span.name for s in spans}
        counts_met = all(sum(1 for s in spans if s.span.name == n) >= c for n, c in count_of.items())
        if names <= found and counts_met:
            return
        assert time.monotonic() < deadline, f"spans missing: {names - found}; got {sorted(found)}"
        await asyncio.sleep(0.1)


async def _run_discussion(suite: Suite, rounds: int = 1) -> tuple[session_pb2.Discussion, str]:
    """Create a discussion under the client's own trace, follow it to its end; (final document, trace id trailer)."""
    return await _run_discussion_on(suite.session(), rounds)


async def _run_discussion_on(
    stub: session_pb2_grpc.SessionServiceAsyncStub, rounds: int = 1
) -> tuple[session_pb2.Discussion, str]:
    call = stub.CreateDiscussion(
        session_pb2.CreateDiscussionRequest(topic=TOPIC, personas=["scientist", "philosopher"], rounds=rounds),
        metadata=(("traceparent", f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"),),
        timeout=30,
    )
    created = await call
    trailers = await call.trailing_metadata()
    trace_ids = [value for key, value in trailers or () if key == tracing.TRACE_ID_METADATA_KEY]
    async for _ in stub.StreamDiscussion(
        session_pb2.StreamDiscussionRequest(discussion_id=created.discussion_id), timeout=60
    ):
        pass
    final = await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=created.discussion_id), timeout=10)
    return final, str(trace_ids[0]) if trace_ids else ""


def _one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    matching = [s for s in spans if s.span.name == name]
    assert len(matching) == 1, f"{len(matching)} spans named {name}"
    return matching[0]


@pytest.mark.parametrize("transport", ["lanes", "calls"])
async def test_one_discussion_is_one_trace_from_create_to_each_llm_call(
    traced_suite: Callable[..., Awaitable[Suite]], otlp_receiver: tuple[OtlpReceiver, str], transport: str
) -> None:
    receiver, _ = otlp_receiver
    suite = await traced_suite(session={"agents_transport": transport})
    final, trailer_trace_id = await _run_discussion(suite, rounds=2)
    assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED, final.error
    # The user gets the trace id to hand to support: the one the caller's traceparent started.
    assert trailer_trace_id == CLIENT_TRACE_ID

    await _wait_for(
        receiver,
        CLIENT_TRACE_ID,
        {CREATE_SPAN, "discussion.run", "agent.answer", "agent.summary"},
        {"agent.answer": 4, "discussion.round": 2, "agent.summary": 1},
    )
    spans = receiver.of_trace(CLIENT_TRACE_ID)
    by_id = {s.span_id: s for s in spans}

    create = _one(spans, CREATE_SPAN)
    assert create.parent_id == CLIENT_SPAN_ID  # the caller's own span is the parent
    assert create.span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert create.attribute("rpc.system") == "grpc"
    run = _one(spans, "discussion.run")
    assert run.parent_id == create.span_id
    # The store's id of the discussion, as its log lines name it.
    assert run.attribute("roundtable.discussion_id")
    assert run.attribute("roundtable.status") == "DISCUSSION_STATUS_COMPLETED"

    # The agent side: over a lane its run span is the session run's child (the LaneRun carried the context);
    # over one call per discussion, the RunDiscussion server span is (the call's metadata carried it).
    agent_side = _one(spans, "agents.run" if transport == "lanes" else AGENTS_CALL_SPAN)
    assert agent_side.parent_id == run.span_id
    if transport == "lanes":
        assert agent_side.attribute("roundtable.discussion_id") == run.attribute("roundtable.discussion_id")
    assert agent_side.service_name == "roundtable-suite"

    # Each round's answers in the round's span; the summary in the run's.
    rounds = {s.attribute("roundtable.round"): s for s in spans if s.span.name == "discussion.round"}
    assert set(rounds) == {1, 2} and all(r.parent_id == agent_side.span_id for r in rounds.values())
    assert all(r.attribute("roundtable.completed_agents") == 2 for r in rounds.values())
    answers = [s for s in spans if s.span.name == "agent.answer"]
    assert sorted((a.attribute("roundtable.agent"), a.attribute("roundtable.round")) for a in answers) == [
        ("哲学家", 1),
        ("哲学家", 2),
        ("科学家", 1),
        ("科学家", 2),
    ]
    assert all(a.parent_id == rounds[a.attribute("roundtable.round")].span_id for a in answers)
    summary = _one(spans, "agent.summary")
    assert summary.attribute("roundtable.agent") == "主持人" and summary.parent_id == agent_side.span_id
    chats = [s for s in spans if s.span.name.startswith("chat ")]
    assert len(chats) == 5
    answer_ids = {a.span_id for a in [*answers, summary]}
    for chat in chats:
        assert chat.parent_id in answer_ids
        assert chat.span.kind == trace_pb2.Span.SPAN_KIND_CLIENT
        assert chat.attribute("gen_ai.operation.name") == "chat"
        assert chat.attribute("gen_ai.request.model") == chat.span.name.removeprefix("chat ")
        assert isinstance(chat.attribute("gen_ai.usage.input_tokens"), int)
        assert int(chat.attribute("gen_ai.usage.input_tokens") or 0) > 0
        assert int(chat.attribute("gen_ai.usage.output_tokens") or 0) > 0
        assert chat.attribute("server.address") == "127.0.0.1"
        assert chat.attribute("error.type") is None
    # The chain is intact: every span of the trace leads up to the caller's span through spans it holds.
    for span in spans:
        hops = span
        while hops.parent_id != CLIENT_SPAN_ID:
            assert hops.parent_id in by_id, f"{span.span.name}: its chain breaks at {hops.span.name}"
            hops = by_id[hops.parent_id]
    # No prompt or answer text in any span (the simulator's answers quote the topic).
    for span in spans:
        texts = [str(_value(a.value)) for a in span.span.attributes]
        texts += [str(_value(a.value)) for event in span.span.events for a in event.attributes]
        assert not any("moon" in text for text in texts), span.span.name


async def test_llm_retries_are_events_of_the_llm_span_and_failures_carry_error_type(
    traced_suite: Callable[..., Awaitable[Suite]], otlp_receiver: tuple[OtlpReceiver, str]
) -> None:
    receiver, _ = otlp_receiver
    # Half the requests answer 500 (seeded), told to retry at once; the philosopher always fails.
    suite = await traced_suite(
        simulator={"fail_500_rate": 0.5, "seed": 3, "error_retry_after_seconds": 0.0, "fail_personas": ["哲学家"]},
        agents={"llm_max_retries": 3},
    )
    final, _ = await _run_discussion(suite)
    assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED, final.error
    await _wait_for(receiver, CLIENT_TRACE_ID, {"agent.summary"}, {"agent.answer": 2})
    spans = receiver.of_trace(CLIENT_TRACE_ID)
    chats = [s for s in spans if s.span.name.startswith("chat ")]
    retries = [event for chat in chats for event in chat.span.events if event.name == "retry"]
    assert retries, "no retry event on any LLM span"
    reasons = {str(_value(a.value)) for event in retries for a in event.attributes if a.key == "retry.reason"}
    assert all("HTTP 500" in reason for reason in reasons), reasons
    failed_chats = [c for c in chats if c.attribute("error.type") is not None]
    assert failed_chats and all(c.attribute("error.type") == "LLMCallFailed" for c in failed_chats)
    failed_answer = next(s for s in spans if s.attribute("roundtable.agent") == "哲学家")
    assert failed_answer.attribute("error.type") == "agent_failed"
    assert failed_answer.span.status.code == trace_pb2.Status.STATUS_CODE_ERROR


async def test_without_an_endpoint_no_provider_is_installed_and_no_trace_id_is_returned(
    make_suite: Callable[..., Awaitable[Suite]], monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    for name in (*tracing.ENDPOINT_VARIABLES, "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")  # a sampler alone turns nothing on
    assert tracing.setup_tracing("roundtable-session") is None
    assert tracing.provider() is None and not tracing.is_on()
    # Nor the global one: nothing was installed for the process.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    suite = await make_suite()
    final, trailer_trace_id = await _run_discussion(suite)
    assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED
    assert trailer_trace_id == ""


def test_sdk_disabled_wins_over_an_endpoint() -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_SDK_DISABLED": "true"}
    assert tracing.setup_tracing("roundtable-agents", environ) is None
    assert tracing.provider() is None


async def test_json_log_lines_carry_the_active_span_ids(otlp_receiver: tuple[OtlpReceiver, str]) -> None:
    _, endpoint = otlp_receiver
    record_filter, formatter = SessionContextFilter(), JsonFormatter()

    def line() -> dict[str, str]:
        record = logging.LogRecord("test", logging.INFO, __file__, 1, "hello", None, None)
        record_filter.filter(record)
        entry: dict[str, str] = json.loads(formatter.format(record))
        return entry

    assert "trace_id" not in line()  # tracing off
    tracing.setup_tracing("roundtable-test", {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    try:
        assert "trace_id" not in line()  # on, but no span active
        span = tracing.start_span("work")
        assert span is not None
        with tracing.active(span):
            entry = line()
        span.end()
        span_context = span.get_span_context()
        assert entry["trace_id"] == trace.format_trace_id(span_context.trace_id)
        assert entry["span_id"] == trace.format_span_id(span_context.span_id)
    finally:
        # In a thread: the span's export at shutdown is answered by this event loop.
        await asyncio.to_thread(tracing.shutdown_tracing)


async def test_a_fleet_of_processes_behind_envoy_exports_one_trace_per_discussion(
    otlp_receiver: tuple[OtlpReceiver, str], tmp_path: pathlib.Path
) -> None:
    require_tools()
    receiver, endpoint = otlp_receiver
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    options = fleet_options(tmp_path, session_replicas=2, agent_replicas=2, env=otel)
    async with Fleet.start(options) as fleet, grpc.aio.insecure_channel(fleet.session_address) as channel:
        assert tracing.provider() is None  # this process traces nothing: every span comes from the fleet
        final, trailer_trace_id = await _run_discussion_on(session_pb2_grpc.SessionServiceStub(channel))
        assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED, final.error
        assert trailer_trace_id == CLIENT_TRACE_ID
        await _wait_for(
            receiver,
            CLIENT_TRACE_ID,
            {CREATE_SPAN, "discussion.run", "agents.run", "agent.summary"},
            {"agent.answer": 2},
        )
    spans = receiver.of_trace(CLIENT_TRACE_ID)
    create = _one(spans, CREATE_SPAN)
    run = _one(spans, "discussion.run")
    agent_side = _one(spans, "agents.run")
    # Envoy passes the traceparent through; each hop's span names its own process.
    assert create.parent_id == CLIENT_SPAN_ID and create.service_name == "roundtable-session"
    assert run.parent_id == create.span_id and run.service_name == "roundtable-session"
    assert agent_side.parent_id == run.span_id and agent_side.service_name == "roundtable-agents"
    round_span = _one(spans, "discussion.round")
    assert round_span.parent_id == agent_side.span_id
    answers = [s for s in spans if s.span.name in ("agent.answer", "agent.summary")]
    assert len(answers) == 3
    assert {a.parent_id for a in answers} == {round_span.span_id, agent_side.span_id}
    chats = [s for s in spans if s.span.name.startswith("chat ")]
    assert len(chats) == 3 and {c.parent_id for c in chats} == {a.span_id for a in answers}
    assert all(c.service_name == "roundtable-agents" and c.attribute("gen_ai.operation.name") == "chat" for c in chats)
    # Envoy's health checks and the replicas' reports to the monitor (every 2 s here) make no traces of their own.
    names = {s.span.name for s in receiver.spans}
    assert not {name for name in names if name.startswith("grpc.") or name.endswith("/ReportInstance")}, names
