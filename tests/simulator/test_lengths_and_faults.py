"""Drawn answer lengths with finish_reason, and the injected stream faults, seen by raw HTTP and the openai SDK."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

from services.simulator.__main__ import load_settings
from services.simulator.answer import answer_length, compose_answer
from services.simulator.server import RunningSimulator, start_simulator
from services.simulator.settings import SimulatorSettings
from tests.simulator.test_simulator import ask, make_messages, sdk

DONE_EVENT = "data: [DONE]"


async def read_events(http: aiohttp.ClientSession, body: dict[str, Any]) -> tuple[list[str], BaseException | None]:
    """Stream a chat completion; return its SSE events (without the "\\n\\n") and what the read raised, if anything."""
    events: list[str] = []
    buffer = ""
    try:
        async with http.post("v1/chat/completions", json={**body, "stream": True}) as resp:
            assert resp.status == 200
            async for data in resp.content.iter_any():
                buffer += data.decode()
                *complete, buffer = buffer.split("\n\n")
                events.extend(complete)
    except aiohttp.ClientError as exc:
        return events, exc
    assert buffer == "", buffer
    return events, None


def content_of(events: list[str]) -> str:
    """Join the content deltas of the well-formed chunk events."""
    text: list[str] = []
    for event in events:
        if event == DONE_EVENT:
            continue
        try:
            chunk = json.loads(event.removeprefix("data: "))
        except ValueError:
            continue
        text.extend(choice["delta"].get("content") or "" for choice in chunk["choices"])
    return "".join(text)


# --- answer lengths -----------------------------------------------------------------------------------------


def test_answer_length_is_drawn_from_the_range_by_the_prompt() -> None:
    prompts = [make_messages(f"P{i}", f"topic {i}") for i in range(200)]
    lengths = [answer_length(prompt, 100, 400) for prompt in prompts]
    assert all(100 <= length <= 400 for length in lengths)
    assert len(set(lengths)) > 100  # spread over the range, not one value
    assert lengths == [answer_length(prompt, 100, 400) for prompt in prompts]
    assert {answer_length(prompt, 7, 7) for prompt in prompts} == {7}


def test_compose_answer_cuts_to_the_cap_even_inside_the_header() -> None:
    messages = make_messages("Ada", "a topic of several words")
    whole = compose_answer(messages, 50, 50, cap_tokens=1000)
    assert (len(whole.pieces), whole.finish_reason) == (50, "stop")
    cut = compose_answer(messages, 50, 50, cap_tokens=20)
    assert (len(cut.pieces), cut.finish_reason) == (20, "length")
    assert whole.text.startswith(cut.text)
    tiny = compose_answer(messages, 50, 50, cap_tokens=2)
    assert tiny.pieces == ["Ada ", "on"] and tiny.text == "Ada on"
    assert compose_answer(messages, 50, 50, cap_tokens=50).finish_reason == "stop"


async def test_answers_fall_in_the_configured_range_and_repeat_per_prompt(
    client: openai.AsyncOpenAI, sim: RunningSimulator
) -> None:
    sim.simulator.configure(answer_tokens_min=30, answer_tokens_max=60)
    lengths = []
    for i in range(12):
        messages = make_messages("Bo", f"lengths {i}")
        first = await ask(client, messages, max_tokens=1000)
        again = await ask(client, messages, max_tokens=1000)
        assert first.usage is not None and first.choices[0].finish_reason == "stop"
        assert again.choices[0].message.content == first.choices[0].message.content
        assert len((first.choices[0].message.content or "").split()) == first.usage.completion_tokens
        lengths.append(first.usage.completion_tokens)
    assert all(30 <= length <= 60 for length in lengths)
    assert len(set(lengths)) > 3


async def test_max_tokens_cuts_the_answer_with_finish_reason_length(
    client: openai.AsyncOpenAI, sim: RunningSimulator
) -> None:
    sim.simulator.configure(answer_tokens_min=30, answer_tokens_max=60)
    messages = make_messages("Cy", "caps")
    natural = await ask(client, messages, max_tokens=1000)
    assert natural.usage is not None
    length = natural.usage.completion_tokens
    exact = await ask(client, messages, max_tokens=length)
    cut = await ask(client, messages, max_completion_tokens=length - 5)
    assert exact.choices[0].finish_reason == "stop" and exact.usage and exact.usage.completion_tokens == length
    assert cut.choices[0].finish_reason == "length" and cut.usage and cut.usage.completion_tokens == length - 5
    assert (natural.choices[0].message.content or "").startswith(cut.choices[0].message.content or "")
    # Without max_tokens the start-up max_tokens_default (24 here) is the cap.
    default = await ask(client, messages)
    assert default.usage and default.usage.completion_tokens == 24 and default.choices[0].finish_reason == "length"

    stream = await client.chat.completions.create(
        model="roundtable-sim-1", messages=sdk(messages), max_tokens=length - 5, stream=True
    )
    reasons = [c.choices[0].finish_reason async for c in stream if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"]
    assert [r.finish_reason for r in sim.simulator.requests] == ["stop", "stop", "length", "length", "length"]


async def test_the_answer_range_is_validated(http: aiohttp.ClientSession) -> None:
    with pytest.raises(ValueError):
        SimulatorSettings(answer_tokens_min=10, answer_tokens_max=9)
    for bad in ({"answer_tokens_min": 500}, {"answer_tokens_min": 0}, {"rpm_limit": -1}, {"disconnect_rate": 2}):
        async with http.post("_sim/config", json=bad) as resp:
            assert resp.status == 400, bad
    async with http.post("_sim/config", json={"answer_tokens_min": 5, "answer_tokens_max": 6}) as resp:
        assert resp.status == 200
        assert (await resp.json())["answer_tokens_max"] == 6


def test_cli_flags_for_the_new_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUNDTABLE_SIMULATOR_MISSING_DONE_RATE", "0.25")
    settings = load_settings(
        [
            *("--rpm-limit", "600", "--tpm-limit", "60000", "--answer-tokens-min", "5", "--answer-tokens-max", "9"),
            *("--disconnect-rate", "0.1", "--malformed-line-rate", "0.2"),
        ]
    )
    assert (settings.rpm_limit, settings.tpm_limit, settings.answer_tokens_min, settings.answer_tokens_max) == (
        600,
        60000,
        5,
        9,
    )
    assert (settings.disconnect_rate, settings.malformed_line_rate, settings.missing_done_rate) == (0.1, 0.2, 0.25)
    with pytest.raises(SystemExit):
        load_settings(["--answer-tokens-min", "10", "--answer-tokens-max", "9"])


# --- stream faults ------------------------------------------------------------------------------------------


async def test_disconnect_closes_the_stream_halfway_without_done(
    http: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    messages = make_messages("Dot", "dropped lines")
    full, error = await read_events(http, {"messages": messages})
    assert error is None and full[-1] == DONE_EVENT

    sim.simulator.configure(disconnect_rate=1.0)
    events, error = await read_events(http, {"messages": messages})
    assert isinstance(error, aiohttp.ClientPayloadError)  # the chunked body never ended
    assert DONE_EVENT not in events
    received = content_of(events)
    assert content_of(full).startswith(received) and len(received.split()) == 12  # half of 24
    record = sim.simulator.requests[-1]
    assert (record.outcome, record.status_code, record.pieces_sent) == ("disconnect", 200, 12)
    assert not record.client_disconnected


async def test_disconnect_is_a_connection_error_for_the_sdk(client: openai.AsyncOpenAI, sim: RunningSimulator) -> None:
    sim.simulator.configure(disconnect_rate=1.0)
    with pytest.raises(openai.APIConnectionError):
        stream = await client.chat.completions.create(
            model="roundtable-sim-1", messages=sdk(make_messages("Eve", "drops")), stream=True
        )
        async for _ in stream:
            pass
    with pytest.raises(openai.APIConnectionError):
        await ask(client, make_messages("Eve", "drops"))
    assert [(r.outcome, r.status_code, r.stream) for r in sim.simulator.requests] == [
        ("disconnect", 200, True),
        ("disconnect", None, False),
    ]


async def test_malformed_line_comes_once_halfway_and_the_stream_goes_on(
    http: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    body = {"messages": make_messages("Fay", "broken json"), "stream_options": {"include_usage": True}}
    clean, _ = await read_events(http, body)
    sim.simulator.configure(malformed_line_rate=1.0)
    events, error = await read_events(http, body)
    assert error is None

    def parses(event: str) -> bool:
        try:
            json.loads(event.removeprefix("data: "))
        except ValueError:
            return False
        return True

    broken = [i for i, event in enumerate(events) if event != DONE_EVENT and not parses(event)]
    assert len(broken) == 1 and events[broken[0]].startswith("data: {")
    assert 0.3 < broken[0] / len(events) < 0.7  # in the middle of the stream
    assert len(events) == len(clean) + 1 and events[-1] == DONE_EVENT
    assert content_of(events) == content_of(clean)
    assert sim.simulator.requests[-1].outcome == "malformed"


async def test_missing_done_ends_the_stream_cleanly_after_usage(
    http: aiohttp.ClientSession, client: openai.AsyncOpenAI, sim: RunningSimulator
) -> None:
    messages = make_messages("Gus", "no goodbye")
    body = {"messages": messages, "stream_options": {"include_usage": True}}
    clean, _ = await read_events(http, body)
    sim.simulator.configure(missing_done_rate=1.0)
    events, error = await read_events(http, body)
    assert error is None
    assert DONE_EVENT not in events and len(events) == len(clean) - 1
    assert content_of(events) == content_of(clean)
    assert json.loads(events[-1].removeprefix("data: "))["usage"]["completion_tokens"] == 24

    # The SDK takes the end of the body as the end of the stream.
    stream = await client.chat.completions.create(
        model="roundtable-sim-1", messages=sdk(messages), stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content_of(clean)
    assert [r.outcome for r in sim.simulator.requests] == ["ok", "no_done", "no_done"]


async def test_stream_faults_spare_non_streamed_answers() -> None:
    settings = SimulatorSettings(port=0, first_token_latency_ms=0, malformed_line_rate=1.0, missing_done_rate=1.0)
    async with await start_simulator(settings) as running:
        async with openai.AsyncOpenAI(api_key="sim", base_url=running.base_url, max_retries=0) as oai:
            answer = await ask(oai, make_messages("Hal", "whole answers"), max_tokens=5)
    assert answer.choices[0].message.content and running.simulator.requests[-1].outcome == "ok"


async def test_fault_draws_are_reproducible_from_the_seed() -> None:
    async def outcomes(seed: int) -> list[str]:
        settings = SimulatorSettings(
            port=0, first_token_latency_ms=0, tokens_per_second=5000, seed=seed, missing_done_rate=0.5
        )
        async with await start_simulator(settings) as running:
            async with aiohttp.ClientSession(base_url=running.root_url + "/") as session:
                for i in range(16):
                    await read_events(session, {"messages": make_messages(f"P{i}", "seeds"), "max_tokens": 3})
            return [r.outcome for r in running.simulator.requests]

    first, again, other = await outcomes(5), await outcomes(5), await outcomes(6)
    assert first == again and set(first) == {"ok", "no_done"} and first != other
