"""End-to-end tests of the LLM simulator through the real openai SDK and raw HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, cast

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from services.simulator.__main__ import load_settings
from services.simulator.answer import extract_persona, extract_topic, render_answer
from services.simulator.server import RunningSimulator, start_simulator
from services.simulator.settings import SimulatorSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_messages(persona: str, topic: str, history: str = "") -> list[dict[str, str]]:
    """Build a prompt that follows the agent service's conventions."""
    return [
        {"role": "system", "content": f"You are {persona}, a thoughtful panelist.\nBe brief."},
        {"role": "user", "content": f"{history}Topic: {topic}\nGive your opinion."},
    ]


def sdk(messages: list[dict[str, str]]) -> list[ChatCompletionMessageParam]:
    """Type plain message dicts as the SDK's message params."""
    return cast(list[ChatCompletionMessageParam], messages)


async def ask(client: openai.AsyncOpenAI, messages: Any, **kwargs: Any) -> ChatCompletion:
    """Send a non-streaming request."""
    return await client.chat.completions.create(model="roundtable-sim-1", messages=messages, **kwargs)


# --- prompt conventions -------------------------------------------------------------------------------


def test_persona_and_topic_extraction_rules() -> None:
    msgs = [
        {"role": "system", "content": "Intro. You are Dr Ada Lovelace; a mathematician. You are ignored"},
        {"role": "user", "content": "Topic: first\nmore"},
        {"role": "assistant", "content": "  Topic:  final topic  \nrest"},
    ]
    assert extract_persona(msgs) == "Dr Ada Lovelace"
    assert extract_topic(msgs) == "final topic"
    assert extract_persona([{"role": "system", "content": "You are 李白，诗人。"}]) == "李白"
    assert extract_persona([{"role": "system", "content": "You are 孔子：老师"}]) == "孔子"
    assert extract_persona([{"role": "system", "content": "No marker here"}]) == "assistant"
    assert extract_persona([{"role": "user", "content": "You are Bob."}]) == "assistant"
    long_question = "x" * 300
    fallback = [{"role": "user", "content": "old"}, {"role": "user", "content": long_question}]
    assert extract_topic(fallback) == "x" * 200
    text = render_answer(make_messages("Bob", "tea"), 10)
    assert text.startswith("Bob on «tea»: ")
    assert len(text.split()) == 10
    assert render_answer(make_messages("Bob", "tea"), 1).startswith("Bob on «tea»: ")


# --- non-streaming ------------------------------------------------------------------------------------


async def test_non_streaming_answer_is_deterministic_and_identifies_discussion(
    client: openai.AsyncOpenAI, sim: RunningSimulator
) -> None:
    messages = make_messages("Alice", "the future of cities")
    first = await ask(client, messages)
    second = await ask(client, messages)
    other = await ask(client, make_messages("Alice", "ocean farming"))

    text = first.choices[0].message.content
    assert text is not None
    assert text.startswith("Alice on «the future of cities»: ")
    assert second.choices[0].message.content == text
    assert other.choices[0].message.content != text
    assert "ocean farming" in (other.choices[0].message.content or "")
    assert first.choices[0].finish_reason == "stop"
    assert first.object == "chat.completion"

    usage = first.usage
    assert usage is not None
    assert usage.completion_tokens == len(text.split()) == sim.simulator.settings.max_tokens_default
    assert usage.prompt_tokens == sum(len(m["content"]) for m in messages) // 4 + 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    records = sim.simulator.requests
    assert [r.outcome for r in records] == ["ok", "ok", "ok"]
    assert records[0].persona == "Alice" and records[0].topic == "the future of cities"
    assert records[0].messages == messages
    assert records[0].finished_at is not None and records[0].finished_at >= records[0].started_at
    assert records[0].status_code == 200 and not records[0].client_disconnected


async def test_max_tokens_caps_answer_words(client: openai.AsyncOpenAI) -> None:
    messages = make_messages("Carol", "tea")
    short = await ask(client, messages, max_tokens=9)
    newer = await ask(client, messages, max_completion_tokens=12)
    assert len((short.choices[0].message.content or "").split()) == 9
    assert len((newer.choices[0].message.content or "").split()) == 12
    # Truncation, not a different answer: the shorter text is a prefix of the longer one.
    assert (newer.choices[0].message.content or "").startswith(short.choices[0].message.content or "")


