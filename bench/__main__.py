"""`python -m bench run|smoke|report|profile`: the benchmarks of issue 7.

run      every scenario at full size, then a py-spy profile of one burst; writes docs/benchmarks.md,
         docs/img/*.png and bench/results/latest.json (make bench)
smoke    every scenario at toy size; exits non-zero unless each ran and was validated (make bench-smoke)
report   re-render docs/benchmarks.md from bench/results/latest.json
profile  only the py-spy profile of one burst, printed
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench import compare, h2load, procs, profiling, report
from bench.profiles import FULL, PROFILES, SMOKE, Profile
from bench.results import Run
from bench.scenarios import SCENARIOS, Context, run_all, summary_line

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BEFORE = RESULTS / "before-fixes.json"
DOC = REPO / "docs" / "benchmarks.md"
IMG = REPO / "docs" / "img"
# Scenarios that need h2load; the others run on the Python client alone.
NEEDS_H2LOAD = {"reads"}
PROFILE_BURST = 2_000


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    with_name = pathlib.Path("/proc/cpuinfo")
    if with_name.exists():
        for line in with_name.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    meminfo = pathlib.Path("/proc/meminfo")
    if meminfo.exists():
        kib = int(meminfo.read_text().split()[1])
        memory = f"{kib / 2**20:.1f} GiB"
    h2load_version = ""
    if h2load.available():
        output = subprocess.run(["h2load", "--version"], capture_output=True, text=True, check=False).stdout
        h2load_version = output.strip().splitlines()[0] if output.strip() else ""
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": memory,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "grpcio": importlib.metadata.version("grpcio"),
        "protobuf": importlib.metadata.version("protobuf"),
        "h2load": h2load_version or "not installed",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "product revision at start": procs.product_revision(),
    }


async def _run(profile: Profile, names: list[str], root: pathlib.Path, with_profile: bool) -> Run:
    procs.pin_self()
    run = Run(
        profile=profile.name,
        started_at=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine(),
    )
    ctx = Context(profile=profile, root=root, run=run)
    started = time.monotonic()
    await run_all(ctx, names)
    if with_profile:
        await _profile(ctx, PROFILE_BURST)
    run.machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    run.machine["product revision at end"] = procs.product_revision()
    run.machine["duration"] = f"{time.monotonic() - started:.0f} s"
    return run


async def _profile(ctx: Context, count: int) -> None:
    if profiling.py_spy() is None:
        ctx.say("py-spy not installed: no hotspot profile (pip install py-spy==0.4.1)")
        return
    blocks: list[dict[str, Any]] = []
    ctx.say(f"== profile: py-spy on session and agents during a burst of {count:,}")
    burst = await profiling.record_burst(ctx.workdir("profile-burst"), count, ctx.profile.burst_latency_seconds)
    blocks += _hotspot_blocks(f"burst of {count:,} discussions", burst, "discussion")
    if h2load.available():
        ctx.say("== profile: py-spy on the session service under GetDiscussion, C=50")
        reads = await profiling.record_reads(ctx.workdir("profile-reads"), 50, 10.0)
        blocks += _hotspot_blocks(f"GetDiscussion C=50 ({reads.count:,} RPCs)", reads, "RPC", processes=("session",))
    ctx.run.hotspots = blocks
    for block in blocks:
        ctx.say(f"  {block['title']}")
        for row in block["rows"][:12]:
            ctx.say("    " + "  ".join(str(c) for c in row))


def _hotspot_blocks(
    label: str, result: profiling.Profiled, unit: str, processes: tuple[str, ...] = ("session", "agents")
) -> list[dict[str, Any]]:
    """Tables of one profile: CPU per OS thread, py-spy samples per thread, top self and our inclusive frames."""
    blocks: list[dict[str, Any]] = []
    per = "ms" if unit == "discussion" else "µs"
    scale = 1000 if unit == "discussion" else 1e6
    for name, split in result.thread_cpu.items():
        total = sum(split.values())
        if name not in processes or total < 0.05:
            continue
        rows = [[t, f"{sec:.2f}", f"{sec / max(result.count, 1) * scale:.1f}"] for t, sec in split.items() if sec]
        rows.append(["**total**", f"{total:.2f}", f"{total / max(result.count, 1) * scale:.1f}"])
        blocks.append(
            {
                "title": f"{label} — {name}: CPU by OS thread over {result.seconds:.1f} s",
                "columns": ["thread", "CPU s", f"CPU {per} per {unit}"],
                "rows": rows,
            }
        )
    for name, text in result.stacks.items():
        if name not in processes:
            continue
        blocks.append(
            {
                "title": f"{label} — {name}: py-spy samples by Python thread",
                "columns": ["thread", "% of samples"],
                "rows": [[thread, share] for thread, share in profiling.thread_shares(text).items()],
            }
        )
        blocks.append(
            {
                "title": f"{label} — {name}: top functions by self samples (where the CPU is)",
                "columns": ["function", "self %", "inclusive %"],
                "rows": [[h.function, h.self_pct, h.inclusive_pct] for h in profiling.top_self(name, text, 12)],
            }
        )
        ours = [h for h in profiling.top(name, text, 400) if _is_ours(h.function)][:15]
        blocks.append(
            {
                "title": f"{label} — {name}: our functions by inclusive samples",
                "columns": ["function", "inclusive %", "self %"],
                "rows": [[h.function, h.inclusive_pct, h.self_pct] for h in ours],
            }
        )
    return blocks


def _is_ours(function: str) -> bool:
    """A frame in the product's own code (paths are shortened to what follows services/)."""
    path = function.rsplit("(", 1)[-1]
    return path.split("/", 1)[0] in {"session", "agents", "shared", "monitor"}


