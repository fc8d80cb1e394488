"""Peers: Roundtable beside other agent servers on one workload, in the same run (issue 14, item 4).

The workload for every server: a discussion is 3 agents, each one fake LLM call of the profile's
latency, in parallel (Roundtable, and the bare grpc.aio and seed baselines that mimic it, also run
the moderator's summary: a 4th call, in sequence). K discussions with a bounded number of creates in
flight, and K at once; the servers on core 0, the load on core 1. Rows: bare grpc.aio
(bench/minimal_server.py), the seed design (bench/seed_server.py, first size only: it is slow),
Roundtable as shipped (in-process fake LLM), AutoGen 0.7.5's gRPC worker runtime (its own
virtualenv, bench/peer_autogen*.py) and Roundtable without the summary (skip_summary: the like-for-like
row, 3 calls as the peers make; PeerPlan.no_summary_row, on by default).

`make bench` runs it at full size as scenario `peers`; `python -m bench.peers --sizes 1000 --at-once 0`
runs it alone at a chosen size and writes docs/benchmarks-peers.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

from bench import client, procs
from bench.context import Context, PeakRss
from bench.peer_autogen_system import missing_message, peers_python, read_peak_active, run_client, start_autogen
from bench.profiles import FULL, PROFILES
from bench.results import Figure, Goal, Run, Sample, Scenario, goal_met, median, percentile
from bench.systems import start_system
from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2

REQUIRE_TOOLS_ENV = "ROUNDTABLE_REQUIRE_TOOLS"
# The CreateDiscussionRequest option that skips the moderator's summary: the session service does not
# have it yet (the lead adds it); the no-summary row asks for it by this name and fails clearly without it.
NO_SUMMARY_FIELD = "skip_summary"
NO_SUMMARY = "suite-no-summary"
# The servers' RSS is read from /proc this often while a run goes on (by the load generator, at no cost to them).
RSS_INTERVAL_SECONDS = 0.2
# After start-up, before the idle RSS is read: the servers' first allocations settle.
SETTLE_SECONDS = 0.5
REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks-peers.md"

PEER_FIGURES = [
    Figure("completed_per_s", "completed", "discussions/s"),
    Figure("cpu_ms_per_discussion", "server CPU per discussion (all its processes)", "ms", False, digits=2),
    Figure("rss_per_active_kb", "RSS per active discussion", "KB", higher_is_better=False, digits=1),
    Figure("create_p99_ms", "CreateDiscussion p99", "ms", higher_is_better=False, digits=1),
    Figure("p99_done_s", "p99 create→done", "s", higher_is_better=False, digits=2),
    Figure("errors", "lost or failed discussions", "", higher_is_better=False),
]

SYSTEM_TITLES = {
    "minimal": "bare grpc.aio, create + stream",
    "seed": "seed design (sync gRPC, 100 threads)",
    "suite": "**Roundtable** (shipped services, in-process fake LLM)",
    NO_SUMMARY: "**Roundtable**, no summary (3 calls, like the peers)",
    "autogen": "AutoGen 0.7.5 gRPC worker runtime (host + worker), publish/subscribe",
    "autogen-rpc": "AutoGen 0.7.5 gRPC worker runtime, send_message to each agent",
}


@dataclass(frozen=True)
class PeerPlan:
    """How big the peers scenario is: discussions per paced run, creates in flight, the at-once size, repeats."""

    sizes: tuple[int, ...]
    in_flight: int
    # 0: no at-once run.
    at_once: int
    repeats: int
    # A Roundtable row with the moderator off (needs CreateDiscussionRequest.skip_summary; see NO_SUMMARY_FIELD).
    no_summary_row: bool = True


PLANS = {
    FULL.name: PeerPlan(sizes=(1_000, 5_000), in_flight=200, at_once=5_000, repeats=2),
    "smoke": PeerPlan(sizes=(50,), in_flight=20, at_once=50, repeats=1),
    "tiny": PeerPlan(sizes=(10,), in_flight=5, at_once=10, repeats=1),
}


def tools_required() -> bool:
    """Whether a missing peer fails the scenario instead of skipping its row (CI sets this)."""
    return os.environ.get(REQUIRE_TOOLS_ENV) == "1"


async def peers(ctx: Context, plan: PeerPlan | None = None) -> None:
    """Every peer system on the same discussions, size after size; AutoGen's row is skipped when not installed."""
    plan = plan or PLANS.get(ctx.profile.name, PLANS[FULL.name])
    latency = ctx.profile.burst_latency_seconds
    with_autogen = peers_python() is not None
    if not with_autogen:
        if tools_required():
            raise RuntimeError(f"{missing_message()}; {REQUIRE_TOOLS_ENV}=1 makes this a failure")
        ctx.say(f"!! {missing_message()}: the AutoGen row is skipped")
    runs = [(count, plan.in_flight) for count in plan.sizes]
    if plan.at_once:
        runs.append((plan.at_once, plan.at_once))
    for index, (count, in_flight) in enumerate(runs):
        at_once = in_flight >= count
        systems = [
            "minimal",
            *(["seed"] if index == 0 else []),
            "suite",
            *([NO_SUMMARY] if plan.no_summary_row else []),
            *(["autogen", "autogen-rpc"] if with_autogen else []),
        ]
        scenario = Scenario(
            key=f"peers_{count}_{'at_once' if at_once else f'c{in_flight}'}",
            title=f"Peers: {count:,} discussions, "
            + ("all created at once" if at_once else f"{in_flight} creates in flight")
            + f" (3 agents, one {latency:g} s call each, in parallel)",
            baseline="autogen" if with_autogen else "minimal",
            candidates=[s for s in systems if s != ("autogen" if with_autogen else "minimal")],
            figures=PEER_FIGURES,
            goals=_goals(latency, with_autogen),
            notes=_notes(latency, with_autogen),
        )
        ctx.run.scenarios.append(scenario)
        ctx.say(scenario.title)
        for repeat in range(plan.repeats):
            for name in systems:
                if name.startswith("autogen"):
                    sample = await autogen_sample(ctx, name, count, latency, repeat)
                else:
                    sample = await grpc_sample(ctx, name, count, in_flight, latency, repeat)
                ctx.record(scenario, sample)


