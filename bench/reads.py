"""Reads: GetDiscussion and StreamDiscussion under h2load, the suite against its baselines."""

from __future__ import annotations

import pathlib

from bench import client, h2load, procs
from bench.context import Context
from bench.payloads import grpc_frame
from bench.results import Figure, Goal, Sample, Scenario
from bench.systems import System, start_system
from services.gen.roundtable.session.v1 import session_pb2

SESSION_PATH = "/roundtable.session.v1.SessionService"
# The payload discussion (for the echo baseline's canned replies) only needs to finish quickly.
PAYLOAD_LATENCY_SECONDS = 0.05
# Protobuf varints: a re-stamped Timestamp may take a byte or two more or less.
REPLY_SIZE_SLACK_BYTES = 4


UNARY_FIGURES = [
    Figure("rps", "throughput", "req/s"),
    Figure("p50_ms", "p50 latency", "ms", higher_is_better=False, digits=1),
    Figure("p99_ms", "p99 latency", "ms", higher_is_better=False, digits=1),
    Figure("cpu_us_per_rpc", "server CPU per RPC", "µs", higher_is_better=False),
]
STREAM_FIGURES = [
    Figure("events_per_s", "events delivered", "events/s"),
    Figure("streams_per_s", "streams completed", "streams/s"),
    Figure("p99_ms", "p99 stream duration", "ms", higher_is_better=False, digits=1),
    Figure("cpu_us_per_event", "server CPU per event", "µs", higher_is_better=False, digits=1),
]


async def reads(ctx: Context) -> None:
    """GetDiscussion at each concurrency and StreamDiscussion replay fan-out, suite vs echo, interleaved."""
    profile = ctx.profile
    suite = await start_system("suite", ctx.workdir("reads-suite"), latency_seconds=PAYLOAD_LATENCY_SECONDS)
    echo: System | None = None
    try:
        payload = await client.completed_payload(suite.address)
        payload_path = suite.suite.workdir / "payload.bin" if suite.suite else ctx.root / "payload.bin"
        payload.write(payload_path)
        echo = await start_system("echo", ctx.workdir("reads-echo"), payload=payload_path)
        discussion_id = payload.document.discussion_id
        get_body = ctx.root / "get.bin"
        get_body.write_bytes(
            grpc_frame(session_pb2.GetDiscussionRequest(discussion_id=discussion_id).SerializeToString())
        )
        stream_body = ctx.root / "stream.bin"
        stream_body.write_bytes(
            grpc_frame(session_pb2.StreamDiscussionRequest(discussion_id=discussion_id).SerializeToString())
        )
        get_reply = len(grpc_frame(payload.document.SerializeToString()))
        stream_reply = sum(len(grpc_frame(e.SerializeToString())) for e in payload.events)
        for concurrency in profile.unary_concurrency:
            scenario = Scenario(
                key=f"get_c{concurrency}",
                title=f"GetDiscussion, C={concurrency} (h2load, {concurrency} connections)",
                baseline="echo",
                candidates=["suite"],
                figures=UNARY_FIGURES,
                goals=[
                    Goal("rps", "≥ 0.5× echo req/s", ratio_at_least=0.5),
                    Goal("p99_ms", "p99 ≤ 2× echo p99", ratio_at_most=2.0),
                ],
                notes=[
                    f"Reply: one completed discussion document, {get_reply} bytes framed, identical from both servers.",
                ],
            )
            ctx.run.scenarios.append(scenario)
            ctx.say(f"{scenario.title}")
            for repeat in range(profile.repeats):
                for system in (echo, suite):
                    sample = await h2load_sample(
                        ctx, system, "GetDiscussion", get_body, concurrency, repeat, get_reply, messages=1
                    )
                    ctx.record(scenario, sample)
        scenario = Scenario(
            key="stream_replay",
            title=f"StreamDiscussion replay fan-out, C={profile.stream_concurrency} (h2load)",
            baseline="echo",
            candidates=["suite"],
            figures=STREAM_FIGURES,
            goals=[Goal("events_per_s", "≥ 0.5× echo stream msgs/s", ratio_at_least=0.5)],
            notes=[
                f"Each stream replays one completed discussion: {len(payload.events)} events, "
                f"{stream_reply} bytes framed, then ends.",
            ],
        )
        ctx.run.scenarios.append(scenario)
        ctx.say(scenario.title)
        for repeat in range(profile.repeats):
            for system in (echo, suite):
                sample = await h2load_sample(
                    ctx,
                    system,
                    "StreamDiscussion",
                    stream_body,
                    profile.stream_concurrency,
                    repeat,
                    stream_reply,
                    messages=len(payload.events),
                )
                ctx.record(scenario, sample)
    finally:
        if echo is not None:
            await echo.stop()
        await suite.stop()


