"""One contract, both LLM clients (the lean streaming one and the openai SDK), against the real simulator.

Where the clients differ by design the test says so: the SDK cannot skip a malformed SSE line, and it
reserves the LLM budget once per call (its retries happen inside it) where the streaming client
reserves before every attempt. Status codes the simulator never sends (401, 400, 404) come from a
tiny aiohttp server in this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from services.agents.llm import (
    CLIENT_KINDS,
    Backend,
    ChatMessage,
    ClientKind,
    LLMCallFailed,
    LLMCallTimeout,
    LLMRouter,
    estimated_usage,
)
from services.agents.llm_budget import Reservation
from services.gen.roundtable.common.v1 import discussion_pb2
from services.simulator.app import RequestRecord
from services.simulator.server import RunningSimulator, start_simulator
from services.simulator.settings import SimulatorSettings

MAX_TOKENS = 32
MESSAGES = [ChatMessage("system", "You are 科学家, a scientist."), ChatMessage("user", "话题: contract")]
# The estimate a call reserves: prompt characters / 4 + 1, plus max_tokens.
ESTIMATE = sum(len(m.content) for m in MESSAGES) // 4 + 1 + MAX_TOKENS

pytestmark = pytest.mark.parametrize("kind", CLIENT_KINDS)


@dataclass
class RecordingBudget:
    """An LLMBudget that grants at once and records every reserve, settle and cool-down."""

    reserved: list[tuple[str, str, int]] = field(default_factory=list)
    settled: list[int] = field(default_factory=list)
    cool_downs: list[tuple[str, float]] = field(default_factory=list)

    async def reserve(self, backend: str, principal: str, tokens: int, deadline: float | None) -> Reservation:
        self.reserved.append((backend, principal, tokens))
        return self

    async def settle(self, used_tokens: int) -> None:
        self.settled.append(used_tokens)

    async def cool_down(self, backend: str, seconds: float) -> None:
        self.cool_downs.append((backend, seconds))

    async def close(self) -> None:
        pass


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    """A fast simulator with short answers (12 tokens)."""
    settings = SimulatorSettings(
        port=0, first_token_latency_ms=1, tokens_per_second=5000, answer_tokens_min=12, answer_tokens_max=12
    )
    async with await start_simulator(settings) as running:
        yield running


@contextlib.asynccontextmanager
async def router(
    base_url: str,
    kind: ClientKind,
    *,
    max_retries: int = 3,
    max_concurrent_calls: int = 16,
    budget: RecordingBudget | None = None,
    api_key: str = "sim",
) -> AsyncIterator[LLMRouter]:
    llm = LLMRouter(
        default=Backend(name="contract", base_url=base_url, api_key=api_key, model="roundtable-sim-1", client=kind),
        temperature=0.7,
        max_tokens=MAX_TOKENS,
        max_retries=max_retries,
        max_concurrent_calls=max_concurrent_calls,
        budget=budget,
    )
    try:
        yield llm
    finally:
        await llm.close()


async def ask(
    llm: LLMRouter,
    messages: Sequence[ChatMessage] = MESSAGES,
    *,
    timeout_seconds: float = 10,
    deadline: float | None = None,
) -> tuple[list[str], discussion_pb2.TokenUsage, list[float]]:
    """The texts, the usage and when each text arrived (time.monotonic)."""
    texts: list[str] = []
    arrived: list[float] = []
    usage = None
    async for chunk in llm.stream_chat(messages, timeout_seconds=timeout_seconds, deadline=deadline, principal="p1"):
        if chunk.text:
            texts.append(chunk.text)
            arrived.append(time.monotonic())
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None
    return texts, usage, arrived


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def only_record(sim: RunningSimulator) -> RequestRecord:
    (record,) = sim.simulator.requests
    return record


async def test_a_stream_gives_the_answer_piece_by_piece_with_the_providers_usage(
    sim: RunningSimulator, kind: ClientKind
) -> None:
    # 20 tokens a second: 12 pieces over 0.6 s, so pieces given at once would arrive together.
    sim.simulator.configure(tokens_per_second=20)
    budget = RecordingBudget()
    async with router(sim.base_url, kind, budget=budget) as llm:
        texts, usage, arrived = await ask(llm)

    record = only_record(sim)
    assert "".join(texts) == record.answer and len(texts) == record.pieces_sent == 12
    assert arrived[-1] - arrived[0] >= 0.3  # they came as they were written, not all at the end
    assert (usage.prompt_tokens, usage.completion_tokens) == (record.prompt_tokens, 12)
    assert usage.total_tokens == usage.prompt_tokens + 12
    assert budget.reserved == [(Backend("c", sim.base_url, "sim", "m").budget_key, "p1", ESTIMATE)]
    assert budget.settled == [usage.total_tokens]
    assert not record.client_disconnected


async def test_a_server_that_sends_no_usage_gets_the_estimate(kind: ClientKind) -> None:
    # llama.cpp's server ignores stream_options.include_usage.
    lines: list[Mapping[str, object]] = [
        {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]} for word in ("a", " b")
    ]
    lines.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    async with scripted_server(sse_body(lines)) as (base_url, _), router(base_url, kind) as llm:
        texts, usage, _ = await ask(llm)
    assert texts == ["a", " b"]
    assert usage == estimated_usage(MESSAGES, 2)


async def test_a_429_is_retried_after_its_retry_after_and_pauses_the_budget(
    sim: RunningSimulator, kind: ClientKind
) -> None:
    sim.simulator.configure(fail_429_rate=1.0, retry_after_seconds=0.3)
    budget = RecordingBudget()
    rate_limited, retries = sample("roundtable_llm_rate_limited_total"), sample("roundtable_llm_retries_total")
    async with router(sim.base_url, kind, budget=budget) as llm:
        call = asyncio.create_task(ask(llm))
        async with asyncio.timeout(5):
            await sim.simulator.wait_for_record(lambda r: r.outcome == "429" and r.finished)
        sim.simulator.configure(fail_429_rate=0.0)
        texts, usage, _ = await call

    refused, answered = sim.simulator.requests
    assert refused.outcome == "429" and answered.outcome == "ok"
    assert "".join(texts) == answered.answer
    assert answered.retry_of == refused.request_id
    assert answered.waited_seconds is not None and answered.waited_seconds >= 0.3
    assert sample("roundtable_llm_rate_limited_total") - rate_limited == 1
    assert sample("roundtable_llm_retries_total") - retries == 1
    assert [seconds for _, seconds in budget.cool_downs] == [0.3]
    # Every reservation settled: the refused attempt for nothing, the answer for what it used.
    assert len(budget.settled) == len(budget.reserved) == (2 if kind == "stream" else 1)
    assert budget.settled[-1] == usage.total_tokens and sum(budget.settled[:-1]) == 0


async def test_a_500_then_success_answers_once(sim: RunningSimulator, kind: ClientKind) -> None:
    sim.simulator.configure(fail_500_rate=1.0, error_retry_after_seconds=0.05)
    async with router(sim.base_url, kind) as llm:
        call = asyncio.create_task(ask(llm))
        async with asyncio.timeout(5):
            await sim.simulator.wait_for_record(lambda r: r.outcome == "500" and r.finished)
        sim.simulator.configure(fail_500_rate=0.0)
        texts, _, _ = await call
    failed, answered = sim.simulator.requests
    assert failed.outcome == "500" and answered.outcome == "ok" and answered.retry_of == failed.request_id
    assert "".join(texts) == answered.answer


async def test_retries_spent_fail_the_call_naming_the_backend_and_status(
    sim: RunningSimulator, kind: ClientKind
) -> None:
    sim.simulator.configure(fail_500_rate=1.0, error_retry_after_seconds=0.01)
    budget = RecordingBudget()
    async with router(sim.base_url, kind, max_retries=2, budget=budget) as llm:
        with pytest.raises(LLMCallFailed) as failed:
            await ask(llm)
    assert "LLM backend contract answered HTTP 500" in str(failed.value)
    assert "simulated server error" in str(failed.value)
    assert failed.value.retryable
    assert len(sim.simulator.requests) == 3
    assert budget.settled == [0] * len(budget.reserved)


@pytest.mark.parametrize(
    ("status", "message"),
    [(401, "Incorrect API key provided: sk-wrong."), (400, "'messages' is too long"), (404, "model not found")],
)
async def test_a_refusal_no_retry_can_fix_fails_at_once_with_the_providers_message(
    kind: ClientKind, status: int, message: str
) -> None:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    async with scripted_server(body, status=status) as (base_url, received), router(base_url, kind) as llm:
        with pytest.raises(LLMCallFailed) as failed:
            await ask(llm)
    assert str(failed.value) == f"LLM backend contract answered HTTP {status}: {message}"
    assert not failed.value.retryable
    assert len(received) == 1  # not sent again


async def test_the_api_key_and_organization_headers_reach_the_provider(kind: ClientKind) -> None:
    lines = [{"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}]
    async with scripted_server(sse_body(lines)) as (base_url, received):
        llm = LLMRouter(
            default=Backend("org", base_url, "sk-test", "m", client=kind, organization="org-1", project="proj-2"),
            temperature=0.7,
            max_tokens=MAX_TOKENS,
            max_retries=0,
            max_concurrent_calls=2,
        )
        try:
            await ask(llm)
        finally:
            await llm.close()
    (headers,) = received
    assert headers["Authorization"] == "Bearer sk-test"
    assert (headers["OpenAI-Organization"], headers["OpenAI-Project"]) == ("org-1", "proj-2")


async def test_a_hang_past_the_deadline_times_out_before_it_and_leaves(sim: RunningSimulator, kind: ClientKind) -> None:
    sim.simulator.configure(hang_rate=1.0)
    budget = RecordingBudget()
    async with router(sim.base_url, kind, budget=budget) as llm:
        started = time.monotonic()
        with pytest.raises(LLMCallTimeout, match=r"timed out after 0\.5 s"):
            await ask(llm, deadline=started + 0.5)
        ended = time.monotonic() - started
        async with asyncio.timeout(1):
            await sim.simulator.wait_for_record(lambda r: r.client_disconnected)
    assert 0.45 <= ended < 1.0
    assert budget.settled == [0]


async def test_a_disconnect_mid_answer_fails_the_call_and_is_not_sent_again(
    sim: RunningSimulator, kind: ClientKind
) -> None:
    sim.simulator.configure(disconnect_rate=1.0)
    given: list[str] = []
    async with router(sim.base_url, kind) as llm:
        with pytest.raises(LLMCallFailed, match="LLM backend contract"):
            async for chunk in llm.stream_chat(MESSAGES, timeout_seconds=10):
                given.append(chunk.text)
    record = only_record(sim)  # text was given: the call is never sent again
    assert record.outcome == "disconnect"
    assert len(given) == record.pieces_sent > 0 and record.answer.startswith("".join(given))


async def test_a_malformed_line_is_skipped_by_the_stream_client_and_fails_the_sdk_client(
    sim: RunningSimulator, kind: ClientKind, caplog: pytest.LogCaptureFixture
) -> None:
    # The simulator sends a chunk cut short halfway (invalid JSON), then that chunk whole.
    sim.simulator.configure(malformed_line_rate=1.0)
    malformed = sample("roundtable_llm_malformed_lines_total")
    async with router(sim.base_url, kind) as llm:
        if kind == "stream":
            with caplog.at_level(logging.WARNING, logger="services.agents.llm_stream"):
                texts, _, _ = await ask(llm)
            assert "".join(texts) == only_record(sim).answer
            assert sample("roundtable_llm_malformed_lines_total") - malformed == 1
            assert any("1 malformed SSE data line" in r.getMessage() for r in caplog.records)
        else:
            # The SDK cannot skip a line: the call fails, as the port's error, not the SDK's.
            with pytest.raises(LLMCallFailed, match="LLM backend contract failed mid-stream"):
                await ask(llm)
    assert only_record(sim).outcome == "malformed"


async def test_a_complete_answer_without_done_is_accepted(sim: RunningSimulator, kind: ClientKind) -> None:
    sim.simulator.configure(missing_done_rate=1.0)
    async with router(sim.base_url, kind) as llm:
        texts, usage, _ = await ask(llm)
    record = only_record(sim)
    assert record.outcome == "no_done"
    assert "".join(texts) == record.answer and usage.completion_tokens == 12


@pytest.mark.parametrize("how", ["cancel", "aclose"])
async def test_cancelling_a_call_closes_its_socket_at_once(sim: RunningSimulator, kind: ClientKind, how: str) -> None:
    # 10 tokens a second: the answer would take 1.2 s more; the socket must close well before.
    sim.simulator.configure(tokens_per_second=10)
    budget = RecordingBudget()
    async with router(sim.base_url, kind, budget=budget) as llm:
        stream = llm.stream_chat(MESSAGES, timeout_seconds=30)
        if how == "cancel":
            # The task reading the stream is cancelled.
            first: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            async def read() -> None:
                async for chunk in stream:
                    if chunk.text and not first.done():
                        first.set_result(None)

            reader = asyncio.create_task(read())
            async with asyncio.timeout(5):
                await first
            left_at = time.monotonic()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        else:
            # The caller stops reading after the first text and closes the stream.
            async for chunk in stream:
                if chunk.text:
                    break
            left_at = time.monotonic()
            await stream.aclose()  # type: ignore[attr-defined]
        async with asyncio.timeout(1):
            record = await sim.simulator.wait_for_record(lambda r: r.client_disconnected and r.finished)
        assert record.finished_at is not None and record.finished_at - left_at < 1.0
        assert record.pieces_sent < 12
        assert llm.in_flight == 0
    assert budget.settled == [0]


async def test_sequential_calls_reuse_one_socket(sim: RunningSimulator, kind: ClientKind) -> None:
    async with counting_proxy(sim.port) as (proxy_url, connections), router(proxy_url, kind) as llm:
        for _ in range(5):
            await ask(llm)
        assert len(connections) == 1


async def test_concurrent_calls_open_no_more_sockets_than_the_cap(sim: RunningSimulator, kind: ClientKind) -> None:
    sim.simulator.configure(first_token_latency_ms=50)
    async with counting_proxy(sim.port) as (proxy_url, connections):
        async with router(proxy_url, kind, max_concurrent_calls=5) as llm:
            answers = await asyncio.gather(*(ask(llm) for _ in range(20)))
            assert len(answers) == 20
            assert 1 <= len(connections) <= 5


# --- the tiny servers -------------------------------------------------------------------------------


def sse_body(events: Sequence[Mapping[str, object]], done: bool = True) -> bytes:
    lines = [f"data: {json.dumps(event)}\n\n" for event in events]
    if done:
        lines.append("data: [DONE]\n\n")
    return "".join(lines).encode()


@contextlib.asynccontextmanager
async def scripted_server(
    body: bytes | Mapping[str, object], *, status: int = 200
) -> AsyncIterator[tuple[str, list[Mapping[str, str]]]]:
    """An OpenAI-compatible endpoint that answers every request with one scripted reply; yields its URL and the
    headers of each request it received."""
    received: list[Mapping[str, str]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        received.append(request.headers.copy())  # case-insensitive, as HTTP headers are
        if not isinstance(body, bytes):
            return web.json_response(dict(body), status=status)
        response = web.StreamResponse(status=status, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(body)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site.port}/v1", received
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def counting_proxy(upstream_port: int) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP relay to the simulator that records the client port of every connection it accepts."""
    connections: list[int] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        connections.append(client_writer.get_extra_info("peername")[1])
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", connections
    finally:
        server.close()
