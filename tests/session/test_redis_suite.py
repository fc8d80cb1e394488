"""The session service on Redis state, through real servers: a discussion end to end, an outage, and the cost."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
import redis.asyncio as redis

from services.gen.roundtable.session.v1 import session_pb2
from services.session.service import SessionService
from services.session.settings import SessionSettings
from services.shared.server import ServiceHost
from tests.redis_server import redis_server, redis_url, running_redis  # noqa: F401  (fixtures)
from tests.suite import Suite, run_to_end

logger = logging.getLogger(__name__)
MakeSuite = Callable[..., Awaitable[Suite]]
MARK = "roundtable-phase"


async def on_redis(suite: Suite, url: str, **overrides: Any) -> None:
    """Replace the suite's session service by one whose store, admission and rate limit live in Redis."""
    current = suite.session_host.settings
    assert isinstance(current, SessionSettings)
    settings = current.model_copy(update={"port": 0, "store": "redis", "redis_url": url, **overrides})
    await suite.session_host.stop(grace_seconds=0)
    host = ServiceHost(settings, SessionService(settings))
    await host.start()
    suite.session_host = host


class CommandLog:
    """Every command Redis executes (MONITOR), split into what clients sent and what scripts ran, by phase."""

    def __init__(self, url: str) -> None:
        # No socket timeout: a monitor connection is idle whenever nothing happens.
        self._client = redis.Redis.from_url(url, socket_timeout=None)
        self.phases: dict[str, Counter[str]] = {}
        self._phase = "before"
        self._seen = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        monitor = self._client.monitor()
        await monitor.__aenter__()
        self._task = asyncio.create_task(self._collect(monitor))

    async def _collect(self, monitor: Any) -> None:
        while True:
            info = await monitor.next_command()
            name = info["command"].split(" ", 1)[0].lower()
            if name == "echo" and MARK in info["command"]:
                self._phase = info["command"].split(MARK, 1)[1].strip()
                self._seen.set()
                continue
            origin = "script" if info["client_type"] == "lua" else "client"
            self.phases.setdefault(self._phase, Counter())[f"{origin} {name}"] += 1

    async def mark(self, phase: str) -> None:
        """Count what follows as `phase`, once everything before has been seen."""
        self._seen.clear()
        await self._client.echo(f"{MARK} {phase}")
        await asyncio.wait_for(self._seen.wait(), 5)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._client.aclose()


async def test_a_discussion_runs_end_to_end_on_redis_and_its_commands_are_counted(
    make_suite: MakeSuite,
    redis_url: str,  # noqa: F811
) -> None:
    suite = await make_suite(session={"enable_rate_limiting": True})
    await on_redis(suite, redis_url)
    stub = suite.session()
    request = session_pb2.CreateDiscussionRequest(
        topic="Should cities ban cars?", personas=["scientist", "economist", "engineer"], rounds=2, request_id="e2e"
    )
    # A first discussion warms up what happens once per process: connections, script loads.
    await run_to_end(stub, session_pb2.CreateDiscussionRequest(topic="Warm-up", personas=["engineer"]))
    log = CommandLog(redis_url)
    await log.start()
    try:
        await log.mark("create")
        created = await stub.CreateDiscussion(request, timeout=10)
        await log.mark("run and stream")
        events = [
            e
            async for e in stub.StreamDiscussion(
                session_pb2.StreamDiscussionRequest(discussion_id=created.discussion_id), timeout=60
            )
        ]
        await log.mark("get")
        final = await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=created.discussion_id))
        await log.mark("delete")
        await stub.DeleteDiscussion(session_pb2.DeleteDiscussionRequest(discussion_id=created.discussion_id))
        await log.mark("after")
    finally:
        await log.stop()

    assert final.status == session_pb2.DISCUSSION_STATUS_COMPLETED, final.error
    assert len(final.personas) == 4  # three debaters and the moderator
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    kinds = [e.WhichOneof("event") for e in events]
    deltas = kinds.count("agent_delta")
    structural = len(kinds) - deltas
    phases = {name: log.phases.get(name, Counter()) for name in ("create", "run and stream", "get", "delete")}
    sent = {name: sum(n for k, n in counts.items() if k.startswith("client")) for name, counts in phases.items()}
    in_scripts = {name: sum(n for k, n in counts.items() if k.startswith("script")) for name, counts in phases.items()}
    logger.warning(
        "Redis per discussion (%d events: %d deltas, %d structural): commands sent %s = %d; "
        "run inside scripts %s = %d; by command %s",
        len(events),
        deltas,
        structural,
        sent,
        sum(sent.values()),
        in_scripts,
        sum(in_scripts.values()),
        {name: dict(counts) for name, counts in phases.items()},
    )
    # An event costs one EVALSHA (append) and one or two XRANGEs (the live reader); a structural event
    # also a save (three EVALSHAs); create, admission, rate limit, get and delete are a handful each.
    assert sum(sent.values()) <= 3 * len(events) + 3 * structural + 30


async def test_a_redis_outage_answers_unavailable_and_the_service_recovers_by_itself(make_suite: MakeSuite) -> None:
    with running_redis(appendfsync="always") as server:
        suite = await make_suite()
        await on_redis(suite, server.url)
        stub = suite.session()
        done, _ = await run_to_end(
            stub, session_pb2.CreateDiscussionRequest(topic="Before the outage", personas=["engineer"])
        )

        server.stop()
        outage: list[Awaitable[object]] = [
            stub.CreateDiscussion(
                session_pb2.CreateDiscussionRequest(topic="During", personas=["engineer"]), timeout=5
            ),
            stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=done.discussion_id), timeout=5),
            stub.ListDiscussions(session_pb2.ListDiscussionsRequest(), timeout=5),
        ]
        for call in outage:
            started = asyncio.get_running_loop().time()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
            assert "Redis is unavailable" in (caught.value.details() or "")
            assert asyncio.get_running_loop().time() - started < 1.0

        server.start()
        again = await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=done.discussion_id))
        assert again.status == session_pb2.DISCUSSION_STATUS_COMPLETED
        assert again.summary == done.summary
        after, _ = await run_to_end(stub, session_pb2.CreateDiscussionRequest(topic="After", personas=["engineer"]))
        assert after.status == session_pb2.DISCUSSION_STATUS_COMPLETED
        await suite.stop()
