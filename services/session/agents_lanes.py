"""The agent service over a few long-lived lanes: many discussions per bidirectional RunLane stream.

A session replica holds `lane_count` lanes, each with its own `x-session-id` lane key, so a load
balancer hashing that header spreads the lanes over agent replicas and keeps each on one. A discussion
always uses the lane its id maps to. Runs, cancels, releases and flow-control credit go in as
messages; events come back batched and tagged with their discussion. Each run may have `window`
events in flight: its consumer grants more as it takes them, so one discussion whose events are not
consumed holds back only its own run. A broken lane fails every run on it as a lost agent replica
(AgentRunFailed.replica_lost), which the runner re-runs from the transcript; the next run re-opens
the lane, possibly on another replica. A lane older than `lane_max_age_seconds` is recycled: new
runs go to a fresh stream beside it, and the old one closes once its runs end, so an agent replica
that joined gets work within a bounded time.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from services.gen.roundtable.agents.v1 import agents_pb2, agents_pb2_grpc
from services.gen.roundtable.session.v1 import session_pb2
from services.session.agents_client import (
    REPLICA_LOST_CODES,
    AgentEvents,
    AgentRunFailed,
    GrpcAgentsClient,
    run_request,
)
from services.session.metrics import LANE_RUNS_ENDED
from services.shared import tracing

logger = logging.getLogger(__name__)

WINDOW_EVENTS = 64
# The session side's own guard beyond the run's deadline, in case the agent side never answers.
DEADLINE_GRACE_SECONDS = 5.0
_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class _LaneLost:
    """The lane under a run broke: what gRPC said."""

    code_name: str
    details: str


class _RunHandle:
    """One discussion's run on a lane stream: its events as they arrive."""

    __slots__ = ("consumed", "credit_batch", "events", "session_id")

    def __init__(self, session_id: str, window_events: int) -> None:
        self.session_id = session_id
        # Each response's events of this run, in order. Bounded by the window: the agent side sends
        # no more than window_events un-credited events.
        self.events: asyncio.Queue[list[agents_pb2.LaneEvent] | _LaneLost] = asyncio.Queue()
        self.consumed = 0
        # Credit goes back in batches of half a window (one message a batch, not one an event).
        self.credit_batch = max(window_events // 2, 1)


class _LaneStream:
    """One RunLane call: the runs it carries and the messages it has still to send."""

    def __init__(self, stub: agents_pb2_grpc.AgentServiceAsyncStub, lane_key: str) -> None:
        self.opened_monotonic = time.monotonic()
        self.broken = False
        self.draining = False
        self._runs: dict[str, _RunHandle] = {}
        self._send: asyncio.Queue[agents_pb2.RunLaneRequest | None] = asyncio.Queue()
        # Opened by some run, but carries many: neither the call nor its tasks belong to that run's trace, nor
        # to its session's log (the tasks start from an empty context: no session tag, no span).
        with tracing.detached():
            self._call = stub.RunLane(metadata=(("x-session-id", lane_key),))
        self._writer = asyncio.create_task(self._write(), name=f"lane-writer-{lane_key}", context=contextvars.Context())
        self._reader = asyncio.create_task(self._read(), name=f"lane-reader-{lane_key}", context=contextvars.Context())

    @property
    def run_count(self) -> int:
        """Runs open on this stream."""
        return len(self._runs)

    def open_run(self, order: agents_pb2.LaneRun) -> _RunHandle:
        """Start a run on this stream."""
        handle = _RunHandle(order.request.session_id, order.window)
        self._runs[handle.session_id] = handle
        self._send.put_nowait(agents_pb2.RunLaneRequest(run=order))
        return handle

    def took(self, handle: _RunHandle, events: int) -> None:
        """The consumer took this many of the run's events: grant credit for each half window taken."""
        before = handle.consumed // handle.credit_batch
        handle.consumed += events
        batches = handle.consumed // handle.credit_batch - before
        if batches and not self.broken:
            credit = agents_pb2.LaneCredit(session_id=handle.session_id, events=batches * handle.credit_batch)
            self._send.put_nowait(agents_pb2.RunLaneRequest(credit=credit))

    def close_run(self, handle: _RunHandle, *, cancel: bool) -> None:
        """Forget a run; cancel it on the agent side when it had not ended there."""
        if self._runs.get(handle.session_id) is handle:
            del self._runs[handle.session_id]
            if cancel and not self.broken:
                self._send.put_nowait(
                    agents_pb2.RunLaneRequest(cancel=agents_pb2.LaneCancel(session_id=handle.session_id))
                )
        if self.draining and not self._runs:
            self._send.put_nowait(None)

    def release(self, session_id: str) -> bool:
        """Send a release for the session's agent set; False if this stream can send nothing more."""
        if self.broken:
            return False
        request = agents_pb2.RunLaneRequest(release=agents_pb2.ReleaseSessionRequest(session_id=session_id))
        self._send.put_nowait(request)
        return True

    def drain(self) -> None:
        """Take no new runs; close once the open ones have ended."""
        self.draining = True
        if not self._runs:
            self._send.put_nowait(None)

    async def close(self) -> None:
        """End the call now (shutdown)."""
        self.broken = True
        self._call.cancel()
        for task in (self._writer, self._reader):
            task.cancel()
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)

    async def _write(self) -> None:
        try:
            while (request := await self._send.get()) is not None:
                await self._call.write(request)
            await self._call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as error:
            # The call broke: the reader hears why and fails the runs.
            logger.debug("lane writer stopped: %s", error)

    async def _read(self) -> None:
        lost: _LaneLost
        try:
            async for response in self._call:
                # One response holds several runs' events: each run gets its own, in order, as one batch.
                by_run: dict[str, list[agents_pb2.LaneEvent]] = {}
                for event in response.events:
                    by_run.setdefault(event.session_id, []).append(event)
                for session_id, events in by_run.items():
                    handle = self._runs.get(session_id)
                    if handle is not None:
                        handle.events.put_nowait(events)
            lost = _LaneLost("UNAVAILABLE", "the agent service closed the lane")
        except grpc.aio.AioRpcError as error:
            lost = _LaneLost(error.code().name, error.details() or "")
        self.broken = True
        if self._runs:
            logger.warning(
                "lane to the agent service lost (%s: %s): %d runs to re-run",
                lost.code_name,
                lost.details,
                len(self._runs),
            )
        for handle in self._runs.values():
            handle.events.put_nowait(lost)
        self._runs.clear()
        self._writer.cancel()


