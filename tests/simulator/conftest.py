"""Fixtures for the simulator tests: a real server on a free port and real clients."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest

from services.simulator.server import RunningSimulator, start_simulator
from services.simulator.settings import SimulatorSettings


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    """A fresh simulator on a free port, stopped after the test."""
    # Small latencies keep the whole module at a few seconds; 24-token answers end on their own ("stop") at the
    # default cap, as the tests written before drawn lengths expect.
    settings = SimulatorSettings(
        port=0,
        first_token_latency_ms=5.0,
        tokens_per_second=2000.0,
        max_tokens_default=24,
        answer_tokens_min=24,
        answer_tokens_max=24,
    )
    running = await start_simulator(settings)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def client(sim: RunningSimulator) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official OpenAI client pointed at the simulator, without retries."""
    async with openai.AsyncOpenAI(api_key="sim", base_url=sim.base_url, max_retries=0) as oai:
        yield oai


@pytest.fixture
async def http(sim: RunningSimulator) -> AsyncIterator[aiohttp.ClientSession]:
    """A raw HTTP session rooted at the simulator, for control endpoints and malformed requests."""
    async with aiohttp.ClientSession(base_url=sim.root_url + "/") as session:
        yield session
