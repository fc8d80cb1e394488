"""Discussions per second per Redis shard: the session service on one redis-server, and on Redis Cluster.

    .venv/bin/python -m bench.redis_shards [--discussions 300] [--in-flight 20] [--principals 16]

Each layout runs the same fleet (2 session + 2 agent replicas behind Envoy, `roundtable up`'s simulator
with short answers: 60 tokens at 200 tokens/s) and the same workload as tests/scaleout/test_redis_cost.py:
every discussion (3 personas and the moderator, 2 rounds) created under its own x-session-id, streamed to
its end by one client through Envoy, then read once, `--in-flight` at a time. The callers take turns
(`--principals` API keys): a caller's listing and idempotency keys share one slot, so a lone caller would
pile that traffic on one shard. Around the measured discussions, each Redis node's own counters (INFO cpu
and stats) give the CPU and the commands it spent per discussion, less what it spent per second in a
quiet spell just before (its cron, a cluster's gossip, the replicas' heartbeats). A shard is one core,
planned at 50 % busy (docs/scaling.md), so one shard carries (0.5 - its idle share) / (its CPU per
discussion), and a cluster carries what its busiest shard allows.

Layouts: the fleet's private redis-server (what `roundtable up` runs), a one-master cluster (the cost of
cluster mode alone) and a three-master cluster; every one keeps an AOF, fsynced every second.
The completed/s column is what this machine's fleet reached; on 2 shared cores it is bounded by the
Python services, not by Redis, which is why the Redis columns are the ones that size a shard.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import pathlib
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass

import grpc
import redis

from services.cli.replicas import Fleet, FleetOptions
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from services.session.keys import add_key
from tests.redis_cluster import LocalRedisCluster

RESULTS = pathlib.Path(__file__).parent / "results" / "redis_shards.json"
PERSONAS = ["scientist", "economist", "engineer"]
ROUNDS = 2
# A shard is planned at this share of its one core (docs/scaling.md, "Capacity per Redis shard").
PLANNED_BUSY = 0.5
WARM_UP_DISCUSSIONS = 4
# A quiet spell before the measured discussions: what each node spends per second on its own (its cron,
# a cluster's gossip, the replicas' heartbeats), taken out of the per-discussion figures.
IDLE_SECONDS = 5.0
LAYOUTS = {"redis-server": 0, "cluster, 1 master": 1, "cluster, 3 masters": 3}


@dataclass(frozen=True)
class NodeCounters:
    """One Redis node's CPU time (user + system) and commands processed so far."""

    cpu_seconds: float
    commands: int


@dataclass
class LayoutResult:
    """One layout's run: throughput, and each shard's CPU and commands per discussion."""

    layout: str
    shards: int
    discussions: int
    seconds: float
    completed_per_second: float
    # Each shard's CPU with nothing running (ms per second), and per discussion with that taken out.
    idle_cpu_ms_per_second: list[float]
    cpu_ms_per_discussion: list[float]
    commands_per_discussion: list[float]
    # What the busiest shard allows at PLANNED_BUSY less its idle share: the layout's ceiling, and per shard.
    ceiling_per_second: float
    ceiling_per_shard_per_second: float


def counters(port: int) -> NodeCounters:
    """The node's counters now (a direct connection: INFO is per node, also in a cluster)."""
    node = redis.Redis(port=port, socket_timeout=5)
    try:
        cpu = node.info("cpu")
        stats = node.info("stats")
    finally:
        node.close()
    cpu_seconds = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return NodeCounters(cpu_seconds, int(stats["total_commands_processed"]))


def api_keys(workdir: pathlib.Path, principals: int) -> tuple[pathlib.Path, list[str]]:
    """A keys file with one key for each of `principals` callers, and the keys."""
    keys_file = workdir / "api_keys.toml"
    return keys_file, [add_key(keys_file, f"caller-{number}") for number in range(principals)]


def fleet_options(workdir: pathlib.Path, redis_url: str, keys_file: pathlib.Path) -> FleetOptions:
    """2 session + 2 agent replicas on free ports, short answers; an empty redis_url: the fleet's own Redis."""
    return FleetOptions(
        session_replicas=2,
        agent_replicas=2,
        store="redis",
        redis_url=redis_url,
        max_tokens=60,
        session_port=0,
        agents_port=0,
        envoy_admin_port=0,
        monitor_port=0,
        monitor_metrics_port=-1,
        simulator_port=0,
        state_dir=workdir / "state",
        log_dir=workdir / "log",
        cwd=workdir,
        session_args=(
            "--shutdown-grace-seconds", "1",
            "--max-concurrent-sessions", "1000",
            "--max-concurrent-sessions-per-principal", "1000",
            "--max-retained-discussions-per-principal", "100000",
            "--session-log-dir", "",
            "--api-keys-file", str(keys_file),
            "--allow-anonymous", "false",
        ),
        agents_args=("--shutdown-grace-seconds", "1"),
        simulator_args=("--first-token-latency-ms", "300", "--tokens-per-second", "200"),
    )  # fmt: skip


async def run_one(stub: session_pb2_grpc.SessionServiceAsyncStub, topic: str, api_key: str) -> None:
    """Create a discussion under a fresh x-session-id, stream it to its end, read it once; it must complete."""
    session_id = secrets.token_hex(16)
    metadata = (("x-session-id", session_id), ("authorization", f"Bearer {api_key}"))
    request = session_pb2.CreateDiscussionRequest(topic=topic, personas=PERSONAS, rounds=ROUNDS)
    await stub.CreateDiscussion(request, metadata=metadata, timeout=60)
    stream = stub.StreamDiscussion(
        session_pb2.StreamDiscussionRequest(discussion_id=session_id), metadata=metadata, timeout=300
    )
    async for _ in stream:
        pass
    doc = await stub.GetDiscussion(
        session_pb2.GetDiscussionRequest(discussion_id=session_id), metadata=metadata, timeout=60
    )
    if doc.status != session_pb2.DISCUSSION_STATUS_COMPLETED:
        raise RuntimeError(f"discussion {session_id} ended {doc.status}: {doc.error}")


