"""What only the streaming client does: the provider's wait hints, waits past the deadline, budget refusals,
streams that end too early, error events, an endpoint nobody listens on."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import socket
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from services.agents.llm import BUDGET_TIMEOUT_REASON, Backend, ChatMessage, LLMCallFailed, LLMCallTimeout, LLMRouter
from services.agents.llm_budget import LLMBudgetExhausted, LLMBudgetUnavailable, Reservation, UnlimitedBudget
from services.agents.llm_stream import env_proxy, parse_duration_seconds, retry_after_seconds
from services.simulator.server import RunningSimulator, start_simulator
from services.simulator.settings import SimulatorSettings

MESSAGES = [ChatMessage("system", "You are 科学家."), ChatMessage("user", "话题: stream")]


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def streaming_router(base_url: str, *, max_retries: int = 2, budget: object = None) -> LLMRouter:
    return LLMRouter(
        default=Backend("edge", base_url, "key", "m"),
        temperature=0.7,
        max_tokens=16,
        max_retries=max_retries,
        max_concurrent_calls=4,
        budget=budget,  # type: ignore[arg-type]
    )


async def answer(llm: LLMRouter, *, timeout_seconds: float = 10) -> str:
    try:
        return "".join([c.text async for c in llm.stream_chat(MESSAGES, timeout_seconds=timeout_seconds)])
    finally:
        await llm.close()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5s", 0.5), (" 2s ", 2.0)],
)
def test_openai_durations_are_read(text: str, seconds: float) -> None:
    assert parse_duration_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "abc", "1s junk", "s", "-1s"])
def test_malformed_durations_are_none(text: str) -> None:
    assert parse_duration_seconds(text) is None


def test_the_largest_wait_the_provider_names_is_taken() -> None:
    assert retry_after_seconds({"retry-after-ms": "200", "retry-after": "1"}, rate_limited=False) == 1.0
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "1"}, rate_limited=False) == 1.5
    in_three_seconds = email.utils.formatdate(time.time() + 3, usegmt=True)
    assert retry_after_seconds({"retry-after": in_three_seconds}, rate_limited=False) == pytest.approx(3, abs=1.1)
    assert retry_after_seconds({"retry-after": "soon"}, rate_limited=False) is None
    assert retry_after_seconds({}, rate_limited=True) is None


def test_a_spent_quotas_reset_counts_on_a_429_only() -> None:
    spent = {"retry-after": "1", "x-ratelimit-reset-requests": "6m0s", "x-ratelimit-remaining-requests": "0"}
    assert retry_after_seconds(spent, rate_limited=True) == 360.0
    assert retry_after_seconds(spent, rate_limited=False) == 1.0  # a 500 carries no quota advice
    # A quota with room left says when it will be full again, not when a request may go: Retry-After rules.
    room_left = {**spent, "x-ratelimit-remaining-requests": "12"}
    assert retry_after_seconds(room_left, rate_limited=True) == 1.0
    tokens = {"x-ratelimit-reset-tokens": "20ms"}  # no remaining-tokens header: taken as spent
    assert retry_after_seconds(tokens, rate_limited=True) == pytest.approx(0.02)


def test_the_environments_proxy_applies_unless_no_proxy_exempts_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert env_proxy("https://api.openai.com/v1/chat/completions") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://egress:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert env_proxy("https://api.openai.com/v1/chat/completions") == "http://egress:3128"
    assert env_proxy("http://api.openai.com/v1/chat/completions") is None  # no HTTP_PROXY
    assert env_proxy("https://127.0.0.1:8443/v1/chat/completions") is None


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    settings = SimulatorSettings(port=0, first_token_latency_ms=1, tokens_per_second=5000)
    async with await start_simulator(settings) as running:
        yield running


class CoolDowns(UnlimitedBudget):
    """Unlimited, and records the cool-downs it is told."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def cool_down(self, backend: str, seconds: float) -> None:
        self.seconds.append(seconds)


async def test_a_wait_past_the_deadline_fails_at_once_with_the_providers_answer(sim: RunningSimulator) -> None:
    sim.simulator.configure(fail_429_rate=1.0, retry_after_seconds=30)
    budget = CoolDowns()
    started = time.monotonic()
    with pytest.raises(LLMCallFailed, match="LLM backend edge answered HTTP 429: simulated rate limit") as failed:
        await answer(streaming_router(sim.base_url, max_retries=5, budget=budget), timeout_seconds=5)
    assert time.monotonic() - started < 1.0  # no waiting for a retry that could not finish in time
    assert failed.value.retryable
    assert len(sim.simulator.requests) == 1
    assert budget.seconds == [30.0]  # the whole fleet still pauses as told


async def test_a_429_without_a_hint_pauses_the_backend_one_second() -> None:
    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": {"message": "slow down", "type": "requests"}}, status=429)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    budget = CoolDowns()
    try:
        with pytest.raises(LLMCallFailed, match="answered HTTP 429: slow down") as failed:
            await answer(streaming_router(f"http://127.0.0.1:{site.port}/v1", max_retries=0, budget=budget))
    finally:
        await runner.cleanup()
    assert failed.value.retryable
    assert budget.seconds == [1.0]


