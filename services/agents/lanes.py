"""One lane: many sessions' discussion runs over one bidirectional RunLane stream.

The session service sends runs, cancels, releases and flow-control credit; each run is its own task
here, and their events go back batched (whatever is ready when the lane writes), each tagged with its
session and each session's in order. A run may send `window` events before it waits for credit, so a
session whose events are not being consumed holds back only its own run, never the lane, and what a
lane buffers is bounded by its runs' windows. When the lane ends, every run on it is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from services.agents.metrics import (
    AGENT_LANE_EVENTS_PER_MESSAGE,
    AGENT_LANE_RUNS,
    AGENT_LANE_RUNS_ENDED,
    AGENT_LANES_OPEN,
)
from services.gen.roundtable.agents.v1 import agents_pb2
from services.shared import tracing
from services.shared.errors import RoundtableError

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_EVENTS = 64
MAX_WINDOW_EVENTS = 4096
MAX_EVENTS_PER_MESSAGE = 256

# Runs one discussion's rounds for a request (validated inside), until the monotonic deadline if given.
RunEvents = Callable[[agents_pb2.RunDiscussionRequest, float | None], AsyncIterator[agents_pb2.AgentEvent]]
# Drops a session's agent set now.
ReleaseSet = Callable[[str], object]


class _Run:
    """One session's run on the lane: its task and the events it may still send before it needs credit."""

    __slots__ = ("credit", "has_credit", "session_id", "task")

    def __init__(self, session_id: str, window_events: int) -> None:
        self.session_id = session_id
        self.credit = window_events
        self.has_credit = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def spend(self) -> None:
        """Take one event's credit, waiting for more when the window is used up."""
        while self.credit <= 0:
            self.has_credit.clear()
            await self.has_credit.wait()
        self.credit -= 1

    def grant(self, events: int) -> None:
        """The session service consumed this many more events."""
        self.credit += events
        self.has_credit.set()