def _goals(latency: float, with_autogen: bool) -> list[Goal]:
    goals = [
        Goal("errors", "0 lost", value_at_most=0),
        Goal("p99_done_s", f"p99 create→done ≤ floor ({2 * latency:g} s) + 0.5 s", value_at_most=2 * latency + 0.5),
    ]
    if with_autogen:
        goals += [
            Goal("cpu_ms_per_discussion", "≤ 0.5× AutoGen's, same run", ratio_at_most=0.5),
            Goal("rss_per_active_kb", "≤ AutoGen's", ratio_at_most=1.0),
        ]
    return goals


def _notes(latency: float, with_autogen: bool) -> list[str]:
    notes = [
        "Server CPU: user + system of every server process over the run (Roundtable: session, agents and "
        "monitor; AutoGen: host and worker), divided by the discussions completed. The client's own CPU per "
        "discussion is in the repeat table (client_cpu_ms_per_discussion: the bench process, which also samples "
        "RSS, or AutoGen's client process): where it nears the run's length, the client set the pace, not the server.",
        "RSS per active discussion: (peak RSS of the server processes, read from /proc every "
        f"{RSS_INTERVAL_SECONDS:g} s, − their RSS idle after start-up) / the most discussions active at once: "
        "from each one's accept to its end as the client timed them; for AutoGen, which acknowledges nothing, "
        "the most its host held at once (routed in, answers not yet routed back out: peak_active; its worker's "
        "own peak is peak_active_worker). Sent-and-not-done (peak_sent_not_done) would flatter AutoGen: a "
        "publish can wait in the client's own queue. The figure is rough wherever the server holds discussions "
        "in different states: AutoGen's host counts those still queued for its worker (about 10 KB each at 5,000 "
        "at once), while Roundtable's creates not yet accepted cost memory in its gRPC server but are not counted. "
        "The clean figure for memory per held discussion is the holds scenario's (all held, then measured).",
        f"Roundtable, bare grpc.aio and the seed design also run the moderator's summary ({latency:g} s, after "
        f"the answers): their create→done floor is {2 * latency:g} s, the peers' {latency:g} s.",
    ]
    if with_autogen:
        notes.append(
            "AutoGen (publish/subscribe, the baseline): the client publishes each discussion to the panel's topic "
            "(fire and forget: nothing acknowledges a publish, so it has no CreateDiscussion latency and its creates "
            "are never 'in flight'; all are sent at once); the host routes it to the worker, whose three long-lived "
            "panelists each sleep, then publish an answer through the host to the client. Done at the third answer. "
            "AutoGen (send_message): the client asks each of the three panelists directly, all discussions at once; "
            "each request and its response pass through the host (12 messages per discussion instead of 8). "
            "Both validated by the worker's counts (discussions received, answers sent, discussions answered)."
        )
    return notes


