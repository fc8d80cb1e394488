"""Ablation: the same product with one cost switched off at a time."""

from __future__ import annotations

import pathlib

from bench import client, h2load
from bench.bursts import BURST_FIGURES, burst_sample
from bench.context import Context
from bench.payloads import grpc_frame
from bench.reads import PAYLOAD_LATENCY_SECONDS, UNARY_FIGURES, h2load_sample
from bench.results import Scenario
from bench.systems import System, start_system
from services.gen.roundtable.session.v1 import session_pb2

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
                sample = await h2load_sample(ctx, system, "GetDiscussion", body, 50, repeat, reply, messages=1)
                ctx.record(reads, sample)
    finally:
        for system in (*systems, *([echo] if echo else [])):
            await system.stop()