@contextlib.contextmanager
def redis_layout(masters: int, directory: pathlib.Path) -> Iterator[tuple[str, list[int]]]:
    """(URL, node ports) of a cluster of `masters` with AOF on; 0 masters: ("", []) for the fleet's own server."""
    if not masters:
        yield "", []
        return
    cluster = LocalRedisCluster(directory, masters, appendonly=True)
    cluster.start()
    try:
        yield cluster.url, cluster.ports
    finally:
        cluster.stop()


@contextlib.asynccontextmanager
async def session_stub(address: str) -> AsyncIterator[session_pb2_grpc.SessionServiceAsyncStub]:
    """A session stub on its own channel (through Envoy)."""
    async with grpc.aio.insecure_channel(address) as channel:
        yield session_pb2_grpc.SessionServiceStub(channel)


async def measure(layout: str, masters: int, discussions: int, in_flight: int, principals: int) -> LayoutResult:
    """Run the workload on one layout and read every shard's counters around the measured discussions."""
    with tempfile.TemporaryDirectory(prefix="roundtable-shards-") as scratch:
        workdir = pathlib.Path(scratch)
        keys_file, keys = api_keys(workdir, principals)
        with redis_layout(masters, workdir / "cluster") as (url, ports):
            options = fleet_options(workdir, url, keys_file)
            async with Fleet.start(options) as fleet, session_stub(fleet.session_address) as stub:
                if not ports:
                    assert fleet.redis is not None
                    ports = [fleet.redis.port]
                await asyncio.gather(
                    *(run_one(stub, f"warm-up {n}", keys[n % principals]) for n in range(WARM_UP_DISCUSSIONS))
                )
                quiet = [counters(port) for port in ports]
                await asyncio.sleep(IDLE_SECONDS)
                before = [counters(port) for port in ports]
                slots = asyncio.Semaphore(in_flight)

                async def bounded(number: int) -> None:
                    async with slots:
                        await run_one(stub, f"shards {number}", keys[number % principals])

                started = time.monotonic()
                await asyncio.gather(*(bounded(n) for n in range(discussions)))
                seconds = time.monotonic() - started
                after = [counters(port) for port in ports]
    idle_ms = [1000 * (b.cpu_seconds - q.cpu_seconds) / IDLE_SECONDS for b, q in zip(before, quiet, strict=True)]
    cpu_ms = [
        (1000 * (a.cpu_seconds - b.cpu_seconds) - idle * seconds) / discussions
        for a, b, idle in zip(after, before, idle_ms, strict=True)
    ]
    commands = [(a.commands - b.commands) / discussions for a, b in zip(after, before, strict=True)]
    # Per shard: the planned share of its core less what it spends idle, over what a discussion costs it.
    ceiling = min((PLANNED_BUSY * 1000 - idle) / ms for idle, ms in zip(idle_ms, cpu_ms, strict=True))
    return LayoutResult(
        layout=layout,
        shards=len(ports),
        discussions=discussions,
        seconds=seconds,
        completed_per_second=discussions / seconds,
        idle_cpu_ms_per_second=idle_ms,
        cpu_ms_per_discussion=cpu_ms,
        commands_per_discussion=commands,
        ceiling_per_second=ceiling,
        ceiling_per_shard_per_second=ceiling / len(ports),
    )


def table(results: list[LayoutResult]) -> str:
    """The results as the markdown table docs/scaling.md quotes."""
    lines = [
        "| layout | shards | completed/s here | Redis CPU per discussion, each shard | idle CPU, each shard | "
        "commands per discussion, each shard | discussions/s at 50 % of the busiest shard | per shard |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        cpu = " / ".join(f"{ms:.1f} ms" for ms in result.cpu_ms_per_discussion)
        idle = " / ".join(f"{ms:.1f} ms/s" for ms in result.idle_cpu_ms_per_second)
        commands = " / ".join(f"{n:.0f}" for n in result.commands_per_discussion)
        lines.append(
            f"| {result.layout} | {result.shards} | {result.completed_per_second:.1f} | {cpu} | {idle} | "
            f"{commands} | {result.ceiling_per_second:.0f} | {result.ceiling_per_shard_per_second:.0f} |"
        )
    return "\n".join(lines)


async def main_async(discussions: int, in_flight: int, principals: int, layouts: list[str]) -> list[LayoutResult]:
    """Every layout asked for, one after the other."""
    return [await measure(name, LAYOUTS[name], discussions, in_flight, principals) for name in layouts]


def main() -> None:
    """Command line: run the layouts, print the table, keep the figures in bench/results/redis_shards.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--discussions", type=int, default=300, help="measured discussions per layout")
    parser.add_argument("--in-flight", type=int, default=20, help="discussions streaming at once")
    parser.add_argument(
        "--principals", type=int, default=16, help="callers (API keys) the discussions are spread over, round robin"
    )
    parser.add_argument("--layout", action="append", choices=list(LAYOUTS), help="default: every layout")
    args = parser.parse_args()
    results = asyncio.run(main_async(args.discussions, args.in_flight, args.principals, args.layout or list(LAYOUTS)))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps([asdict(result) for result in results], indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