class _Lane:
    """One lane key and the stream that currently carries it (plus older ones draining)."""

    def __init__(self, stub: agents_pb2_grpc.AgentServiceAsyncStub, key: str, max_age_seconds: float) -> None:
        self._stub = stub
        self.key = key
        self._max_age_seconds = max_age_seconds
        self._current: _LaneStream | None = None
        self._draining: set[_LaneStream] = set()

    def stream(self) -> _LaneStream:
        """The stream new runs go on: the current one, or a fresh one if it broke or grew too old."""
        current = self._current
        if current is not None and not current.broken:
            if time.monotonic() - current.opened_monotonic < self._max_age_seconds:
                return current
            current.drain()
            self._draining.add(current)
        self._draining = {s for s in self._draining if not s.broken and s.run_count}
        self._current = _LaneStream(self._stub, self.key)
        return self._current

    def live_stream(self) -> _LaneStream | None:
        """The current stream if it can still send."""
        current = self._current
        return current if current is not None and not current.broken else None

    async def close(self) -> None:
        """End every stream of the lane."""
        streams = [s for s in (self._current, *self._draining) if s is not None]
        self._current = None
        self._draining.clear()
        await asyncio.gather(*(s.close() for s in streams))


class LaneAgentsClient(GrpcAgentsClient):
    """The agents port over lanes; personas and health as unary calls on the same channel."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        call_timeout_seconds: float,
        max_concurrent_runs: int,
        lane_count: int,
        lane_key_prefix: str,
        lane_max_age_seconds: float,
        window_events: int = WINDOW_EVENTS,
    ) -> None:
        super().__init__(channel, call_timeout_seconds=call_timeout_seconds, max_concurrent_runs=max_concurrent_runs)
        self._window_events = window_events
        self._lanes = [
            _Lane(self._stub, f"{lane_key_prefix}-lane-{index}", lane_max_age_seconds) for index in range(lane_count)
        ]

    def lane_key(self, discussion_id: str) -> str:
        """The key of the lane the discussion's runs use (what the load balancer hashes)."""
        return self._lane(discussion_id).key

    async def run(self, doc: session_pb2.Discussion, principal: str) -> AsyncIterator[AgentEvents]:
        """Run the rest of the discussion on its lane; its events in the batches they arrived in."""
        order = agents_pb2.LaneRun(request=run_request(doc, principal), window=self._window_events)
        order.timeout.FromNanoseconds(int(self._call_timeout_seconds * 1e9))
        # The lane's metadata is the lane's: the run's trace context goes in the run's own message.
        tracing.inject(order.trace_context)
        await self._runs.acquire()
        try:
            stream = self._lane(doc.discussion_id).stream()
            handle = stream.open_run(order)
            ended = False
            try:
                async with asyncio.timeout(self._call_timeout_seconds + DEADLINE_GRACE_SECONDS):
                    while True:
                        item = await handle.events.get()
                        if isinstance(item, _LaneLost):
                            ended = True
                            LANE_RUNS_ENDED.labels(item.code_name).inc()
                            raise AgentRunFailed(item.code_name, f"lane lost: {item.details}", replica_lost=True)
                        batch: AgentEvents = []
                        for event in item:
                            if event.HasField("run_ended"):
                                ended = True
                                if batch:
                                    yield batch
                                _raise_unless_ok(event.run_ended)
                                return
                            kind = event.agent_event.WhichOneof("event")
                            if kind is not None:
                                batch.append((kind, getattr(event.agent_event, kind)))
                        yield batch
                        stream.took(handle, len(item))
            except TimeoutError as late:
                raise AgentRunFailed(
                    "DEADLINE_EXCEEDED", "the agent service did not end the run in time", replica_lost=False
                ) from late
            finally:
                if not ended:
                    LANE_RUNS_ENDED.labels(grpc.StatusCode.CANCELLED.name).inc()
                stream.close_run(handle, cancel=not ended)
        finally:
            self._runs.release()

    async def release(self, discussion_id: str) -> None:
        """Drop the agent set where its lane runs: in-band on the lane, else a call routed by the lane key."""
        lane = self._lane(discussion_id)
        stream = lane.live_stream()
        if stream is None or not stream.release(discussion_id):
            await self._release_call(discussion_id, routing_key=lane.key)

    async def close(self) -> None:
        """Close the lanes, then the channel."""
        await asyncio.gather(*(lane.close() for lane in self._lanes))
        await super().close()

    def _lane(self, discussion_id: str) -> _Lane:
        return self._lanes[zlib.crc32(discussion_id.encode()) % len(self._lanes)]


def _raise_unless_ok(ended: agents_pb2.LaneRunEnded) -> None:
    code = _CODES.get(ended.code, grpc.StatusCode.UNKNOWN)
    LANE_RUNS_ENDED.labels(code.name).inc()
    if code is grpc.StatusCode.OK:
        return
    raise AgentRunFailed(code.name, ended.message, replica_lost=code in REPLICA_LOST_CODES)