def peak_active(started_wall: dict[str, float], done_wall: dict[str, float]) -> int:
    """The most discussions active at once: each from its start (accepted, or published) to its end, if any."""
    steps = sorted(
        [(at, 1) for at in started_wall.values()] + [(at, -1) for key, at in done_wall.items() if key in started_wall]
    )
    active = peak = 0
    for _, step in steps:  # at equal times an end sorts before a start: they never overlapped
        active += step
        peak = max(peak, active)
    return peak


def timing_values(
    first_sent: float, sent_wall: dict[str, float], started_wall: dict[str, float], done_wall: dict[str, float]
) -> dict[str, float]:
    """Throughput, create→done percentiles and the peak of active discussions, the same way for every system."""
    done_seconds = [at - sent_wall[key] for key, at in done_wall.items()]
    last_done = max(done_wall.values(), default=float("nan"))
    return {
        "completed_per_s": len(done_wall) / max(last_done - first_sent, 1e-9),
        "p50_done_s": percentile(done_seconds, 0.50),
        "p99_done_s": percentile(done_seconds, 0.99),
        "peak_active": float(peak_active(started_wall, done_wall)),
    }


def no_summary_request(request: session_pb2.CreateDiscussionRequest) -> None:
    """Ask the session service to skip the moderator (the option the no-summary row needs)."""
    if NO_SUMMARY_FIELD not in request.DESCRIPTOR.fields_by_name:
        raise RuntimeError(
            f"the no-summary row needs CreateDiscussionRequest.{NO_SUMMARY_FIELD}, which this checkout lacks"
        )
    setattr(request, NO_SUMMARY_FIELD, True)


def failed_within(completed: list[session_pb2.Discussion], with_summary: bool) -> int:
    """Completed discussions missing an answer, or the summary when one was asked for, or with a failed agent."""
    results = 4 if with_summary else 3
    return sum(
        1
        for d in completed
        if (with_summary and not d.summary)
        or len(d.results) != results
        or any(r.status != discussion_pb2.AGENT_STATUS_COMPLETED for r in d.results)
    )


