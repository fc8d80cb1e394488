"""Holds: many discussions active at once, the loop lag and memory they cost."""

from __future__ import annotations

import asyncio
import time

from bench import client, procs
from bench.bursts import lag_scrapes, partially_failed
from bench.context import Context
from bench.promtext import histogram_quantile
from bench.results import Figure, Goal, Sample, Scenario, percentile
from bench.systems import System, start_system
from services.gen.roundtable.session.v1 import session_pb2

HOLD_SUMMARY_LATENCY_SECONDS = 1.0


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
        # As shipped (lanes), and with one RunDiscussion stream per discussion: what lanes save.
        candidates=[candidate, *([f"{candidate}+calls"] if llm == "fake" else [])],
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
        for name in ("minimal", *scenario.candidates):
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
            # Runs the agent service holds: RunDiscussion calls open, or runs on lanes (the shipped transport).
            running_calls = agents.total("grpc_server_started_total", grpc_method="RunDiscussion") - agents.total(
                "grpc_server_handled_total", grpc_method="RunDiscussion"
            )
            running = running_calls + agents.total("roundtable_agent_lane_runs")
            held = min(int(session.total("roundtable_discussions_active")), int(running))
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
        lag_before = await lag_scrapes(system)
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
        lag_after = await lag_scrapes(system)
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
        "partial": float(partially_failed(completed)),
        "errors": float(count - len(completed) + partially_failed(completed)),
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
