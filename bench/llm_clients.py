"""CPU per streamed LLM call: the streaming client, the openai SDK client and bare aiohttp readers.

    python -m bench.llm_clients [--calls-16 2000] [--calls-256 400] [--in-flight 50]

The simulator runs in its own process (pinned to the server core) at full speed (a million tokens
a second, no first-token delay), so what this process spends is the client's work alone:
time.process_time() over N calls, 50 in flight, after a warm-up, the readers interleaved in rounds.
Answers of 16 and 256 tokens, one SSE event a token as providers send them. The clients are measured
the way the service calls them (LLMRouter.stream_chat: outbound cap, metrics, usage); the bare
readers are the floor: one aiohttp session, the lines parsed and the text read from the dict,
nothing else. Three bare readers show what reading and parsing cost: aiohttp's readline with json,
the same with orjson, and readany with our own line split with orjson (what the streaming client does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from bench import procs
from services.agents.llm import Backend, ChatMessage, LLMRouter
from services.shared.server import loop_factory

MESSAGES = [
    ChatMessage("system", "You are 科学家, a scientist who reasons from evidence, data and mechanisms. " * 3),
    ChatMessage("user", "话题: Should cities ban cars from their centres? Give your analysis in a few points. " * 3),
]
CallFn = Callable[[], Awaitable[int]]
# The reader every other is compared with (issue 11's goal: the client within 1.3x of it).
FLOOR = "bare aiohttp readline + json"


def request_body(max_tokens: int) -> dict[str, object]:
    """The body every reader sends (the clients build the same one themselves)."""
    return {
        "model": "roundtable-sim-1",
        "messages": [{"role": m.role, "content": m.content} for m in MESSAGES],
        "temperature": 0.7,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def bare_readline_json(session: aiohttp.ClientSession, url: str, max_tokens: int) -> CallFn:
    """The reference floor: aiohttp's readline, json.loads, the text from the dict."""
    body = request_body(max_tokens)

    async def call() -> int:
        pieces = 0
        async with session.post(url, json=body, headers={"Authorization": "Bearer sim"}) as response:
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    break
                event = json.loads(payload)
                choices = event.get("choices")
                if choices and choices[0]["delta"].get("content"):
                    pieces += 1
        return pieces

    return call


def bare_readline_orjson(session: aiohttp.ClientSession, url: str, max_tokens: int) -> CallFn:
    """aiohttp's readline with orjson: against readany + orjson, what reading line by line costs."""
    body = orjson.dumps(request_body(max_tokens))
    headers = {"Authorization": "Bearer sim", "Content-Type": "application/json"}

    async def call() -> int:
        pieces = 0
        async with session.post(url, data=body, headers=headers) as response:
            async for line in response.content:
                if line.startswith(b"data:") and (payload := line[5:].strip()) != b"[DONE]":
                    choices = orjson.loads(payload).get("choices")
                    if choices and choices[0]["delta"].get("content"):
                        pieces += 1
        return pieces

    return call


def bare_readany_orjson(session: aiohttp.ClientSession, url: str, max_tokens: int) -> CallFn:
    """The leanest floor: readany with our own line split, orjson, the text from the dict."""
    body = orjson.dumps(request_body(max_tokens))
    headers = {"Authorization": "Bearer sim", "Content-Type": "application/json"}

    async def call() -> int:
        pieces = 0
        buffer = b""
        async with session.post(url, data=body, headers=headers) as response:
            content = response.content
            while data := await content.readany():
                lines = (buffer + data).split(b"\n")
                buffer = lines.pop()
                for line in lines:
                    if line.startswith(b"data:") and (payload := line[5:].strip()) != b"[DONE]":
                        choices = orjson.loads(payload).get("choices")
                        if choices and choices[0]["delta"].get("content"):
                            pieces += 1
        return pieces

    return call


def through_router(llm: LLMRouter) -> CallFn:
    """A call as the agent service makes it."""

    async def call() -> int:
        pieces = 0
        async for chunk in llm.stream_chat(MESSAGES, timeout_seconds=60):
            if chunk.text:
                pieces += 1
        return pieces

    return call


async def cpu_per_call_ms(call: CallFn, calls: int, in_flight: int, expected_pieces: int) -> float:
    """Milliseconds of this process's CPU per call, `in_flight` calls at a time."""
    slots = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with slots:
            pieces = await call()
        assert pieces == expected_pieces, f"{pieces} pieces, expected {expected_pieces}"

    started = time.process_time()
    await asyncio.gather(*(one() for _ in range(calls)))
    return (time.process_time() - started) / calls * 1000