def _names(only: str | None, available_h2load: bool, require_tools: bool) -> list[str]:
    names = list(SCENARIOS) if not only else [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    if not available_h2load and NEEDS_H2LOAD & set(names):
        message = f"h2load is not installed (Debian package {h2load.DEBIAN_PACKAGE}): the read scenarios need it"
        if require_tools:
            raise SystemExit(message)
        print(f"!! {message}; skipping them", flush=True)
        names = [n for n in names if n not in NEEDS_H2LOAD]
    return names


def _print_summary(run: Run) -> None:
    print("\n== summary (median [min–max], ratio to the same run's baseline)")
    for scenario in run.scenarios:
        if scenario.samples:
            state = "validated" if scenario.validated else "NOT VALIDATED"
            print(f"  {scenario.title} ({state})")
            print(summary_line(scenario))


def write_outputs(run: Run, doc: pathlib.Path, img: pathlib.Path) -> None:
    """docs/benchmarks.md, its charts and the raw JSON."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    # A run written to another document (e.g. --only some scenarios) keeps its own results beside latest.json,
    # and its own charts beside docs/benchmarks.md's (same file names, other data).
    (RESULTS / ("latest.json" if doc == DOC else f"{doc.stem}.json")).write_text(run.to_json())
    if doc != DOC:
        img = img / doc.stem
    img.mkdir(parents=True, exist_ok=True)
    prefix = os.path.relpath(img, doc.parent)
    # The run before issue 7's fixes, kept so every later run shows how far they moved each goal.
    before = Run.from_json(BEFORE.read_text()) if BEFORE.exists() else None
    doc.write_text(report.render(run, img, prefix, before=before))
    print(f"wrote {doc.relative_to(REPO) if doc.is_relative_to(REPO) else doc} and charts in {img}")


def smoke_failures(run: Run, names: list[str]) -> list[str]:
    """What the smoke run asserts: every scenario produced samples and every sample was validated."""
    failures = []
    produced = {s.key: s for s in run.scenarios}
    for scenario in produced.values():
        if scenario.title.endswith("(failed)"):
            failures.append(f"{scenario.key}: {'; '.join(scenario.notes)}")
        elif not scenario.samples:
            failures.append(f"{scenario.key}: no samples")
        elif not scenario.validated:
            bad = [f"{s.system}: {s.validation}" for s in scenario.samples if not s.validated]
            failures.append(f"{scenario.key}: not validated ({'; '.join(bad)})")
    if len([s for s in produced.values() if s.samples]) < len(names):
        failures.append(f"expected at least {len(names)} scenarios with samples, got {len(produced)}")
    return failures


def run_smoke(profile: Profile, only: str | None = None) -> list[str]:
    """Run the scenarios at `profile`'s size; the list of failures (empty: all ran and were validated)."""
    require = os.environ.get("ROUNDTABLE_REQUIRE_TOOLS") == "1"
    names = _names(only, h2load.available(), require)
    with tempfile.TemporaryDirectory(prefix="roundtable-bench-") as scratch:
        run = asyncio.run(_run(profile, names, pathlib.Path(scratch), with_profile=False))
    _print_summary(run)
    return smoke_failures(run, names)


def main(argv: list[str] | None = None) -> int:
    """Parse the command and run it."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="every scenario at full size; writes docs/benchmarks.md")
    run_parser.add_argument("--only", help=f"comma-separated scenarios: {', '.join(SCENARIOS)}")
    run_parser.add_argument("--profile", default=FULL.name, choices=sorted(PROFILES))
    run_parser.add_argument("--no-hotspots", action="store_true", help="skip the py-spy profile")
    run_parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, databases)")
    run_parser.add_argument("--doc", type=pathlib.Path, default=DOC)
    smoke_parser = sub.add_parser("smoke", help="every scenario at toy size; asserts each ran and was validated")
    smoke_parser.add_argument("--only", help="comma-separated scenarios")
    smoke_parser.add_argument("--profile", default=SMOKE.name, choices=sorted(PROFILES))
    sub.add_parser("report", help="re-render docs/benchmarks.md from bench/results/latest.json")
    compare_parser = sub.add_parser("compare", help="each goal before and after: two saved runs side by side")
    compare_parser.add_argument("before", type=pathlib.Path, help="a saved run (JSON), e.g. a copy of latest.json")
    compare_parser.add_argument("after", type=pathlib.Path, nargs="?", default=RESULTS / "latest.json")
    profile_parser = sub.add_parser("profile", help="py-spy on the suite during one burst")
    profile_parser.add_argument("--count", type=int, default=PROFILE_BURST)
    args = parser.parse_args(argv)

    if args.command == "smoke":
        started = time.monotonic()
        failures = run_smoke(PROFILES[args.profile], args.only)
        elapsed = time.monotonic() - started
        if failures:
            print(f"\nbench smoke FAILED after {elapsed:.0f} s:\n  " + "\n  ".join(failures))
            return 1
        print(f"\nbench smoke passed in {elapsed:.0f} s: every scenario ran and was validated")
        return 0
    if args.command == "compare":
        before, after = (Run.from_json(path.read_text()) for path in (args.before, args.after))
        print("\n".join(compare.comparison(before, after)))
        return 0
    if args.command == "report":
        run = Run.from_json((RESULTS / "latest.json").read_text())
        write_outputs(run, DOC, IMG)
        return 0
    if args.command == "profile":
        scratch = pathlib.Path(tempfile.mkdtemp(prefix="roundtable-bench-"))
        procs.pin_self()
        run = Run(profile="profile", started_at="", machine={})
        ctx = Context(profile=FULL, root=scratch, run=run)
        asyncio.run(_profile(ctx, args.count))
        shutil.rmtree(scratch, ignore_errors=True)
        return 0
    require = os.environ.get("ROUNDTABLE_REQUIRE_TOOLS") == "1"
    names = _names(args.only, h2load.available(), require)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="roundtable-bench-"))
    print(f"scratch directory: {scratch}", flush=True)
    try:
        run = asyncio.run(_run(PROFILES[args.profile], names, scratch, with_profile=not args.no_hotspots))
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    _print_summary(run)
    img = args.doc.parent / "img"
    write_outputs(run, args.doc, img)
    return 0


if __name__ == "__main__":
    sys.exit(main())