class Lane:
    """The runs of one RunLane stream."""

    def __init__(self, run_events: RunEvents, release: ReleaseSet) -> None:
        self._run_events = run_events
        self._release = release
        self._runs: dict[str, _Run] = {}
        # Events to send; None: the session service is done writing and no run is left.
        self._out: asyncio.Queue[agents_pb2.LaneEvent | None] = asyncio.Queue()
        self._requests_done = False

    async def serve(
        self, requests: AsyncIterator[agents_pb2.RunLaneRequest]
    ) -> AsyncIterator[agents_pb2.RunLaneResponse]:
        """The lane's responses, until the session service closes it (or the call ends)."""
        AGENT_LANES_OPEN.inc()
        reader = asyncio.create_task(self._read(requests), name="lane-reader")
        try:
            while True:
                first = await self._out.get()
                if first is None:
                    return
                batch = [first]
                ending = False
                while len(batch) < MAX_EVENTS_PER_MESSAGE and not self._out.empty():
                    item = self._out.get_nowait()
                    if item is None:
                        ending = True
                        break
                    batch.append(item)
                AGENT_LANE_EVENTS_PER_MESSAGE.observe(len(batch))
                yield agents_pb2.RunLaneResponse(events=batch)
                if ending:
                    return
        finally:
            AGENT_LANES_OPEN.dec()
            reader.cancel()
            tasks = [run.task for run in self._runs.values() if run.task is not None]
            self._runs.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[agents_pb2.RunLaneRequest]) -> None:
        async for request in requests:
            kind = request.WhichOneof("request")
            if kind == "run":
                self._start(request.run)
            elif kind == "cancel":
                self._cancel(request.cancel.session_id)
            elif kind == "credit":
                run = self._runs.get(request.credit.session_id)
                if run is not None and request.credit.events > 0:
                    run.grant(request.credit.events)
            elif kind == "release":
                self._release(request.release.session_id)
        # The session service is done writing: the lane ends once its runs have.
        self._requests_done = True
        if not self._runs:
            self._out.put_nowait(None)

    def _start(self, order: agents_pb2.LaneRun) -> None:
        session_id = order.request.session_id
        if session_id in self._runs:
            # The session service runs a discussion once at a time; a second run would mix their events.
            self._out.put_nowait(
                _ended(
                    session_id, grpc.StatusCode.FAILED_PRECONDITION, f"session {session_id} already runs on this lane"
                )
            )
            return
        window = order.window if 0 < order.window <= MAX_WINDOW_EVENTS else DEFAULT_WINDOW_EVENTS
        run = _Run(session_id, window)
        timeout_seconds = order.timeout.ToNanoseconds() / 1e9 if order.HasField("timeout") else None
        self._runs[session_id] = run
        AGENT_LANE_RUNS.inc()
        # The lane's own call carries no one discussion's trace: each run brings its session-side span along.
        parent = tracing.extract(order.trace_context)
        run.task = asyncio.create_task(
            self._drive(run, order.request, timeout_seconds, parent), name=f"lane-run-{session_id}"
        )

    def _cancel(self, session_id: str) -> None:
        # Forgotten at once: the session service closed its side, it expects nothing more for this run.
        run = self._runs.pop(session_id, None)
        if run is not None and run.task is not None:
            run.task.cancel()

    async def _drive(
        self,
        run: _Run,
        request: agents_pb2.RunDiscussionRequest,
        timeout_seconds: float | None,
        parent: Context | None,
    ) -> None:
        """Drive one run inside its span: a child of the session side's run when the order carried its context."""
        span = tracing.start_span(
            "agents.run", kind=SpanKind.SERVER, parent=parent, attributes={"roundtable.discussion_id": run.session_id}
        )
        try:
            with tracing.active(span):
                code = await self._drive_traced(run, request, timeout_seconds)
            if code is not grpc.StatusCode.OK:
                tracing.fail(span, code.name)
        except BaseException as error:
            tracing.fail(span, "cancelled" if isinstance(error, asyncio.CancelledError) else error)
            raise
        finally:
            if span is not None:
                span.end()

    async def _drive_traced(
        self, run: _Run, request: agents_pb2.RunDiscussionRequest, timeout_seconds: float | None
    ) -> grpc.StatusCode:
        """Run the discussion, stream its events, and end the run with its status code (returned)."""
        code, message = grpc.StatusCode.OK, ""
        # As a RunDiscussion call's deadline: the run's LLM calls end before it, the run itself at it.
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        try:
            async with asyncio.timeout(timeout_seconds):
                async for event in self._run_events(request, deadline):
                    await run.spend()
                    self._out.put_nowait(agents_pb2.LaneEvent(session_id=run.session_id, agent_event=event))
        except RoundtableError as error:
            code, message = error.code, str(error)
        except TimeoutError:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "the run's deadline passed"
        except asyncio.CancelledError:
            AGENT_LANE_RUNS.dec()
            AGENT_LANE_RUNS_ENDED.labels(grpc.StatusCode.CANCELLED.name).inc()
            raise  # cancelled by the session service or with the lane: nobody expects an end
        except Exception:
            logger.exception("lane run of %s failed", run.session_id)
            code, message = grpc.StatusCode.INTERNAL, "internal error; see the agent service's log"
        AGENT_LANE_RUNS.dec()
        AGENT_LANE_RUNS_ENDED.labels(code.name).inc()
        if self._runs.get(run.session_id) is run:
            del self._runs[run.session_id]
            self._out.put_nowait(_ended(run.session_id, code, message))
            if self._requests_done and not self._runs:
                self._out.put_nowait(None)
        return code


def _ended(session_id: str, code: grpc.StatusCode, message: str) -> agents_pb2.LaneEvent:
    return agents_pb2.LaneEvent(
        session_id=session_id, run_ended=agents_pb2.LaneRunEnded(code=code.value[0], message=message)
    )
