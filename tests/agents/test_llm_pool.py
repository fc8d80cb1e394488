"""Neither client's connection pool queues a call: only the outbound cap does, outside each call's time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import httpx2
import pytest

from services.agents.llm import CLIENT_KINDS, Backend, ChatMessage, ClientKind, LLMCallFailed, LLMRouter
from services.agents.llm_openai_sdk import OpenAISDKChatClient
from services.agents.llm_stream import StreamingChatClient
from services.simulator.app import RequestRecord
from services.simulator.server import RunningSimulator, start_simulator
from services.simulator.settings import SimulatorSettings

FIRST_TOKEN_MS = 400


@pytest.fixture
async def slow_simulator() -> AsyncIterator[RunningSimulator]:
    """A simulator holding every request open 0.4 s before its first token."""
    async with await start_simulator(
        SimulatorSettings(port=0, first_token_latency_ms=FIRST_TOKEN_MS, tokens_per_second=2000)
    ) as simulator:
        yield simulator


def client_for(simulator: RunningSimulator, max_concurrent_calls: int, client: ClientKind = "openai-sdk") -> LLMRouter:
    return LLMRouter(
        default=Backend(
            name="simulator", base_url=simulator.base_url, api_key="sim", model="roundtable-sim-1", client=client
        ),
        temperature=0.7,
        max_tokens=16,
        max_retries=0,
        max_concurrent_calls=max_concurrent_calls,
    )


def most_at_once(records: list[RequestRecord]) -> int:
    """The most requests the server held open at the same time."""
    edges = sorted(
        [(r.started_at, 1) for r in records] + [(r.finished_at or float("inf"), -1) for r in records],
        key=lambda edge: (edge[0], edge[1]),  # an end before a start at the same instant
    )
    open_now = highest = 0
    for _, step in edges:
        open_now += step
        highest = max(highest, open_now)
    return highest


async def answer(llm: LLMRouter, n: int, timeout_seconds: float) -> str:
    messages = [ChatMessage("system", "You are 科学家."), ChatMessage("user", f"话题: pool {n}")]
    return "".join([c.text async for c in llm.stream_chat(messages, timeout_seconds=timeout_seconds)])


async def test_each_sdk_endpoint_pools_a_connection_for_every_call_the_cap_lets_through() -> None:
    llm = LLMRouter(
        default=Backend(name="a", base_url="http://127.0.0.1:9/v1", api_key="k", model="m", client="openai-sdk"),
        extra=[Backend(name="b", base_url="http://127.0.0.1:10/v1", api_key="k", model="m", client="openai-sdk")],
        temperature=0.7,
        max_tokens=16,
        max_retries=0,
        max_concurrent_calls=3000,  # past the SDK's default pool of 1,000
    )
    clients = [llm.default_client, *llm.clients.values()]
    assert all(isinstance(client, OpenAISDKChatClient) for client in clients)
    try:
        for client in clients:
            # httpcore's pool, as the SDK's httpx client built it.
            pool = client.sdk._client._transport._pool  # type: ignore[attr-defined]
            assert (pool._max_connections, pool._max_keepalive_connections) == (3000, 1000)
    finally:
        await llm.close()
    assert all(client.sdk.is_closed() for client in clients)  # type: ignore[attr-defined]


async def test_each_streaming_endpoint_pools_a_socket_for_every_call_the_cap_lets_through() -> None:
    llm = LLMRouter(
        default=Backend(name="a", base_url="http://127.0.0.1:9/v1", api_key="k", model="m"),
        extra=[
            Backend(name="b", base_url="http://127.0.0.1:10/v1", api_key="k", model="m"),
            # Another model and key on a's endpoint: its calls use a's sockets.
            Backend(name="c", base_url="http://127.0.0.1:9/v1", api_key="other", model="n"),
        ],
        temperature=0.7,
        max_tokens=16,
        max_retries=0,
        max_concurrent_calls=3000,
    )
    clients = [llm.default_client, *llm.clients.values()]
    assert all(isinstance(client, StreamingChatClient) for client in clients)
    sessions = [client.session for client in clients]  # type: ignore[attr-defined]
    assert sessions[0] is sessions[2] is not sessions[1]
    try:
        for session in sessions:
            connector = session.connector
            assert isinstance(connector, aiohttp.TCPConnector)
            assert (connector.limit, connector.limit_per_host) == (3000, 0)
    finally:
        await llm.close()
    assert all(session.closed for session in sessions)


@pytest.mark.parametrize("client", CLIENT_KINDS)
async def test_calls_past_the_cap_wait_outside_their_time_and_none_waits_for_a_connection(
    slow_simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch, client: ClientKind
) -> None:
    # The SDK's default pool shrunk to 2 connections stands in for its 1,000 at scale: with it the
    # 3rd call onwards would wait for a connection inside its 1 s and time out.
    monkeypatch.setattr("openai._base_client.DEFAULT_CONNECTION_LIMITS", httpx2.Limits(max_connections=2))
    cap, extra = 8, 4
    llm = client_for(slow_simulator, max_concurrent_calls=cap, client=client)
    try:
        answers = await asyncio.gather(*(answer(llm, n, timeout_seconds=1.0) for n in range(cap + extra)))
    finally:
        await llm.close()
    assert all(answers)  # every call answered, none ended as LLMCallTimeout
    records = slow_simulator.simulator.requests
    assert len(records) == cap + extra
    assert most_at_once(records) == cap  # the cap, and only the cap, bounds what reaches the server


async def test_without_a_pool_sized_to_the_cap_the_calls_time_out(
    slow_simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The failure the test above guards against, reproduced: a pool smaller than the cap.
    monkeypatch.setattr("services.agents.llm_openai_sdk.connection_limits", lambda _: httpx2.Limits(max_connections=2))
    llm = client_for(slow_simulator, max_concurrent_calls=8)
    try:
        outcomes = await asyncio.gather(
            *(answer(llm, n, timeout_seconds=1.0) for n in range(8)), return_exceptions=True
        )
    finally:
        await llm.close()
    assert any(isinstance(outcome, TimeoutError) for outcome in outcomes)
    assert most_at_once(slow_simulator.simulator.requests) <= 2
    assert not any(isinstance(outcome, LLMCallFailed) for outcome in outcomes)