# --- streaming ----------------------------------------------------------------------------------------


async def test_streaming_matches_non_streaming_and_reports_usage_once(
    client: openai.AsyncOpenAI, sim: RunningSimulator
) -> None:
    # Slow enough that a busy machine delaying the first chunk by a few tens of ms cannot hide the pacing.
    sim.simulator.configure(tokens_per_second=50.0)
    messages = make_messages("Dmitri", "open source licensing")
    reference = await ask(client, messages)

    pieces: list[str] = []
    arrivals: list[float] = []
    usage_chunks = []
    roles = []
    finish_reasons = []
    stream = await client.chat.completions.create(
        model="roundtable-sim-1", messages=sdk(messages), stream=True, stream_options={"include_usage": True}
    )
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage_chunks.append(chunk.usage)
            assert chunk.choices == []
            continue
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        if delta.content:
            pieces.append(delta.content)
            arrivals.append(time.monotonic())
        if chunk.choices[0].finish_reason:
            finish_reasons.append(chunk.choices[0].finish_reason)

    reference_text = reference.choices[0].message.content
    assert reference_text is not None and reference.usage is not None
    assert "".join(pieces) == reference_text
    assert len(pieces) == len(reference_text.split())
    assert roles == ["assistant"]
    assert finish_reasons == ["stop"]
    assert len(usage_chunks) == 1
    assert usage_chunks[0].model_dump() == reference.usage.model_dump()
    # 24 words at 50/s: tokens must be spread out, not dumped in one write.
    assert len(pieces) >= 2
    assert arrivals[-1] - arrivals[0] >= 0.5 * (len(pieces) - 1) / 50.0
    assert sim.simulator.requests[-1].stream is True
    assert sim.simulator.requests[-1].pieces_sent == len(pieces)


