"""The scenarios of issue 7: each runs baseline and candidate back to back, repeat after repeat (A B A B …).

Every repeat is printed as it finishes, and validated by the server's own counts:
a run whose counts disagree with what the client saw is marked invalid, never
silently averaged in.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import Callable

from bench import client, h2load, llm_path, procs
from bench.context import Context, PeakRss
from bench.payloads import grpc_frame
from bench.promtext import Scrape, histogram_quantile
from bench.results import Figure, Goal, Sample, Scenario, median, percentile, spread
from bench.systems import Counts, System, start_system
from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2

SESSION_PATH = "/roundtable.session.v1.SessionService"
# The payload discussion (for the echo baseline's canned replies) only needs to finish quickly.
PAYLOAD_LATENCY_SECONDS = 0.05
SOAK_TTL_SECONDS = 1.0
SOAK_LATENCY_SECONDS = 0.01
AGENT_COMPLETED = discussion_pb2.AGENT_STATUS_COMPLETED
HOLD_SUMMARY_LATENCY_SECONDS = 1.0
# Protobuf varints: a re-stamped Timestamp may take a byte or two more or less.
REPLY_SIZE_SLACK_BYTES = 4


# --- reads: GetDiscussion and StreamDiscussion under h2load ------------------------------------------


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
                    sample = await _h2load_sample(
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
                sample = await _h2load_sample(
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


async def _h2load_sample(
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


# --- bursts: N discussions at once, create→done --------------------------------------------------------


BURST_FIGURES = [
    Figure("accept_per_s", "accept rate", "creates/s"),
    Figure("completed_per_s", "completed", "discussions/s"),
    Figure("p50_done_s", "p50 create→done", "s", higher_is_better=False, digits=2),
    Figure("p99_done_s", "p99 create→done", "s", higher_is_better=False, digits=2),
    Figure("errors", "errors", "", higher_is_better=False),
    Figure("cpu_ms_per_discussion", "server CPU per discussion", "ms", higher_is_better=False, digits=2),
    Figure("peak_rss_mb", "peak RSS, our processes", "MB", higher_is_better=False),
]


async def bursts(ctx: Context) -> None:
    """Bursts of N discussions with a fixed-latency LLM: minimal asyncio, suite, seed design, interleaved."""
    profile = ctx.profile
    latency = profile.burst_latency_seconds
    for index, count in enumerate(profile.burst_sizes):
        with_seed = index == 0
        scenario = Scenario(
            key=f"burst_{count}",
            title=f"Burst of {count:,} discussions (3 personas + moderator, 1 round, {latency:g} s in-process LLM)",
            baseline="minimal",
            candidates=["suite", *(["seed"] if with_seed else [])],
            figures=BURST_FIGURES,
            goals=[
                Goal("errors", "0 errors", value_at_most=0),
                Goal("accept_per_s", "≥ 0.25× the minimal server's accept rate", ratio_at_least=0.25),
                Goal("p99_done_s", "p99 create→done ≤ 1.5 s", value_at_most=1.5),
                # The goal as reachable: two LLM calls in sequence are the floor (see the note).
                Goal(
                    "p99_done_s",
                    f"restated: p99 create→done ≤ floor ({2 * latency:g} s) + 0.5 s",
                    value_at_most=2 * latency + 0.5,
                ),
            ],
            notes=[
                f"Every discussion makes two LLM calls in sequence (the 3 personas in parallel, then the moderator, "
                f"whom the session service always adds), so create→done cannot be under {2 * latency:g} s on any "
                "system: the 1.5 s goal as written is unreachable and the figure to read is p99 minus that floor.",
                "create→done: the client's send time to the discussion's final event time (updated_at), same clock.",
            ],
        )
        if with_seed:
            scenario.notes.append(
                f"The seed design runs {profile.seed_burst:,} discussions per repeat; its agent pool has 100 threads."
            )
        ctx.run.scenarios.append(scenario)
        ctx.say(scenario.title)
        for repeat in range(profile.repeats):
            for name in ["minimal", *scenario.candidates]:
                size = profile.seed_burst if name == "seed" else count
                sample = await burst_sample(ctx, name, size, latency, repeat)
                ctx.record(scenario, sample)
        if with_seed:
            versus_seed = Scenario(
                key=f"seed_vs_suite_{count}",
                title=f"Seed design vs ours, same burst ({count:,}; seed {profile.seed_burst:,})",
                baseline="seed",
                candidates=["suite"],
                figures=[BURST_FIGURES[1], BURST_FIGURES[3]],
                goals=[Goal("completed_per_s", "≥ 100× the seed design", ratio_at_least=100)],
                samples=[s for s in scenario.samples if s.system in ("seed", "suite")],
            )
            ctx.run.scenarios.append(versus_seed)


async def sim_bursts(ctx: Context) -> None:
    """The realistic path: the shipped agent service calling the simulator through the openai SDK."""
    profile = ctx.profile
    latency = profile.burst_latency_seconds
    count = profile.sim_burst
    scenario = Scenario(
        key=f"burst_sim_{count}",
        title=f"Burst of {count:,} discussions through the simulator + openai SDK ({latency:g} s first token)",
        baseline="minimal",
        candidates=["suite-sim"],
        figures=BURST_FIGURES,
        goals=[Goal("errors", "0 errors", value_at_most=0)],
        notes=[
            f"The simulator streams {profile.sim_answer_words} words per answer right after the first-token "
            "latency; it stands in for a provider, so it runs on core 1 beside the load generator and its CPU "
            "is not counted as ours.",
        ],
    )
    ctx.run.scenarios.append(scenario)
    ctx.say(scenario.title)
    for repeat in range(profile.repeats):
        for name in ("minimal", "suite-sim"):
            sample = await burst_sample(ctx, name, count, latency, repeat, answer_words=profile.sim_answer_words)
            ctx.record(scenario, sample)


async def burst_sample(
    ctx: Context, name: str, count: int, latency: float, repeat: int, answer_words: int = 60
) -> Sample:
    """Start a fresh system, send `count` creates at once, wait until every one is done, validate."""
    system = await start_system(
        name, ctx.workdir(f"burst-{name}-{count}"), latency_seconds=latency, answer_words=answer_words
    )
    stubs = client.Stubs(system.address)
    try:
        before = await system.counts("CreateDiscussion")
        cpu_before = procs.cpu_seconds(system.pids)
        with PeakRss(system.pids) as rss:
            sent = await client.burst(stubs, count, f"burst-{time.time_ns()}")
            await client.wait_all_done(stubs, ctx.profile.done_timeout_seconds)
            cpu_seconds = procs.cpu_seconds(system.pids) - cpu_before
        docs = await client.fetch(stubs, list(sent.sent_wall))
        delta = (await system.counts("CreateDiscussion")).minus(before)
    finally:
        await stubs.close()
        await system.stop()
    completed = [d for d in docs if d.status == session_pb2.DISCUSSION_STATUS_COMPLETED]
    done_seconds = [client.done_wall(d) - sent.sent_wall[d.discussion_id] for d in completed]
    last_done = max((client.done_wall(d) for d in completed), default=float("nan"))
    problems: list[str] = []
    if delta.created_ok != sent.accepted:
        problems.append(f"server accepted {delta.created_ok}, client saw {sent.accepted}")
    if delta.completed != len(completed):
        problems.append(f"server completed {delta.completed}, documents say {len(completed)}")
    partial = _partial(completed)
    values = {
        "accepted": float(sent.accepted),
        "completed": float(len(completed)),
        "partial": float(partial),
        "errors": float(sent.rejected + sent.accepted - len(completed) + partial),
        "accept_per_s": sent.accepted / max(sent.last_accepted - sent.first_sent, 1e-9),
        "completed_per_s": len(completed) / max(last_done - sent.first_sent, 1e-9),
        "p50_done_s": percentile(done_seconds, 0.50),
        "p99_done_s": percentile(done_seconds, 0.99),
        "max_done_s": max(done_seconds, default=float("nan")),
        "cpu_ms_per_discussion": cpu_seconds / max(len(completed), 1) * 1000,
        "peak_rss_mb": rss.peak / 2**20,
    }
    return Sample(name, repeat, values, validated=not problems, validation="; ".join(problems))


async def _lag_scrapes(system: System) -> list[Scrape]:
    """The session's and agent service's metrics (their loop-lag histograms); none for a baseline."""
    if system.suite is None:
        return []
    return [await system.scrape_session(), await system.scrape_agents()]


def _partial(completed: list[session_pb2.Discussion]) -> int:
    """Completed discussions in which some agent failed (one failed agent does not fail a discussion)."""
    return sum(
        1
        for d in completed
        if not d.summary or len(d.results) != 4 or any(r.status != AGENT_COMPLETED for r in d.results)
    )


# --- hold: many discussions active at once --------------------------------------------------------------


HOLD_FIGURES = [
    Figure("completed", "completed", "discussions"),
    Figure("errors", "errors", "", higher_is_better=False),
    Figure("rss_per_active_kb", "RSS per active discussion", "KB", higher_is_better=False, digits=1),
    Figure("fds_holding", "open fds while holding", "", higher_is_better=False),
    Figure("loop_lag_p99_ms", "session loop lag p99 while holding", "ms", higher_is_better=False, digits=1),
    Figure("loop_lag_agents_p99_ms", "agent loop lag p99 while holding", "ms", higher_is_better=False, digits=1),
    Figure("probe_p99_ms", "probe p99 while holding (loop-lag bound)", "ms", higher_is_better=False, digits=1),
    Figure("probe_agents_p99_ms", "agent service probe p99 while holding", "ms", higher_is_better=False, digits=1),
    Figure("seconds_to_active", "burst → all active", "s", higher_is_better=False, digits=1),
]


async def holds(ctx: Context, *, llm: str = "fake") -> None:
    """Hold many discussions active at once (a long LLM latency so they overlap): memory, fds, responsiveness."""
    profile = ctx.profile
    candidate = "suite" if llm == "fake" else "suite-sim"
    count = profile.hold_count if llm == "fake" else profile.sim_hold_count
    latency = profile.hold_latency_seconds if llm == "fake" else profile.sim_hold_latency_seconds
    # The summary comes after the measurement; with the in-process LLM it need not take as long.
    summary_latency = HOLD_SUMMARY_LATENCY_SECONDS if llm == "fake" else latency
    scenario = Scenario(
        key=f"hold_{llm}_{count}",
        title=f"Hold {count:,} discussions active at once ({latency:g} s LLM"
        + (", simulator + openai SDK)" if llm == "sim" else ", in-process)"),
        baseline="minimal",
        candidates=[candidate],
        figures=HOLD_FIGURES,
        goals=[
            Goal("errors", "0 errors", value_at_most=0),
            Goal("rss_per_active_kb", "≤ 30 KB per active discussion", value_at_most=30),
            Goal("loop_lag_p99_ms", "loop lag p99 ≤ 50 ms (session)", value_at_most=50),
            Goal("loop_lag_agents_p99_ms", "loop lag p99 ≤ 50 ms (agents)", value_at_most=50),
        ],
        notes=[
            "RSS per active discussion: (RSS of our processes while holding − RSS idle) / discussions held, "
            "summed over session, agents and monitor (the simulator excluded).",
            "Loop lag: each service's roundtable_event_loop_lag_seconds histogram (a 100 ms sleep's overshoot), "
            "its p99 over the holding window from two scrapes (the baseline exports none). The probe is the "
            "outside check: a health check every 100 ms on a connection of its own (loop lag plus a round trip).",
        ],
    )
    ctx.run.scenarios.append(scenario)
    ctx.say(scenario.title)
    for repeat in range(profile.hold_repeats):
        for name in ("minimal", candidate):
            sample = await hold_sample(
                ctx, name, count, latency, repeat, summary_latency, answer_words=profile.sim_answer_words
            )
            ctx.record(scenario, sample)


async def _all_active(system: System, expected: int, deadline: float) -> bool:
    """Wait until the server holds `expected` discussions (and, for the suite, the agent service too)."""
    while time.monotonic() < deadline:
        if system.suite is None:
            held = (await system.counts()).active
        else:
            session = await system.scrape_session()
            agents = await system.scrape_agents()
            running_calls = agents.total("grpc_server_started_total", grpc_method="RunDiscussion") - agents.total(
                "grpc_server_handled_total", grpc_method="RunDiscussion"
            )
            held = min(int(session.total("roundtable_discussions_active")), int(running_calls))
        if held >= expected:
            return True
        await asyncio.sleep(0.2)
    return False


async def hold_sample(
    ctx: Context,
    name: str,
    count: int,
    latency: float,
    repeat: int,
    summary_latency: float,
    answer_words: int = 60,
) -> Sample:
    """Start a fresh system, hold `count` discussions at once, measure while they wait on the LLM, then finish."""
    system = await start_system(
        name,
        ctx.workdir(f"hold-{name}-{count}"),
        latency_seconds=latency,
        summary_latency_seconds=summary_latency if name != "suite-sim" else None,
        answer_words=answer_words,
        # Holding means every discussion inside the agent service at once, past the shipped call cap.
        session_flags=["--max-concurrent-agent-runs", str(count)],
    )
    stubs = client.Stubs(system.address)
    probe_stubs = client.Stubs(system.address, channels=1)
    agents_probe = client.Stubs(system.suite.agents.address, channels=1) if system.suite else None
    stop_probes = asyncio.Event()
    try:
        await asyncio.sleep(1.0)
        idle_rss = procs.rss_bytes(system.pids)
        idle_by_process = {p.name: procs.rss_bytes([p.pid]) for p in system.procs if p.pid in system.pids}
        idle_fds = procs.open_fds(system.pids)
        before = await system.counts("CreateDiscussion")
        probes = [asyncio.create_task(client.probe(probe_stubs, stop_probes, kind=system.probe_kind))]
        if agents_probe is not None:
            probes.append(asyncio.create_task(client.probe(agents_probe, stop_probes, kind="health")))
        sent = await client.burst(stubs, count, f"hold-{time.time_ns()}")
        active = await _all_active(system, sent.accepted, time.monotonic() + latency * 0.9)
        active_at = time.time()
        lag_before = await _lag_scrapes(system)
        # Measure in the middle of the plateau: after the creates settled, before the first answers.
        first_answers = sent.first_sent + latency
        await asyncio.sleep(max(0.0, min(2.0, (first_answers - time.time()) / 2)))
        hold_rss = procs.rss_bytes(system.pids)
        per_process = {
            f"rss_{p.name}_per_active_kb": (procs.rss_bytes([p.pid]) - idle_by_process[p.name]) / max(count, 1) / 1024
            for p in system.procs
            if p.name in idle_by_process
        }
        hold_fds = procs.open_fds(system.pids)
        hold_threads = procs.threads(system.pids)
        await asyncio.sleep(max(0.0, first_answers - 0.3 - time.time()))
        lag_after = await _lag_scrapes(system)
        stop_probes.set()
        probe_samples = [await task for task in probes]
        await client.wait_all_done(stubs, ctx.profile.done_timeout_seconds + 2 * latency)
        docs = await client.fetch(stubs, list(sent.sent_wall))
        after_fds = procs.open_fds(system.pids)
        delta = (await system.counts("CreateDiscussion")).minus(before)
    finally:
        stop_probes.set()
        for stub in (stubs, probe_stubs, agents_probe):
            if stub is not None:
                await stub.close()
        await system.stop()
    completed = [d for d in docs if d.status == session_pb2.DISCUSSION_STATUS_COMPLETED]

    def window(samples: list[tuple[float, float]]) -> list[float]:
        return [ms for at, ms in samples if active_at <= at <= first_answers]

    session_window = window(probe_samples[0])
    agents_window = window(probe_samples[1]) if len(probe_samples) > 1 else []
    problems: list[str] = []
    if not active:
        problems.append("not every discussion was active before the first LLM answers")
    if delta.created_ok != sent.accepted or delta.completed != len(completed):
        problems.append(
            f"server accepted {delta.created_ok} and completed {delta.completed}; "
            f"the client saw {sent.accepted} accepted and {len(completed)} completed"
        )
    if not session_window:
        problems.append("no probe sample fell inside the holding window")
    values = {
        "accepted": float(sent.accepted),
        "completed": float(len(completed)),
        "partial": float(_partial(completed)),
        "errors": float(count - len(completed) + _partial(completed)),
        "rss_idle_mb": idle_rss / 2**20,
        "rss_holding_mb": hold_rss / 2**20,
        "rss_per_active_kb": (hold_rss - idle_rss) / max(sent.accepted, 1) / 1024,
        "fds_idle": float(idle_fds),
        "fds_holding": float(hold_fds),
        "fds_after": float(after_fds),
        "threads_holding": float(hold_threads),
        "probe_p50_ms": percentile(session_window, 0.50),
        "probe_p99_ms": percentile(session_window, 0.99),
        "probe_max_ms": max(session_window, default=float("nan")),
        "probe_burst_p99_ms": percentile([ms for at, ms in probe_samples[0] if at < active_at], 0.99),
        "seconds_to_active": active_at - sent.first_sent,
    }
    if agents_window:
        values["probe_agents_p99_ms"] = percentile(agents_window, 0.99)
    lag_keys = ("loop_lag_p99_ms", "loop_lag_agents_p99_ms")
    for key, before_scrape, after_scrape in zip(lag_keys[: len(lag_before)], lag_before, lag_after, strict=True):
        values[key] = 1000 * histogram_quantile(before_scrape, after_scrape, "roundtable_event_loop_lag_seconds", 0.99)
    if len(per_process) > 1:
        values.update(per_process)
    return Sample(name, repeat, values, validated=not problems, validation="; ".join(problems))


# --- soak: many discussions created and expired ---------------------------------------------------------


SOAK_FIGURES = [
    Figure("created", "discussions created and expired", ""),
    Figure("rss_growth_pct", "RSS after vs warm baseline", "%", higher_is_better=False, digits=1),
    Figure("fds_growth", "open fds after − warm baseline", "", higher_is_better=False),
    Figure("errors", "errors", "", higher_is_better=False),
]


async def soak(ctx: Context) -> None:
    """Waves of short-lived discussions (ttl 1 s, sweep every second); RSS and fds after each wave."""
    profile = ctx.profile
    total = profile.soak_waves * profile.soak_wave_size
    scenario = Scenario(
        key=f"soak_{total}",
        title=f"Soak: {total:,} discussions created and expired ({profile.soak_waves} waves)",
        baseline="suite",
        candidates=[],
        figures=SOAK_FIGURES,
        goals=[
            Goal("rss_growth_pct", "≤ +10 % RSS", value_at_most=10),
            Goal("fds_growth", "fds back to baseline", value_at_most=0),
            Goal("errors", "0 errors", value_at_most=0),
        ],
        notes=["The warm baseline is taken after the first wave has been created and expired."],
    )
    ctx.run.scenarios.append(scenario)
    ctx.say(scenario.title)
    system = await start_system(
        "suite",
        ctx.workdir("soak-suite"),
        latency_seconds=SOAK_LATENCY_SECONDS,
        session_flags=["--cleanup-interval-seconds", "1"],
    )
    stubs = client.Stubs(system.address)
    series: list[dict[str, float]] = []
    errors = 0
    problems: list[str] = []
    try:
        start = await system.counts()
        created = 0
        for wave in range(profile.soak_waves):
            sent = await client.burst(stubs, profile.soak_wave_size, f"soak-{wave}-{time.time_ns()}", SOAK_TTL_SECONDS)
            errors += sent.rejected
            created += sent.accepted
            await client.wait_all_done(stubs, ctx.profile.done_timeout_seconds)
            await _expired(system, start, created, time.monotonic() + 60)
            counts = (await system.counts()).minus(start)
            if counts.expired < created:
                problems.append(f"wave {wave + 1}: {created - counts.expired} not expired after 60 s")
            point = {
                "wave": float(wave + 1),
                "created": float(created),
                "rss_mb": procs.rss_bytes(system.pids) / 2**20,
                "fds": float(procs.open_fds(system.pids)),
                "completed": float(counts.completed),
                "expired": float(counts.expired),
            }
            for proc in system.suite.services if system.suite else []:
                point[f"rss_{proc.name}_mb"] = procs.rss_bytes([proc.pid]) / 2**20
            series.append(point)
            ctx.say(
                f"  [{scenario.key}] wave {wave + 1}: {created} created, {int(counts.expired)} expired, "
                f"RSS {point['rss_mb']:.1f} MB, fds {int(point['fds'])}"
            )
        final = (await system.counts()).minus(start)
        errors += max(0, created - final.completed) + final.finished_not_completed
        if final.completed > created:
            problems.append(f"server completed {final.completed} discussions but only {created} were created")
    finally:
        await stubs.close()
        await system.stop()
    ctx.run.series[scenario.key] = series
    warm, last = series[0], series[-1]
    values = {
        "created": float(created),
        "errors": float(errors),
        "rss_warm_mb": warm["rss_mb"],
        "rss_after_mb": last["rss_mb"],
        "rss_growth_pct": (last["rss_mb"] / warm["rss_mb"] - 1) * 100,
        "fds_warm": warm["fds"],
        "fds_after": last["fds"],
        "fds_growth": last["fds"] - warm["fds"],
    }
    ctx.record(scenario, Sample("suite", 0, values, validated=not problems, validation="; ".join(problems)))


# --- ablation: the same product with one cost switched off at a time ----------------------------------


ABLATION_VARIANTS = ["suite", "suite+memory", "suite+quiet", "suite+asyncio", "suite+memory+quiet"]


async def ablation(ctx: Context) -> None:
    """Where the suite's cost goes: SQLite (--store memory) and logging (quiet) switched off; uvloop switched off.

    Only shipped flags are changed, so each variant's ratio to the suite as shipped is the
    share of the cost that part accounts for (suite+asyncio: what uvloop saves, inverted).
    """
    profile = ctx.profile
    count = profile.ablation_burst
    latency = profile.burst_latency_seconds
    scenario = Scenario(
        key=f"ablation_burst_{count}",
        title=f"Diagnosis: burst of {count:,} with one cost switched off at a time ({latency:g} s in-process LLM)",
        baseline="suite",
        candidates=ABLATION_VARIANTS[1:],
        figures=[BURST_FIGURES[0], BURST_FIGURES[1], BURST_FIGURES[3], BURST_FIGURES[5]],
        notes=[
            "suite+memory: --store memory (no SQLite); suite+quiet: --log-level WARNING and no per-session log "
            "files; suite+asyncio: --event-loop asyncio, asyncio's own loop instead of the shipped uvloop.",
        ],
    )
    ctx.run.scenarios.append(scenario)
    ctx.say(scenario.title)
    for repeat in range(profile.repeats):
        for name in ABLATION_VARIANTS:
            ctx.record(scenario, await burst_sample(ctx, name, count, latency, repeat))
    if not h2load.available():
        return
    reads = Scenario(
        key="ablation_get_c50",
        title="Diagnosis: GetDiscussion C=50 with SQLite or uvloop switched",
        baseline="echo",
        candidates=["suite", "suite+memory", "suite+asyncio", "suite+memory+quiet"],
        figures=UNARY_FIGURES,
    )
    ctx.run.scenarios.append(reads)
    ctx.say(reads.title)
    systems = [
        await start_system(n, ctx.workdir(f"ablation-{n}"), latency_seconds=PAYLOAD_LATENCY_SECONDS)
        for n in reads.candidates
    ]
    echo: System | None = None
    try:
        # Each suite has its own store: finish one discussion on each and read that one back.
        payloads = {system.name: await client.completed_payload(system.address) for system in systems}
        payload_path = ctx.root / "ablation-payload.bin"
        payloads[systems[0].name].write(payload_path)
        echo = await start_system("echo", ctx.workdir("ablation-echo"), payload=payload_path)
        payloads["echo"] = payloads[systems[0].name]
        requests: dict[str, tuple[pathlib.Path, int]] = {}
        for index, (name, payload) in enumerate(payloads.items()):
            body = ctx.root / f"ablation-get-{index}.bin"
            request = session_pb2.GetDiscussionRequest(discussion_id=payload.document.discussion_id)
            body.write_bytes(grpc_frame(request.SerializeToString()))
            requests[name] = (body, len(grpc_frame(payload.document.SerializeToString())))
        for repeat in range(profile.repeats):
            for system in (echo, *systems):
                body, reply = requests[system.name]
                sample = await _h2load_sample(ctx, system, "GetDiscussion", body, 50, repeat, reply, messages=1)
                ctx.record(reads, sample)
    finally:
        for system in (*systems, *([echo] if echo else [])):
            await system.stop()


async def _expired(system: System, start: Counts, created: int, deadline: float) -> None:
    """Wait until the sweeper has removed `created` discussions since `start`, or the deadline."""
    while time.monotonic() < deadline:
        if (await system.counts()).minus(start).expired >= created:
            return
        await asyncio.sleep(0.25)


SCENARIOS: dict[str, Callable[[Context], object]] = {
    "reads": reads,
    "bursts": bursts,
    "sim-bursts": sim_bursts,
    "holds": holds,
    "sim-holds": lambda ctx: holds(ctx, llm="sim"),
    "soak": soak,
    "ablation": ablation,
    "llm_calls": llm_path.llm_calls,
    "llm_discussions": llm_path.llm_discussions,
    "quota_storm": llm_path.quota_storm,
}


def summary_line(scenario: Scenario) -> str:
    """One line per candidate and figure: median, spread and ratio to the baseline, for the console."""
    parts = []
    for candidate in scenario.candidates or [scenario.baseline]:
        for figure in scenario.figures:
            values = scenario.values(candidate, figure.key)
            if not values:
                continue
            low, high = spread(values)
            text = f"{candidate} {figure.key} {median(values):.4g} [{low:.4g}–{high:.4g}]"
            if scenario.candidates:
                ratios = scenario.ratios(candidate, figure.key)
                if ratios:
                    rlow, rhigh = spread(ratios)
                    text += f" = {median(ratios):.3g}× [{rlow:.3g}–{rhigh:.3g}]"
            parts.append(text)
    return "\n".join(f"    {p}" for p in parts)


async def run_all(ctx: Context, names: list[str]) -> None:
    """Run the named scenarios in order; one that fails is reported and the rest still run."""
    for name in names:
        started = time.monotonic()
        ctx.say(f"== {name}")
        try:
            result = SCENARIOS[name](ctx)
            if asyncio.iscoroutine(result):
                await result
        except Exception as error:  # a broken scenario must not hide the others' results
            ctx.say(f"!! scenario {name} failed: {type(error).__name__}: {error}")
            ctx.run.scenarios.append(
                Scenario(key=name, title=f"{name} (failed)", baseline="", candidates=[], figures=[], notes=[str(error)])
            )
        ctx.say(f"== {name} took {time.monotonic() - started:.0f} s")
