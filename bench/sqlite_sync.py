"""What synchronous=FULL costs the SQLite store against NORMAL: wall time and CPU per discussion's writes.

    python -m bench.sqlite_sync [--discussions 2000] [--concurrency 200] [--dir var/bench-sqlite]

Each discussion writes what the runner writes for 3 agents × 2 rounds: its create, status events,
per agent and round a start, 4 deltas and an answer (saved), per round a completion (saved), the
summary and the final status (saved). `concurrency` discussions write at once, so group commit
shares commits between them as it does under load. Run it on the disk the store will use (a tmpfs
makes fsync free).
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import shutil
import time

from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2
from services.session.stores.sqlite import SqliteStore

AGENTS = ("scientist", "economist", "engineer")
ROUNDS = 2
DELTAS_PER_ANSWER = 4


async def one_discussion(store: SqliteStore, number: int) -> None:
    """The writes of one discussion, in the runner's order (each awaited, as the runner does)."""
    doc = session_pb2.Discussion(
        discussion_id=f"{number:032x}", topic="bench", status=session_pb2.DISCUSSION_STATUS_RUNNING
    )
    doc.created_at.GetCurrentTime()
    doc.expires_at.FromSeconds(int(time.time()) + 3600)
    await store.create("bench", doc)
    sequence = 0

    async def record(save: bool = False, **payload: object) -> None:
        nonlocal sequence
        sequence += 1
        event = session_pb2.DiscussionEvent(discussion_id=doc.discussion_id, sequence=sequence, **payload)  # type: ignore[arg-type]
        await store.append_events([event])
        if save:
            doc.last_sequence = sequence
            await store.save(doc)

    await record(status_changed=session_pb2.StatusChanged(status=session_pb2.DISCUSSION_STATUS_RUNNING))
    for round_number in range(1, ROUNDS + 1):
        for agent in AGENTS:
            await record(agent_started=discussion_pb2.AgentStarted(agent=agent, round=round_number))
            for _ in range(DELTAS_PER_ANSWER):
                await record(agent_delta=discussion_pb2.AgentDelta(agent=agent, round=round_number, text="x" * 40))
            await record(True, agent_completed=discussion_pb2.AgentCompleted(agent=agent, round=round_number))
        await record(True, round_completed=discussion_pb2.RoundCompleted(round=round_number))
    await record(True, summary_completed=discussion_pb2.SummaryCompleted(text="summary"))
    doc.status = session_pb2.DISCUSSION_STATUS_COMPLETED
    await store.save(doc)
    await record(status_changed=session_pb2.StatusChanged(status=doc.status))


async def measure(directory: pathlib.Path, synchronous: str, discussions: int, concurrency: int) -> dict[str, float]:
    """Run the workload on a fresh database in `directory` with the given synchronous mode."""
    shutil.rmtree(directory, ignore_errors=True)
    store = await SqliteStore.open(directory / "bench.db")
    await store._query(f"PRAGMA synchronous={synchronous}", ())
    gate = asyncio.Semaphore(concurrency)

    async def bounded(number: int) -> None:
        async with gate:
            await one_discussion(store, number)

    cpu_before, wall_before = time.process_time(), time.perf_counter()
    await asyncio.gather(*(bounded(n) for n in range(discussions)))
    await store.close()
    cpu, wall = time.process_time() - cpu_before, time.perf_counter() - wall_before
    writes = discussions * (3 + ROUNDS * (len(AGENTS) * (DELTAS_PER_ANSWER + 2) + 1) + 1)
    return {
        "discussions_per_second": discussions / wall,
        "writes_per_second": writes / wall,
        "cpu_ms_per_discussion": cpu * 1000 / discussions,
        "wall_seconds": wall,
    }


def main() -> None:
    """Measure NORMAL and FULL one after another, twice each (alternating), and print both."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--discussions", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("var/bench-sqlite"))
    args = parser.parse_args()
    for synchronous in ("NORMAL", "FULL", "NORMAL", "FULL"):
        result = asyncio.run(measure(args.dir, synchronous, args.discussions, args.concurrency))
        print(synchronous.ljust(6), "  ".join(f"{name} {value:.2f}" for name, value in result.items()), flush=True)
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
