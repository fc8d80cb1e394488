"""The real LLM path (issue 11): what a streamed call costs, what a realistic discussion costs, a quota storm.

Every figure is read against a baseline measured in the same run:
- `llm_call_<T>`: the agent service alone, driven by RunDiscussion, streaming T-token answers one token a
  chunk from the simulator at full speed, through the lean client and through the openai SDK; the
  baseline is a bare aiohttp reader of the same streams (bench.bare_reader) on the same core.
- `llm_discussions`: the whole suite, discussions whose answers are T tokens paced at P tokens/s, through
  the lean client, the SDK, and the in-process LLM (the baseline).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import sys
import time
import uuid

import grpc

from bench import client, procs
from bench.context import Context, PeakRss
from bench.promtext import scrape
from bench.results import Figure, Goal, Sample, Scenario
from bench.suite import start_suite
from services.gen.roundtable.agents.v1 import agents_pb2, agents_pb2_grpc
from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2

DEBATERS = ["科学家", "哲学家", "经济学家"]
MODERATOR = "主持人"
CALLS_PER_DISCUSSION = len(DEBATERS) + 1
# About 50 calls in flight, as the issue measured.
CALL_CONCURRENCY = 48
CLIENTS = {"agents-stream": "stream", "agents-sdk": "openai-sdk"}
LLM_OK = 'roundtable_llm_request_seconds_count{outcome="ok"}'

CALL_FIGURES = [
    Figure("cpu_ms_per_call", "CPU per streamed call", "ms", higher_is_better=False, digits=2),
    Figure("errors", "failed calls", "", higher_is_better=False),
]


def _simulator_flags(answer_tokens: int, tokens_per_second: float, first_token_ms: float) -> list[str]:
    return [
        "--answer-tokens-min", str(answer_tokens),
        "--answer-tokens-max", str(answer_tokens),
        "--tokens-per-second", str(tokens_per_second),
        "--first-token-latency-ms", str(first_token_ms),
    ]  # fmt: skip


async def _start_simulator(workdir: pathlib.Path, flags: list[str]) -> procs.Proc:
    # The simulator stands in for a provider: it runs beside the load generator, not on the server's core.
    return await procs.start(
        "simulator", ["services.simulator", "--port", "0", *flags], core=procs.LOAD_CORE, cwd=workdir
    )


async def llm_calls(ctx: Context) -> None:
    """CPU per streamed call: bare reader, then the agent service through each client, interleaved."""
    for answer_tokens in ctx.profile.llm_call_answer_tokens:
        scenario = Scenario(
            key=f"llm_call_{answer_tokens}",
            title=f"Streamed LLM calls, {answer_tokens}-token answers one token a chunk, {CALL_CONCURRENCY} in flight",
            baseline="bare",
            candidates=list(CLIENTS),
            figures=CALL_FIGURES,
            goals=[
                Goal("errors", "0 failed calls", value_at_most=0),
                *(
                    [Goal("cpu_ms_per_call", "agent service ≤ 3× a bare aiohttp reader", ratio_at_most=3.0)]
                    if answer_tokens >= 128
                    else []
                ),
            ],
            notes=[
                "bare: bench.bare_reader, a bare aiohttp client parsing each SSE line with json, on the server's "
                "core; agents-*: the whole agent service (RunDiscussion, events, metrics, logs) per LLM call, its "
                "process CPU from /proc. The simulator streams at full speed on the other core.",
            ],
        )
        ctx.run.scenarios.append(scenario)
        ctx.say(scenario.title)
        for repeat in range(ctx.profile.repeats):
            for system in ["bare", *CLIENTS]:
                sample = await _call_sample(ctx, system, answer_tokens, repeat)
                ctx.record(scenario, sample)


async def _call_sample(ctx: Context, system: str, answer_tokens: int, repeat: int) -> Sample:
    workdir = ctx.workdir(f"llm-call-{system}-{answer_tokens}")
    simulator = await _start_simulator(workdir, _simulator_flags(answer_tokens, 1_000_000, 0))
    discussions = ctx.profile.llm_call_discussions
    calls = discussions * CALLS_PER_DISCUSSION
    try:
        if system == "bare":
            return await _bare_sample(workdir, simulator, calls, answer_tokens, repeat)
        agents = await procs.start(
            "agents",
            [
                "services.agents", "--port", "0", "--metrics-port", "0", "--session-log-dir", "",
                "--llm-base-url", simulator.address, "--llm-backend", "simulator",
                "--llm-max-tokens", str(answer_tokens), "--llm-client", CLIENTS[system],
                "--max-concurrent-llm-calls", "10000", "--max-agent-sets", "100000",
            ],
            core=procs.SERVER_CORE,
            cwd=workdir,
        )  # fmt: skip
        try:
            channel = grpc.aio.insecure_channel(agents.address)
            stub = agents_pb2_grpc.AgentServiceStub(channel)
            await _run_discussions(stub, 1)  # warm: imports, pools, first connections
            before = await scrape(agents.metrics_port)
            cpu_before = procs.cpu_seconds([agents.pid])
            failed = await _run_discussions(stub, discussions)
            cpu_seconds = procs.cpu_seconds([agents.pid]) - cpu_before
            after = await scrape(agents.metrics_port)
            await channel.close()
        finally:
            await procs.stop([agents])
    finally:
        await procs.stop([simulator])
    ok_calls = round(after.total("roundtable_llm_request_seconds_count", outcome="ok")) - round(
        before.total("roundtable_llm_request_seconds_count", outcome="ok")
    )
    problems = [] if ok_calls + failed == calls else [f"agent service counted {ok_calls} ok calls of {calls}"]
    values = {"cpu_ms_per_call": cpu_seconds / calls * 1000, "errors": float(failed), "calls": float(calls)}
    return Sample(system, repeat, values, validated=not problems, validation="; ".join(problems))


async def _run_discussions(stub: agents_pb2_grpc.AgentServiceAsyncStub, count: int) -> int:
    """`count` one-round discussions, about CALL_CONCURRENCY calls in flight; the agents that failed."""
    slots = asyncio.Semaphore(max(CALL_CONCURRENCY // len(DEBATERS), 1))
    failed = 0

    async def one() -> None:
        nonlocal failed
        session_id = uuid.uuid4().hex
        request = agents_pb2.RunDiscussionRequest(
            session_id=session_id, topic="Should cities ban cars?", personas=[*DEBATERS, MODERATOR], rounds=1
        )
        async with slots:
            call = stub.RunDiscussion(request, timeout=600, metadata=(("x-session-id", session_id),))
            async for event in call:
                if event.HasField("agent_failed"):
                    failed += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return failed


async def _bare_sample(
    workdir: pathlib.Path, simulator: procs.Proc, calls: int, answer_tokens: int, repeat: int
) -> Sample:
    command = [
        sys.executable, "-m", "bench.bare_reader", "--url", simulator.address.rstrip("/") + "/chat/completions",
        "--calls", str(calls), "--concurrency", str(CALL_CONCURRENCY), "--max-tokens", str(answer_tokens),
    ]  # fmt: skip
    if (os.cpu_count() or 1) > procs.SERVER_CORE:
        command = ["taskset", "-c", str(procs.SERVER_CORE), *command]
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=workdir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(procs.REPO_ROOT)},
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        return Sample("bare", repeat, {}, validated=False, validation=err.decode(errors="replace")[-300:])
    result = json.loads(out)
    expected_chunks = calls * answer_tokens
    problems = [] if result["chunks"] == expected_chunks else [f"read {result['chunks']} chunks of {expected_chunks}"]
    values = {"cpu_ms_per_call": result["cpu_seconds"] / calls * 1000, "errors": 0.0, "calls": float(calls)}
    return Sample("bare", repeat, values, validated=not problems, validation="; ".join(problems))


# --- realistic discussions: the whole suite, paced answers --------------------------------------------


DISCUSSION_FIGURES = [
    Figure("cpu_ms_per_discussion", "server CPU per discussion", "ms", higher_is_better=False, digits=1),
    Figure("rss_per_held_kb", "RSS per held discussion", "KB", higher_is_better=False, digits=1),
    Figure("sockets_over_in_flight", "agent sockets beyond LLM calls in flight", "", higher_is_better=False),
    Figure("errors", "errors", "", higher_is_better=False),
]
SUITE_CLIENTS = {"suite-stream": "stream", "suite-sdk": "openai-sdk"}


async def llm_discussions(ctx: Context) -> None:
    """1,000 discussions with 256-token answers paced like a provider: lean client, SDK, in-process LLM."""
    profile = ctx.profile
    tokens, pace = profile.llm_answer_tokens, profile.llm_tokens_per_second
    scenario = Scenario(
        key="llm_discussions",
        title=(
            f"Discussions with {tokens}-token answers at {pace:g} tokens/s (3 personas + moderator, 1 round): "
            f"{profile.llm_discussions:,} through the lean client and in-process, {profile.llm_sdk_discussions:,} "
            "through the SDK"
        ),
        baseline="suite",
        candidates=list(SUITE_CLIENTS),
        figures=DISCUSSION_FIGURES,
        goals=[
            Goal("errors", "0 errors", value_at_most=0),
            Goal("cpu_ms_per_discussion", "lean client ≤ 2× the in-process path", ratio_at_most=2.0),
            Goal("rss_per_held_kb", "lean client ≤ 1.5× the in-process path", ratio_at_most=1.5),
            Goal("sockets_over_in_flight", "open sockets ≤ calls in flight + 16", value_at_most=16),
        ],
        notes=[
            "suite: the shipped services with bench.fake_agents' in-process LLM, which answers in one chunk "
            f"after the same {tokens / pace:.1f} s; suite-stream / suite-sdk: the shipped agent service "
            "streaming from the simulator one token a chunk. The goals read suite-stream; suite-sdk is the "
            "'before' (fewer discussions per repeat: at ~100 ms per call it would take minutes).",
            "RSS per held discussion: peak RSS of the three services less their RSS before the burst, over "
            "the discussions created. Sockets: the agent process's open sockets less its LLM calls in "
            "flight, the largest excess seen (sampled every 0.5 s).",
        ],
    )
    ctx.run.scenarios.append(scenario)
    ctx.say(scenario.title)
    for repeat in range(profile.repeats):
        for system in ["suite", *SUITE_CLIENTS]:
            count = profile.llm_sdk_discussions if system == "suite-sdk" else profile.llm_discussions
            ctx.record(scenario, await _discussion_sample(ctx, system, count, repeat))


def _sockets(pid: int) -> int:
    count = 0
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    count += 1
    return count


async def _discussion_sample(ctx: Context, system: str, count: int, repeat: int) -> Sample:
    profile = ctx.profile
    tokens, pace = profile.llm_answer_tokens, profile.llm_tokens_per_second
    latency = tokens / pace
    workdir = ctx.workdir(f"llm-discussions-{system}")
    if system == "suite":
        suite = await start_suite(workdir, llm="fake", latency_seconds=latency, answer_words=tokens)
    else:
        suite = await start_suite(
            workdir,
            llm="sim",
            latency_seconds=0.2,
            answer_words=tokens,
            simulator_flags=_simulator_flags(tokens, pace, 200),
            agents_flags=["--llm-client", SUITE_CLIENTS[system]],
        )
    stubs = client.Stubs(suite.session.address)
    excess = 0
    try:
        rss_before = procs.rss_bytes(suite.pids)
        cpu_before = procs.cpu_seconds(suite.pids)
        with PeakRss(suite.pids) as rss:
            sockets_task = asyncio.create_task(_watch_sockets(suite.agents.pid, suite.agents.metrics_port))
            try:
                sent = await client.burst(stubs, count, f"llm-{time.time_ns()}")
                await client.wait_all_done(stubs, profile.done_timeout_seconds)
            finally:
                sockets_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    excess = await sockets_task
            cpu_seconds = procs.cpu_seconds(suite.pids) - cpu_before
        docs = await client.fetch(stubs, list(sent.sent_wall))
    finally:
        await stubs.close()
        await suite.stop()
    completed = [d for d in docs if d.status == session_pb2.DISCUSSION_STATUS_COMPLETED]
    failed_agents = sum(
        1 for d in completed for r in d.results if r.status != discussion_pb2.AGENT_STATUS_COMPLETED or not r.text
    )
    values = {
        "completed": float(len(completed)),
        "errors": float(sent.rejected + sent.accepted - len(completed) + failed_agents),
        "cpu_ms_per_discussion": cpu_seconds / max(len(completed), 1) * 1000,
        "rss_per_held_kb": (rss.peak - rss_before) / max(sent.accepted, 1) / 1024,
        "sockets_over_in_flight": float(excess),
    }
    problems = [] if len(completed) == count else [f"{len(completed)} of {count} completed"]
    return Sample(system, repeat, values, validated=not problems, validation="; ".join(problems))


async def _watch_sockets(pid: int, metrics_port: int) -> int:
    """The largest excess of the agent process's sockets over its LLM calls in flight, until cancelled."""
    excess = 0
    try:
        while True:
            in_flight = (await scrape(metrics_port)).total("roundtable_llm_calls_in_flight")
            excess = max(excess, _sockets(pid) - int(in_flight))
            await asyncio.sleep(0.5)
    except asyncio.CancelledError:
        return excess