async def tenacity_overhead_us(rounds: int = 20_000) -> float:
    """Microseconds tenacity adds to a call that needs no retry (a copy of the retrying object and one attempt)."""
    retrying = AsyncRetrying(retry=retry_if_exception_type(OSError), stop=stop_after_attempt(4), reraise=True)

    async def attempt() -> int:
        return 1

    started = time.process_time()
    for _ in range(rounds):
        await attempt()
    bare = time.process_time() - started
    started = time.process_time()
    for _ in range(rounds):
        await retrying.copy()(attempt)
    wrapped = time.process_time() - started
    return (wrapped - bare) / rounds * 1e6


async def measure(
    calls_by_tokens: dict[int, int], in_flight: int, rounds: int, tokens_per_second: float
) -> list[tuple[str, int, float]]:
    """CPU ms per call for every reader and answer length: the median of `rounds` interleaved rounds, so a
    neighbour's load on this shared machine falls on every reader alike."""
    procs.pin_self(procs.LOAD_CORE)
    rows: list[tuple[str, int, float]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for tokens, calls in calls_by_tokens.items():
            simulator = await procs.start(
                "simulator",
                [
                    "services.simulator",
                    *("--port", "0", "--tokens-per-second", str(tokens_per_second), "--first-token-latency-ms", "0"),
                    *("--answer-tokens-min", str(tokens), "--answer-tokens-max", str(tokens)),
                ],
                core=procs.SERVER_CORE,
                cwd=pathlib.Path(scratch),
            )
            base_url = simulator.address
            url = f"{base_url}/chat/completions"
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight))
            routers = {
                kind: LLMRouter(
                    default=Backend("simulator", base_url, "sim", "roundtable-sim-1", client=kind),
                    temperature=0.7,
                    max_tokens=tokens,
                    max_retries=2,
                    max_concurrent_calls=in_flight,
                )
                for kind in ("stream", "openai-sdk")
            }
            readers: dict[str, CallFn] = {
                FLOOR: bare_readline_json(session, url, tokens),
                "bare aiohttp readline + orjson": bare_readline_orjson(session, url, tokens),
                "bare aiohttp readany + orjson": bare_readany_orjson(session, url, tokens),
                "StreamingChatClient (stream)": through_router(routers["stream"]),
                "OpenAISDKChatClient (openai-sdk)": through_router(routers["openai-sdk"]),
            }
            try:
                for reader in readers.values():  # warm-up: connections, caches
                    await cpu_per_call_ms(reader, in_flight, in_flight, tokens)
                samples: dict[str, list[float]] = {name: [] for name in readers}
                for _ in range(rounds):
                    for name, reader in readers.items():
                        samples[name].append(await cpu_per_call_ms(reader, calls // rounds, in_flight, tokens))
                rows.extend((name, tokens, statistics.median(values)) for name, values in samples.items())
            finally:
                await session.close()
                for llm in routers.values():
                    await llm.close()
                await procs.stop([simulator], grace_seconds=5)
    return rows


def table(rows: list[tuple[str, int, float]], tenacity_us: float) -> str:
    """The measurements as a Markdown table, each against the bare readline + json reader."""
    floor = {tokens: ms for name, tokens, ms in rows if name == FLOOR}
    lines = ["| reader | answer tokens | CPU ms per call | × bare readline+json |", "|---|---:|---:|---:|"]
    for name, tokens, ms in rows:
        lines.append(f"| {name} | {tokens} | {ms:.2f} | {ms / floor[tokens]:.2f} |")
    lines.append("")
    lines.append(f"tenacity on the no-retry path: {tenacity_us:.1f} µs per call")
    return "\n".join(lines)


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls-16", type=int, default=2000, help="calls with 16-token answers")
    parser.add_argument("--calls-256", type=int, default=400, help="calls with 256-token answers")
    parser.add_argument("--in-flight", type=int, default=50, help="calls at a time")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=1e6,
        help="the simulator's pace per answer (1e6: full speed, events coalesce; a few hundred: one event a read)",
    )
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop", help="as the services run")
    args = parser.parse_args()

    async def run() -> str:
        rows = await measure(
            {16: args.calls_16, 256: args.calls_256}, args.in_flight, args.rounds, args.tokens_per_second
        )
        return table(rows, await tenacity_overhead_us())

    with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
        print(
            f"event loop: {args.event_loop}, {args.in_flight} calls in flight, "
            f"simulator at {args.tokens_per_second:g} tokens/s, median of {args.rounds} rounds"
        )
        print(runner.run(run()))


if __name__ == "__main__":
    main()
