"""Bursts: N discussions at once, create to done, on every system (and against the LLM simulator)."""

from __future__ import annotations

import time

from bench import client, procs
from bench.context import Context, PeakRss
from bench.promtext import Scrape
from bench.results import Figure, Goal, Sample, Scenario, percentile
from bench.systems import System, start_system
from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2

AGENT_COMPLETED = discussion_pb2.AGENT_STATUS_COMPLETED


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
            candidates=["suite", "suite+calls", *(["seed"] if with_seed else [])],
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
    partial = partially_failed(completed)
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


async def lag_scrapes(system: System) -> list[Scrape]:
    """The session's and agent service's metrics (their loop-lag histograms); none for a baseline."""
    if system.suite is None:
        return []
    return [await system.scrape_session(), await system.scrape_agents()]


def partially_failed(completed: list[session_pb2.Discussion]) -> int:
    """Completed discussions in which some agent failed (one failed agent does not fail a discussion)."""
    return sum(
        1
        for d in completed
        if not d.summary or len(d.results) != 4 or any(r.status != AGENT_COMPLETED for r in d.results)
    )
