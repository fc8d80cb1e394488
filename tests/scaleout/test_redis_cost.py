"""What a discussion costs Redis in the scale-out topology (docs/scaling.md quotes these numbers).

20 discussions (3 personas, 2 rounds) run at once through Envoy on 2 session + 2 agent replicas,
each streamed to its end by a client and read once; Redis' own counters (INFO commandstats, cpu,
memory) taken before and after give the commands, the Redis CPU time and the memory per discussion.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as redis

from services.cli.replicas import Fleet
from services.gen.roundtable.session.v1 import session_pb2
from tests.scaleout.conftest import fleet_options, require_tools
from tests.scaleout.test_scaleout import Client, client, simulator

logger = logging.getLogger(__name__)
DISCUSSIONS = 20


@dataclass(frozen=True)
class Shape:
    """How long the answers are, how fast they stream, how often the agents flush a text delta."""

    name: str
    max_tokens: int
    tokens_per_second: float
    delta_flush_interval_ms: int
    delta_flush_chars: int


SHAPES = [
    # `roundtable up` on the simulator: short answers, fast.
    Shape("short answers", 60, 200, 100, 200),
    # A hosted model's pace: 256-token answers at 40 tokens/s, the agents' default delta flushing.
    Shape("model pace", 256, 40, 100, 200),
    # The same with coarser deltas: a flush every 500 ms.
    Shape("model pace, 500 ms deltas", 256, 40, 500, 1000),
]


async def run_one(api: Client, topic: str) -> int:
    """Create a discussion, stream it to its end and read it once; how many events it had."""
    session_id = secrets.token_hex(16)
    metadata = (("x-session-id", session_id),)
    request = session_pb2.CreateDiscussionRequest(
        topic=topic, personas=["scientist", "economist", "engineer"], rounds=2
    )
    await api.stub.CreateDiscussion(request, metadata=metadata, timeout=10)
    stream = api.stub.StreamDiscussion(
        session_pb2.StreamDiscussionRequest(discussion_id=session_id), metadata=metadata, timeout=120
    )
    events = [event async for event in stream]
    doc = await api.stub.GetDiscussion(
        session_pb2.GetDiscussionRequest(discussion_id=session_id), metadata=metadata, timeout=10
    )
    assert doc.status == session_pb2.DISCUSSION_STATUS_COMPLETED, doc.error
    return len(events)


def cpu_seconds(info: dict[str, Any]) -> float:
    """Redis' CPU time (user + system) from INFO cpu."""
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.name)
async def test_redis_commands_cpu_and_memory_per_discussion(tmp_path: pathlib.Path, shape: Shape) -> None:
    """Measured, logged, and bounded loosely so that a change doubling Redis traffic is noticed."""
    require_tools()
    options = fleet_options(
        tmp_path,
        max_tokens=shape.max_tokens,
        redis_appendfsync="everysec",
        # Production's lease ttl (30 s), so heartbeats cost what they cost in production.
        session_args=(
            "--shutdown-grace-seconds", "1",
            "--max-concurrent-sessions", "500",
            "--max-concurrent-sessions-per-principal", "500",
            "--session-log-dir", "",
        ),
        agents_args=(
            "--shutdown-grace-seconds", "1",
            "--delta-flush-interval-ms", str(shape.delta_flush_interval_ms),
            "--delta-flush-chars", str(shape.delta_flush_chars),
        ),
    )  # fmt: skip
    async with Fleet.start(options) as fleet, client(fleet.session_address) as api:
        stats = redis.Redis.from_url(fleet.redis_url)
        try:
            await simulator(fleet, "/_sim/config", {"first_token_latency_ms": 0, "tokens_per_second": 1000})
            await run_one(api, "warm-up: connections, script loads")
            pace = {"first_token_latency_ms": 300, "tokens_per_second": shape.tokens_per_second}
            await simulator(fleet, "/_sim/config", pace)
            await stats.config_resetstat()
            cpu_before = cpu_seconds(await stats.info("cpu"))
            memory_before = int((await stats.info("memory"))["used_memory"])
            started = time.monotonic()
            events = await asyncio.gather(*(run_one(api, f"cost {index}") for index in range(DISCUSSIONS)))
            seconds = time.monotonic() - started
            commands = await stats.info("commandstats")
            cpu = cpu_seconds(await stats.info("cpu")) - cpu_before
            memory = int((await stats.info("memory"))["used_memory"]) - memory_before
        finally:
            await stats.aclose()
    per_discussion = {name.removeprefix("cmdstat_"): counts["calls"] / DISCUSSIONS for name, counts in commands.items()}
    executed = sum(per_discussion.values())  # client commands and the commands Lua scripts ran
    mean_events = sum(events) / DISCUSSIONS
    logger.warning(
        "%s: %d discussions in %.1f s, %.0f events each; per discussion %.0f Redis commands "
        "(%.0f EVALSHA, %.0f XRANGE; client and in-Lua together), %.1f ms of Redis CPU, %.0f KiB of memory; "
        "top commands %s",
        shape.name,
        DISCUSSIONS,
        seconds,
        mean_events,
        executed,
        per_discussion.get("evalsha", 0),
        per_discussion.get("xrange", 0),
        1000 * cpu / DISCUSSIONS,
        memory / DISCUSSIONS / 1024,
        {name: round(calls) for name, calls in sorted(per_discussion.items(), key=lambda item: -item[1])[:8]},
    )
    assert executed <= 8 * mean_events + 400, f"{executed:.0f} Redis commands for {mean_events:.0f} events"
