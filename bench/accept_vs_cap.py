"""Diagnosis: accept rate and throughput of a 1,000 burst as the agent-call cap is lowered.

`python -m bench.accept_vs_cap` (about 3 minutes, not part of `make bench`). It tests the
explanation in findings.md §3: creates compete with the events of discussions already
running for one core, so fewer discussions running at once means faster accepts and,
with a fixed LLM latency, proportionally lower throughput.
"""

from __future__ import annotations

import asyncio
import pathlib
import tempfile
import time

from bench import client, procs
from bench.results import percentile
from bench.systems import start_system
from services.gen.roundtable.session.v1 import session_pb2

CAPS = (1000, 200, 50)
BURST = 1000
REPEATS = 2


async def burst(name: str, cap: int | None) -> tuple[float, float, float]:
    """Accepts/s, completed/s and p99 create→done of one burst on a fresh system."""
    flags = ["--max-concurrent-agent-runs", str(cap)] if cap else None
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="roundtable-accept-"))
    system = await start_system(name, workdir, latency_seconds=1.0, session_flags=flags)
    stubs = client.Stubs(system.address)
    try:
        sent = await client.burst(stubs, BURST, f"accept-{time.time_ns()}")
        await client.wait_all_done(stubs, 600)
        docs = await client.fetch(stubs, list(sent.sent_wall))
    finally:
        await stubs.close()
        await system.stop()
    completed = [d for d in docs if d.status == session_pb2.DISCUSSION_STATUS_COMPLETED]
    if len(completed) != BURST:
        raise SystemExit(f"{name} cap {cap}: {len(completed)} of {BURST} completed")
    done = [client.done_wall(d) - sent.sent_wall[d.discussion_id] for d in completed]
    last = max(client.done_wall(d) for d in completed)
    return (
        sent.accepted / (sent.last_accepted - sent.first_sent),
        len(completed) / (last - sent.first_sent),
        percentile(done, 0.99),
    )


async def main() -> None:
    """Each repeat: the minimal server, then the suite at each cap; ratios to that repeat's minimal server."""
    procs.pin_self()
    for repeat in range(1, REPEATS + 1):
        accept, completed, p99 = await burst("minimal", None)
        print(f"repeat {repeat} minimal: accept {accept:.0f}/s, completed {completed:.0f}/s, p99 {p99:.2f} s")
        for cap in CAPS:
            a, c, p = await burst("suite", cap)
            print(
                f"repeat {repeat} suite, cap {cap}: accept {a:.0f}/s ({a / accept:.3f}x), "
                f"completed {c:.0f}/s ({c / completed:.3f}x), p99 {p:.2f} s",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main())