async def grpc_sample(ctx: Context, name: str, count: int, in_flight: int, latency: float, repeat: int) -> Sample:
    """One system that speaks SessionService: start it fresh, run the paced burst, wait for every end, validate."""
    with_summary = name != NO_SUMMARY
    system = await start_system(
        "suite" if name == NO_SUMMARY else name, ctx.workdir(f"peers-{name}-{count}"), latency_seconds=latency
    )
    stubs = client.Stubs(system.address)
    try:
        await asyncio.sleep(SETTLE_SECONDS)
        idle_rss = procs.rss_bytes(system.pids)
        before = await system.counts("CreateDiscussion")
        cpu_before = procs.cpu_seconds(system.pids)
        client_cpu_before = time.process_time()
        with PeakRss(system.pids, RSS_INTERVAL_SECONDS) as rss:
            adjust = None if with_summary else no_summary_request
            sent = await client.burst(stubs, count, f"peers-{time.time_ns()}", in_flight=in_flight, adjust=adjust)
            await client.wait_all_done(stubs, ctx.profile.done_timeout_seconds)
        cpu_seconds = procs.cpu_seconds(system.pids) - cpu_before
        client_cpu_seconds = time.process_time() - client_cpu_before
        docs = await client.fetch(stubs, list(sent.sent_wall))
        delta = (await system.counts("CreateDiscussion")).minus(before)
    finally:
        await stubs.close()
        await system.stop()
    completed = [d for d in docs if d.status == session_pb2.DISCUSSION_STATUS_COMPLETED]
    done_wall = {d.discussion_id: client.done_wall(d) for d in completed}
    create_ms = [(sent.accepted_wall[i] - sent.sent_wall[i]) * 1000 for i in sent.sent_wall]
    problems: list[str] = []
    if delta.created_ok != sent.accepted:
        problems.append(f"server accepted {delta.created_ok}, client saw {sent.accepted}")
    if delta.completed != len(completed):
        problems.append(f"server completed {delta.completed}, documents say {len(completed)}")
    failed = failed_within(completed, with_summary)
    timing = timing_values(sent.first_sent, sent.sent_wall, sent.accepted_wall, done_wall)
    values = {
        "sent": float(count),
        "completed": float(len(completed)),
        "errors": float(sent.rejected + sent.accepted - len(completed) + failed),
        "cpu_ms_per_discussion": cpu_seconds / max(len(completed), 1) * 1000,
        "rss_per_active_kb": (rss.peak - idle_rss) / max(timing["peak_active"], 1) / 1024,
        "create_p50_ms": percentile(create_ms, 0.50),
        "create_p99_ms": percentile(create_ms, 0.99),
        **timing,
        "client_cpu_ms_per_discussion": client_cpu_seconds / max(count, 1) * 1000,
        "rss_idle_mb": idle_rss / 2**20,
        "rss_peak_mb": rss.peak / 2**20,
    }
    return Sample(name, repeat, values, validated=not problems, validation="; ".join(problems))


async def autogen_sample(ctx: Context, name: str, count: int, latency: float, repeat: int) -> Sample:
    """AutoGen's host and worker started fresh; its client sends `count` discussions at once and waits for the answers.

    `autogen` publishes each discussion to the panel's topic; `autogen-rpc` asks each panelist with send_message.
    """
    mode = "rpc" if name == "autogen-rpc" else "publish"
    started = await start_autogen(ctx.workdir(f"peers-{name}-{count}"), latency)
    system = started.system
    try:
        await asyncio.sleep(SETTLE_SECONDS)
        idle_rss = procs.rss_bytes(system.pids)
        before = await system.counts()
        cpu_before = procs.cpu_seconds(system.pids)
        with PeakRss(system.pids, RSS_INTERVAL_SECONDS) as rss:
            run_tag = f"peers-{time.time_ns()}"
            figures = await run_client(started, count, ctx.profile.done_timeout_seconds, run_tag, mode)
        cpu_seconds = procs.cpu_seconds(system.pids) - cpu_before
        delta = (await system.counts()).minus(before)
        host_peak_active = await read_peak_active(started.host_count_address)
        worker_peak_active = await read_peak_active(system.address)
    finally:
        await system.stop()
    sent, completed = len(figures.sent_wall), len(figures.done_wall)
    problems: list[str] = []
    if delta.created_ok != sent:
        problems.append(f"worker received {delta.created_ok} discussions, client published {sent}")
    if delta.completed != completed:
        problems.append(f"worker answered {delta.completed} discussions in full, client saw {completed}")
    if delta.msgs_sent != figures.answers:
        problems.append(f"worker sent {delta.msgs_sent} answers, client received {figures.answers}")
    timing = timing_values(figures.first_sent, figures.sent_wall, figures.sent_wall, figures.done_wall)
    # Sent is not held: a publish may wait in the client's own queue. The host's peak is what the server held.
    timing["peak_sent_not_done"] = timing.pop("peak_active")
    values = {
        "sent": float(sent),
        "completed": float(completed),
        "errors": float(sent - completed + figures.unexpected_answers),
        "cpu_ms_per_discussion": cpu_seconds / max(completed, 1) * 1000,
        "rss_per_active_kb": (rss.peak - idle_rss) / max(host_peak_active, 1) / 1024,
        "peak_active": float(host_peak_active),
        "peak_active_worker": float(worker_peak_active),
        **timing,
        "client_cpu_ms_per_discussion": figures.cpu_seconds / max(sent, 1) * 1000,
        "rss_idle_mb": idle_rss / 2**20,
        "rss_peak_mb": rss.peak / 2**20,
    }
    return Sample(name, repeat, values, validated=not problems, validation="; ".join(problems))