async def h2load_sample(
    ctx: Context,
    system: System,
    method: str,
    body: pathlib.Path,
    concurrency: int,
    repeat: int,
    reply_bytes: int,
    messages: int,
) -> Sample:
    """One h2load run, validated by the server's count of OK replies and by the reply bytes received."""
    before = await system.counts(method)
    cpu_before = procs.cpu_seconds(system.pids)
    result = await h2load.run(
        f"http://{system.address}{SESSION_PATH}/{method}",
        body,
        clients=concurrency,
        streams_per_client=1,
        warmup_seconds=ctx.profile.warmup_seconds,
        duration_seconds=ctx.profile.duration_seconds,
        log_path=ctx.root / f"h2load-{system.name}-{method}.log",
    )
    cpu_seconds = procs.cpu_seconds(system.pids) - cpu_before
    delta = (await system.counts(method)).minus(before)
    problems: list[str] = []
    if result.failed or result.errored or result.timeout:
        problems.append(f"h2load: {result.failed} failed, {result.errored} errored, {result.timeout} timed out")
    replies = round(result.data_bytes / reply_bytes)
    # A unary reply is one DATA frame, so the bytes are whole replies, give or take the few bytes a touched
    # timestamp (last_accessed_at, once a minute) adds; streams cut at the end leave a part.
    if messages == 1 and abs(result.data_bytes - replies * reply_bytes) > replies * REPLY_SIZE_SLACK_BYTES:
        problems.append(f"reply bytes ({result.data_bytes}) are not whole replies of {reply_bytes} bytes")
    if delta.rpc_ok < result.succeeded:
        problems.append(f"server counted {delta.rpc_ok} OK but h2load {result.succeeded} successes")
    if not -concurrency <= delta.rpc_ok - replies <= concurrency:
        problems.append(f"server sent {delta.rpc_ok} OK replies but h2load received {replies} whole ones")
    # h2load stops with requests in flight: those end CANCELLED, at most one per connection.
    cancelled = delta.rpc_errors.get("CANCELLED", 0)
    others = {code: n for code, n in delta.rpc_errors.items() if code != "CANCELLED"}
    if others or cancelled > concurrency:
        problems.append(f"server error codes {delta.rpc_errors}")
    if messages > 1 and delta.msgs_sent < delta.rpc_ok * messages:
        problems.append(f"server sent {delta.msgs_sent} messages for {delta.rpc_ok} streams of {messages}")
    served = max(delta.rpc_ok, 1)
    values = {
        "rps": result.requests_per_second,
        "p50_ms": result.percentile_ms(0.50),
        "p99_ms": result.percentile_ms(0.99),
    }
    if messages == 1:
        values["cpu_us_per_rpc"] = cpu_seconds / served * 1e6
    else:
        values = {
            "events_per_s": result.requests_per_second * messages,
            "streams_per_s": result.requests_per_second,
            "p99_ms": result.percentile_ms(0.99),
            "cpu_us_per_event": cpu_seconds / (served * messages) * 1e6,
        }
    values["server_ok"] = float(delta.rpc_ok)
    return Sample(system.name, repeat, values, validated=not problems, validation="; ".join(problems))
