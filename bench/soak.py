"""Soak: many discussions created and expired, wave after wave, with memory and descriptors watched."""

from __future__ import annotations

import asyncio
import time

from bench import client, procs
from bench.context import Context
from bench.results import Figure, Goal, Sample, Scenario
from bench.systems import Counts, System, start_system

SOAK_TTL_SECONDS = 1.0
SOAK_LATENCY_SECONDS = 0.01


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


async def _expired(system: System, start: Counts, created: int, deadline: float) -> None:
    """Wait until the sweeper has removed `created` discussions since `start`, or the deadline."""
    while time.monotonic() < deadline:
        if (await system.counts()).minus(start).expired >= created:
            return
        await asyncio.sleep(0.25)