def _cell(values: list[float], digits: int) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "–"
    text = f"{median(finite):,.{digits}f}"
    if len(finite) > 1 and min(finite) != max(finite):
        text += f" [{min(finite):,.{digits}f}–{max(finite):,.{digits}f}]"
    return text


def peer_table(scenario: Scenario) -> list[str]:
    """The issue's table for one scenario: a row per system, medians [min–max] over repeats."""
    lines = [
        "| server | completed/s | vs bare grpc.aio | server CPU ms / discussion | RSS KB / active discussion "
        "| CreateDiscussion p99 ms | p99 create→done s | lost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    bare = median(scenario.values("minimal", "completed_per_s"))
    # The order: the baselines, the peer, then Roundtable.
    for name in SYSTEM_TITLES:
        if not scenario.values(name, "completed_per_s"):
            continue
        throughput = median(scenario.values(name, "completed_per_s"))
        versus = f"{throughput / bare:.2f}×" if bare and not math.isnan(bare) else "–"
        cells = [
            _cell(scenario.values(name, "completed_per_s"), 0),
            versus,
            _cell(scenario.values(name, "cpu_ms_per_discussion"), 2),
            _cell(scenario.values(name, "rss_per_active_kb"), 1),
            _cell(scenario.values(name, "create_p99_ms"), 1),
            _cell(scenario.values(name, "p99_done_s"), 2),
            _cell(scenario.values(name, "errors"), 0),
        ]
        lines.append(f"| {SYSTEM_TITLES.get(name, name)} | " + " | ".join(cells) + " |")
    return lines


def goal_lines(scenario: Scenario) -> list[str]:
    """Each goal of issue 14 for each Roundtable row: its value (and ratio to the baseline) and whether it is met."""
    lines = []
    for name in ("suite", NO_SUMMARY):
        if not scenario.values(name, "completed_per_s"):
            continue
        for goal in scenario.goals:
            if name == NO_SUMMARY and goal.figure == "p99_done_s":
                continue  # its floor is one call, not two: the goal as written is about the shipped path
            value = median(scenario.values(name, goal.figure))
            text = f"{value:.3g}"
            if goal.ratio_at_least is not None or goal.ratio_at_most is not None:
                text += f" = {median(scenario.ratios(name, goal.figure)):.3g}× {scenario.baseline}'s"
            verdict = {True: "**met**", False: "**missed**", None: "n/a"}[goal_met(scenario, goal, name)]
            label = next((f.label for f in scenario.figures if f.key == goal.figure), goal.figure)
            lines.append(f"- {SYSTEM_TITLES[name]}, {label}: {text} (goal: {goal.text}): {verdict}")
    return lines


def render(run: Run) -> str:
    """docs/benchmarks-peers.md: how it was run, the table per scenario, the goals, then every repeat."""
    from bench.report import repeat_table

    command = run.machine.get("command", "python -m bench.peers")
    out = [
        "# Benchmarks: Roundtable beside other agent servers (issue 14, item 4)",
        "",
        f"Generated by `{command}`; do not edit by hand, re-run it. `make bench` runs the same scenario "
        "(`peers`) at full size: 1,000 and 5,000 discussions with 200 creates in flight, and 5,000 at once, "
        "2 repeats.",
        "",
        "## Machine and method",
        "",
        *[f"- **{k}**: {v}" for k, v in run.machine.items()],
        f"- **run**: {run.profile}; started {run.started_at}",
        "",
        "Servers run on core 0 (`taskset -c 0`), each started fresh for each sample; the load generator (and "
        "AutoGen's client, a process of its own) on core 1. The machine was shared with other work while this "
        "ran (the 1-minute load average is in every sample): only same-run comparisons mean anything, and with "
        "so few repeats the [min–max] shown is all there is to judge how much the neighbours moved a figure.",
        "",
    ]
    for scenario in run.scenarios:
        if not scenario.samples:
            continue
        out += [f"## {scenario.title}", "", *peer_table(scenario), ""]
        goals = goal_lines(scenario)
        if goals:
            out += ["Goals of issue 14, read against the same run:", "", *goals, ""]
        out += [f"- {note}" for note in scenario.notes]
        if len(scenario.revisions) > 1:
            out.append(
                f"- The product code changed during this scenario ({', '.join(scenario.revisions)}: others edited "
                "services/ while it ran); each sample carries the revision it ran."
            )
        out += ["", "Every repeat:", "", *repeat_table(scenario), ""]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """python -m bench.peers: the peers scenario alone, at a chosen size; writes docs/benchmarks-peers.md."""
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=main.__doc__)
    parser.add_argument("--sizes", default="1000,5000", help="discussions per paced run, comma-separated")
    parser.add_argument("--in-flight", type=int, default=200, help="creates in flight in the paced runs")
    parser.add_argument("--at-once", type=int, default=5000, help="discussions created at once (0: none)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--without-no-summary-row",
        dest="no_summary_row",
        action="store_false",
        help="leave out Roundtable with the moderator off",
    )
    parser.add_argument("--profile", default=FULL.name, choices=sorted(PROFILES), help="latency and timeouts")
    parser.add_argument("--doc", type=pathlib.Path, default=DOC)
    parser.add_argument("--render-only", action="store_true", help="re-render the doc from its saved run (JSON)")
    args = parser.parse_args(argv)
    from bench.__main__ import RESULTS, machine

    saved = RESULTS / f"{args.doc.stem}.json"
    if args.render_only:
        args.doc.write_text(render(Run.from_json(saved.read_text())))
        print(f"wrote {args.doc} from {saved}")
        return 0
    plan = PeerPlan(
        sizes=tuple(int(s) for s in args.sizes.split(",") if s.strip()),
        in_flight=args.in_flight,
        at_once=args.at_once,
        repeats=args.repeats,
        no_summary_row=args.no_summary_row,
    )
    procs.pin_self()
    profile = PROFILES[args.profile]
    run = Run(
        profile=f"{plan}, {profile.burst_latency_seconds:g} s calls (profile {profile.name})",
        started_at=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine(),
    )
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="roundtable-peers-"))
    started = time.monotonic()
    try:
        ctx = Context(profile=profile, root=scratch, run=run)
        asyncio.run(peers(ctx, plan))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    run.machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    run.machine["product revision at end"] = procs.product_revision()
    run.machine["duration"] = f"{time.monotonic() - started:.0f} s"
    run.machine["command"] = ("python -m bench.peers " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved.write_text(run.to_json())
    args.doc.write_text(render(run))
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
