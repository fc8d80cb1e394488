"""The grpc.aio client for what h2load cannot express: bursts of create→done, streams, probes while holding."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.control import STATS_METHOD
from bench.payloads import PERSONAS, TOPIC, Payload
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc

TERMINAL = {
    session_pb2.DISCUSSION_STATUS_COMPLETED,
    session_pb2.DISCUSSION_STATUS_FAILED,
    session_pb2.DISCUSSION_STATUS_CANCELLED,
    session_pb2.DISCUSSION_STATUS_TIMED_OUT,
    session_pb2.DISCUSSION_STATUS_INTERRUPTED,
}
CHANNELS = 4
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


class Stubs:
    """A few channels to one server, used round robin (one HTTP/2 connection would serialise the burst)."""

    def __init__(self, address: str, channels: int = CHANNELS) -> None:
        self._channels = [
            grpc.aio.insecure_channel(address, options=[*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)])
            for _ in range(channels)
        ]
        self._stubs: list[session_pb2_grpc.SessionServiceAsyncStub] = [
            session_pb2_grpc.SessionServiceStub(c) for c in self._channels
        ]
        self._next = itertools.cycle(self._stubs)
        self.health = health_pb2_grpc.HealthStub(self._channels[0])
        self.stats: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channels[0].unary_unary(STATS_METHOD)

    def next(self) -> session_pb2_grpc.SessionServiceAsyncStub:
        """The next stub, round robin."""
        return next(self._next)

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels:
            await channel.close()


def create_request(index: int, run_tag: str, ttl_seconds: float = 0) -> session_pb2.CreateDiscussionRequest:
    """The burst's request: three personas (the moderator is added by the server), one round."""
    request = session_pb2.CreateDiscussionRequest(
        topic=f"{TOPIC} (#{index})", personas=list(PERSONAS), rounds=1, request_id=f"{run_tag}-{index}"
    )
    if ttl_seconds:
        request.ttl.FromNanoseconds(int(ttl_seconds * 1e9))
    return request


@dataclass
class BurstResult:
    """Every create of a burst: when it was sent and accepted, and how it ended."""

    sent_wall: dict[str, float] = field(default_factory=dict)
    accepted_wall: dict[str, float] = field(default_factory=dict)
    codes: Counter[str] = field(default_factory=Counter)
    first_sent: float = 0.0
    last_accepted: float = 0.0

    @property
    def accepted(self) -> int:
        """Creates answered OK."""
        return self.codes.get("OK", 0)

    @property
    def rejected(self) -> int:
        """Creates answered with any other code."""
        return sum(n for code, n in self.codes.items() if code != "OK")


async def burst(
    stubs: Stubs,
    count: int,
    run_tag: str,
    ttl_seconds: float = 0,
    *,
    in_flight: int | None = None,
    adjust: Callable[[session_pb2.CreateDiscussionRequest], None] | None = None,
) -> BurstResult:
    """Send `count` CreateDiscussion calls (all at once, or at most `in_flight` at a time), each request first
    passed to `adjust` if given; record each one's send and accept time (wall clock)."""
    result = BurstResult()
    requests = [create_request(i, run_tag, ttl_seconds) for i in range(count)]
    slots = asyncio.Semaphore(in_flight or max(count, 1))

    async def one(request: session_pb2.CreateDiscussionRequest) -> None:
        if adjust is not None:
            adjust(request)
        async with slots:
            sent = time.time()
            try:
                doc = await stubs.next().CreateDiscussion(request, timeout=600)
            except grpc.aio.AioRpcError as error:
                result.codes[error.code().name] += 1
                return
            now = time.time()
        result.codes["OK"] += 1
        result.sent_wall[doc.discussion_id] = sent
        result.accepted_wall[doc.discussion_id] = now
        result.last_accepted = max(result.last_accepted, now)

    result.first_sent = time.time()
    await asyncio.gather(*(one(r) for r in requests))
    return result


async def unfinished(stubs: Stubs) -> int:
    """Whether any discussion is still queued or running (0 or 1: one page of one)."""
    left = 0
    for status in (session_pb2.DISCUSSION_STATUS_RUNNING, session_pb2.DISCUSSION_STATUS_QUEUED):
        page = await stubs.next().ListDiscussions(
            session_pb2.ListDiscussionsRequest(page_size=1, status=status), timeout=60
        )
        left += len(page.discussions)
    return left


async def wait_all_done(stubs: Stubs, timeout_seconds: float, poll_seconds: float = 0.25) -> float:
    """Poll until nothing is queued or running; returns the wall time it was first seen so."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if not await unfinished(stubs):
            return time.time()
        await asyncio.sleep(poll_seconds)
    raise TimeoutError(f"discussions still running after {timeout_seconds:.0f} s")


async def fetch(stubs: Stubs, discussion_ids: Sequence[str], concurrency: int = 64) -> list[session_pb2.Discussion]:
    """Every document, a bounded number of calls at a time."""
    slots = asyncio.Semaphore(concurrency)

    async def one(discussion_id: str) -> session_pb2.Discussion:
        async with slots:
            return await stubs.next().GetDiscussion(
                session_pb2.GetDiscussionRequest(discussion_id=discussion_id), timeout=120
            )

    return list(await asyncio.gather(*(one(i) for i in discussion_ids)))


def done_wall(doc: session_pb2.Discussion) -> float:
    """When the discussion reached its terminal status: the last event's time, which stamps updated_at."""
    return doc.updated_at.ToNanoseconds() / 1e9


async def completed_payload(address: str, timeout_seconds: float = 60) -> Payload:
    """Run one discussion to the end through the public API; its document and every event."""
    stubs = Stubs(address, channels=1)
    try:
        doc = await stubs.next().CreateDiscussion(create_request(0, f"payload-{time.time_ns()}"), timeout=30)
        events: list[session_pb2.DiscussionEvent] = []
        stream = stubs.next().StreamDiscussion(
            session_pb2.StreamDiscussionRequest(discussion_id=doc.discussion_id), timeout=timeout_seconds
        )
        async for event in stream:
            events.append(event)
        final = await stubs.next().GetDiscussion(
            session_pb2.GetDiscussionRequest(discussion_id=doc.discussion_id), timeout=30
        )
        if final.status != session_pb2.DISCUSSION_STATUS_COMPLETED:
            raise RuntimeError(f"the payload discussion ended {session_pb2.DiscussionStatus.Name(final.status)}")
        return Payload(document=final, events=events)
    finally:
        await stubs.close()


async def probe(
    stubs: Stubs, stop: asyncio.Event, interval_seconds: float = 0.1, kind: str = "health"
) -> list[tuple[float, float]]:
    """A trivial RPC every interval until `stop`: (wall time, latency ms) of each.

    Nothing else is queued on the probe's own connection, so its latency above the
    idle figure is time the server's event loop spent on other work: an upper bound
    on loop lag, measured from outside (inf: the probe failed).
    """
    samples: list[tuple[float, float]] = []
    while not stop.is_set():
        sent = time.time()
        started = time.perf_counter()
        try:
            if kind == "health":
                await stubs.health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            else:
                await stubs.stats(b"", timeout=30)
            samples.append((sent, (time.perf_counter() - started) * 1000))
        except grpc.aio.AioRpcError:
            samples.append((sent, float("inf")))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_seconds)
    return samples