class Refusing(UnlimitedBudget):
    """A budget that refuses every reservation with the given error."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def reserve(self, backend: str, principal: str, tokens: int, deadline: float | None) -> Reservation:
        raise self.error


async def test_a_budget_that_waited_until_the_deadline_is_a_timeout(sim: RunningSimulator) -> None:
    budget = Refusing(LLMBudgetExhausted("no room"))
    with pytest.raises(LLMCallTimeout, match=BUDGET_TIMEOUT_REASON):
        await answer(streaming_router(sim.base_url, budget=budget))
    assert not sim.simulator.requests


async def test_an_unreachable_budget_failing_closed_fails_the_call_for_good(sim: RunningSimulator) -> None:
    budget = Refusing(LLMBudgetUnavailable("redis down"))
    with pytest.raises(LLMCallFailed, match="LLM budget of backend edge unavailable: redis down") as failed:
        await answer(streaming_router(sim.base_url, budget=budget))
    assert not failed.value.retryable
    assert not sim.simulator.requests


@contextlib.asynccontextmanager
async def sse_server(bodies: Sequence[bytes]) -> AsyncIterator[tuple[str, list[int]]]:
    """Answers the n-th request with bodies[n] (the last one again after that) as an event stream."""
    served: list[int] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        body = bodies[min(len(served), len(bodies) - 1)]
        served.append(len(served))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
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
        yield f"http://127.0.0.1:{site.port}/v1", served
    finally:
        await runner.cleanup()


def events(*payloads: Mapping[str, object] | str, done: bool = True) -> bytes:
    lines = [f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n" for p in payloads]
    return "".join([*lines, "data: [DONE]\n\n" if done else ""]).encode()


def text(content: str, finish: str | None = None) -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}


COMPLETE = events(text("fine"), text(" answer", "stop"))


async def test_a_stream_of_garbage_is_sent_again_and_then_fails(sim: RunningSimulator) -> None:
    garbage = events("{not json", '{"choices": 3}', "[1, 2]", done=False)
    malformed = sample("roundtable_llm_malformed_lines_total")
    async with sse_server([garbage]) as (base_url, served):
        with pytest.raises(LLMCallFailed, match="the stream ended before the answer did") as failed:
            await answer(streaming_router(base_url, max_retries=1))
    assert failed.value.retryable and "(after 1 retries)" in str(failed.value)
    assert len(served) == 2
    assert sample("roundtable_llm_malformed_lines_total") - malformed == 6


async def test_a_stream_that_ends_early_before_any_text_is_sent_again(sim: RunningSimulator) -> None:
    retries = sample("roundtable_llm_retries_total")
    async with sse_server([events(done=False), COMPLETE]) as (base_url, served):
        assert await answer(streaming_router(base_url)) == "fine answer"
    assert len(served) == 2
    assert sample("roundtable_llm_retries_total") - retries == 1


async def test_a_stream_that_ends_early_after_text_fails_without_a_resend(sim: RunningSimulator) -> None:
    async with sse_server([events(text("half"), done=False), COMPLETE]) as (base_url, served):
        with pytest.raises(LLMCallFailed, match="no \\[DONE\\], no finish_reason, after 1 pieces"):
            await answer(streaming_router(base_url))
    assert len(served) == 1


async def test_an_error_event_before_any_text_is_sent_again(sim: RunningSimulator) -> None:
    overloaded = events({"error": {"message": "the model is overloaded", "type": "server_error"}}, done=False)
    async with sse_server([overloaded, COMPLETE]) as (base_url, served):
        assert await answer(streaming_router(base_url)) == "fine answer"
    async with sse_server([overloaded]) as (base_url, served):
        with pytest.raises(LLMCallFailed, match="sent an error mid-stream: the model is overloaded"):
            await answer(streaming_router(base_url, max_retries=0))
    assert len(served) == 1


async def test_an_endpoint_nobody_listens_on_is_retried_then_named_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    retries = sample("roundtable_llm_retries_total")
    started = time.monotonic()
    with pytest.raises(LLMCallFailed, match="LLM backend edge unreachable") as failed:
        await answer(streaming_router(f"http://127.0.0.1:{port}/v1", max_retries=1))
    assert failed.value.retryable
    assert sample("roundtable_llm_retries_total") - retries == 1
    assert time.monotonic() - started < 3.0  # one backoff of 0.5 s + jitter


async def test_concurrent_calls_each_get_their_own_answer(sim: RunningSimulator) -> None:
    llm = streaming_router(sim.base_url)
    try:
        topics = [f"Topic: concurrent {n}" for n in range(30)]
        answers = await asyncio.gather(
            *(
                asyncio.create_task(collect(llm, [ChatMessage("system", "You are 科学家."), ChatMessage("user", t)]))
                for t in topics
            )
        )
    finally:
        await llm.close()
    by_topic = {r.topic: r.answer for r in sim.simulator.requests}
    assert [by_topic[t.removeprefix("Topic: ")] for t in topics] == answers


async def collect(llm: LLMRouter, messages: list[ChatMessage]) -> str:
    return "".join([c.text async for c in llm.stream_chat(messages, timeout_seconds=10)])