async def test_streaming_without_usage_sends_no_usage_chunk(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="roundtable-sim-1", messages=sdk(make_messages("Eve", "privacy")), stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    assert all(len(chunk.choices) == 1 for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).startswith("Eve on «privacy»: ")


async def test_raw_sse_framing(http: aiohttp.ClientSession) -> None:
    body = {"messages": make_messages("Fay", "bees"), "stream": True, "stream_options": {"include_usage": True}}
    async with http.post("v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    events = raw.split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    assert all(event.startswith("data: ") for event in events[:-1])


# --- failure injection --------------------------------------------------------------------------------


async def test_429_injection_retry_after_and_runtime_reset(
    client: openai.AsyncOpenAI, sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    async with http.post("_sim/config", json={"fail_429_rate": 1.0, "retry_after_seconds": 1.0}) as resp:
        assert resp.status == 200
        assert (await resp.json())["fail_429_rate"] == 1.0

    with pytest.raises(openai.RateLimitError) as info:
        await ask(client, make_messages("Gus", "rates"))
    assert float(info.value.response.headers["Retry-After"]) == 1.0
    assert info.value.response.headers["retry-after-ms"] == "1000"
    assert info.value.code == "rate_limit_exceeded"
    record = sim.simulator.requests[-1]
    assert (record.outcome, record.status_code, record.retry_after_seconds) == ("429", 429, 1.0)

    async with http.post("_sim/config", json={"fail_429_rate": 0.0}) as resp:
        assert resp.status == 200
    ok = await ask(client, make_messages("Gus", "rates"))
    assert (ok.choices[0].message.content or "").startswith("Gus on «rates»")


async def test_sdk_retries_are_visible_in_the_log(sim: RunningSimulator) -> None:
    sim.simulator.configure(fail_429_rate=1.0, retry_after_seconds=0.01)
    async with openai.AsyncOpenAI(api_key="sim", base_url=sim.base_url, max_retries=2) as retrying:
        with pytest.raises(openai.RateLimitError):
            await ask(retrying, make_messages("Hal", "retries"))
    records = sim.simulator.requests
    assert len(records) == 3
    assert all(r.outcome == "429" and r.persona == "Hal" for r in records)


async def test_500_injection_and_fail_personas(client: openai.AsyncOpenAI, sim: RunningSimulator) -> None:
    sim.simulator.configure(fail_500_rate=1.0)
    with pytest.raises(openai.InternalServerError):
        await ask(client, make_messages("Ivy", "outages"))
    assert sim.simulator.requests[-1].outcome == "500"

    sim.simulator.configure(fail_500_rate=0.0, fail_personas=["Jack"])
    with pytest.raises(openai.InternalServerError) as info:
        await ask(client, make_messages("Jack", "outages"))
    assert "Jack" in str(info.value)
    ok = await ask(client, make_messages("Kim", "outages"))
    assert (ok.choices[0].message.content or "").startswith("Kim on «outages»")
    assert [(r.persona, r.outcome, r.status_code) for r in sim.simulator.requests] == [
        ("Ivy", "500", 500),
        ("Jack", "500", 500),
        ("Kim", "ok", 200),
    ]


async def test_fail_personas_from_settings() -> None:
    settings = SimulatorSettings(port=0, first_token_latency_ms=0, fail_personas=["Zed"])
    async with await start_simulator(settings) as running:
        async with openai.AsyncOpenAI(api_key="sim", base_url=running.base_url, max_retries=0) as oai:
            with pytest.raises(openai.InternalServerError):
                await ask(oai, make_messages("Zed", "x"))
            await ask(oai, make_messages("Zoe", "x"))


async def test_failure_draws_are_reproducible_from_the_seed() -> None:
    async def outcomes(seed: int) -> list[str]:
        settings = SimulatorSettings(port=0, first_token_latency_ms=0, fail_429_rate=0.5, seed=seed)
        async with await start_simulator(settings) as running:
            async with openai.AsyncOpenAI(api_key="sim", base_url=running.base_url, max_retries=0) as oai:
                for i in range(20):
                    try:
                        await ask(oai, make_messages(f"P{i}", "seeds"), max_tokens=3)
                    except openai.RateLimitError:
                        pass
            return [r.outcome for r in running.simulator.requests]

    first, again, other = await outcomes(7), await outcomes(7), await outcomes(8)
    assert first == again
    assert set(first) == {"ok", "429"}
    assert first != other


@pytest.mark.parametrize("stream", [False, True])
async def test_hang_then_cancel_closes_request_within_one_second(
    client: openai.AsyncOpenAI, sim: RunningSimulator, stream: bool
) -> None:
    sim.simulator.configure(hang_rate=1.0)
    task = asyncio.create_task(ask(client, make_messages("Lea", "waiting"), stream=stream))
    await asyncio.sleep(0.2)
    assert not task.done()
    record = sim.simulator.requests[-1]
    assert record.outcome == "hang" and record.finished_at is None and sim.simulator.in_flight == 1

    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(1.0):
        await sim.simulator.wait_for_record(lambda r: r.client_disconnected)
    assert record.client_disconnected and record.outcome == "hang"
    assert record.finished_at is not None and record.finished_at - cancelled_at < 1.0
    assert sim.simulator.in_flight == 0


async def test_client_leaving_mid_stream_is_recorded(client: openai.AsyncOpenAI, sim: RunningSimulator) -> None:
    sim.simulator.configure(tokens_per_second=20.0)

    received: list[str] = []
    two_received = asyncio.Event()

    async def consume() -> None:
        stream = await client.chat.completions.create(
            model="roundtable-sim-1", messages=sdk(make_messages("Max", "patience")), stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
                if len(received) >= 2:
                    two_received.set()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(2.0):
        await two_received.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(1.0):
        record = await sim.simulator.wait_for_record(lambda r: r.finished_at is not None)
    assert record.outcome == "disconnected" and record.client_disconnected
    assert 2 <= record.pieces_sent < len(record.answer.split())


async def test_stop_releases_hanging_requests_quickly() -> None:
    running = await start_simulator(SimulatorSettings(port=0, hang_rate=1.0))
    oai = openai.AsyncOpenAI(api_key="sim", base_url=running.base_url, max_retries=0)
    task = asyncio.create_task(ask(oai, make_messages("Ned", "shutdown")))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await running.stop()
    assert time.monotonic() - started < 1.0
    with pytest.raises(openai.APIError):
        await task
    await oai.close()
    assert running.simulator.requests[0].client_disconnected is False


# --- other endpoints and robustness -------------------------------------------------------------------


async def test_models_endpoint(client: openai.AsyncOpenAI) -> None:
    models = [model.id async for model in client.models.list()]
    assert models == ["roundtable-sim-1"]


async def test_bad_requests_get_openai_errors(http: aiohttp.ClientSession, sim: RunningSimulator) -> None:
    async with http.post("v1/chat/completions", data=b"{not json") as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error" and error["code"] is None and error["message"]
    async with http.post("v1/chat/completions", json={"model": "m"}) as resp:
        assert resp.status == 400
        assert "messages" in (await resp.json())["error"]["message"]
    zero_tokens = {"messages": [{"role": "user"}], "max_tokens": 0}
    async with http.post("v1/chat/completions", json=zero_tokens) as resp:
        assert resp.status == 400
    assert [r.outcome for r in sim.simulator.requests] == ["400", "400", "400"]


async def test_control_endpoints(http: aiohttp.ClientSession, client: openai.AsyncOpenAI) -> None:
    async with http.get("healthz") as resp:
        assert resp.status == 200 and await resp.text() == "ok"
    await ask(client, make_messages("Olga", "logs"))
    async with http.get("_sim/requests") as resp:
        records = await resp.json()
    assert len(records) == 1
    assert records[0]["persona"] == "Olga" and records[0]["topic"] == "logs"
    assert records[0]["outcome"] == "ok" and records[0]["client_disconnected"] is False
    assert records[0]["messages"] == make_messages("Olga", "logs")
    async with http.post("_sim/reset") as resp:
        assert (await resp.json()) == {"cleared": 1}
    async with http.get("_sim/requests") as resp:
        assert await resp.json() == []

    for bad in ({"hang_rate": 1.5}, {"tokens_per_second": 0}, {"no_such_field": 1}, [1, 2]):
        async with http.post("_sim/config", json=bad) as resp:
            assert resp.status == 400, bad
    async with http.post("_sim/config", data=b"nope") as resp:
        assert resp.status == 400
    async with http.get("_sim/config") as resp:
        assert (await resp.json())["hang_rate"] == 0.0


async def test_200_concurrent_requests_have_no_cross_talk(client: openai.AsyncOpenAI, sim: RunningSimulator) -> None:
    async def one(i: int) -> tuple[int, str]:
        messages = make_messages(f"Persona{i}", f"topic number {i}")
        if i % 2:
            stream = await client.chat.completions.create(model="roundtable-sim-1", messages=sdk(messages), stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        else:
            text = (await ask(client, messages)).choices[0].message.content or ""
        return i, text

    results = await asyncio.gather(*(one(i) for i in range(200)))
    for i, text in results:
        assert text.startswith(f"Persona{i} on «topic number {i}»: "), (i, text)
    records = sim.simulator.requests
    assert len(records) == 200 and all(r.outcome == "ok" for r in records)
    expected = {(f"Persona{i}", f"topic number {i}") for i in range(200)}
    assert {(r.persona, r.topic) for r in records} == expected


# --- settings and command line ------------------------------------------------------------------------


def test_settings_validation_and_cli_overrides_env(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError):
        SimulatorSettings(fail_429_rate=1.5)
    with pytest.raises(ValueError):
        SimulatorSettings(tokens_per_second=0)
    monkeypatch.setenv("ROUNDTABLE_SIMULATOR_PORT", "1234")
    monkeypatch.setenv("ROUNDTABLE_SIMULATOR_HANG_RATE", "0.25")
    monkeypatch.setenv("ROUNDTABLE_SIMULATOR_FAIL_PERSONAS", "Ann, Ben")
    from_env = load_settings([])
    assert (from_env.port, from_env.hang_rate, from_env.fail_personas) == (1234, 0.25, ["Ann", "Ben"])
    from_cli = load_settings(["--port", "0", "--hang-rate", "0.5", "--fail-personas", "Cy", "--seed", "3"])
    assert (from_cli.port, from_cli.hang_rate, from_cli.fail_personas, from_cli.seed) == (0, 0.5, ["Cy"], 3)
    with pytest.raises(SystemExit):
        load_settings(["--fail-500-rate", "2"])


async def test_module_entry_point_serves_and_exits_cleanly_on_sigterm() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("ROUNDTABLE_SIMULATOR_PORT", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.simulator",
        "--port",
        "0",
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(15):
            line = (await proc.stdout.readline()).decode().strip()
        assert line.startswith("simulator listening on http://127.0.0.1:") and line.endswith("/v1"), line
        base_url = line.removeprefix("simulator listening on ")
        async with aiohttp.ClientSession() as session:
            async with session.get(base_url.removesuffix("/v1") + "/healthz") as resp:
                assert resp.status == 200 and await resp.text() == "ok"
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            returncode = await proc.wait()
        assert returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
