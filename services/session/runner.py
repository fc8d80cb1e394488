"""Runs one admitted discussion as an asyncio task: drives the agent service and records its events.

Every agent event becomes a sequence-numbered DiscussionEvent, written to the
store before readers are woken, and folded into the in-memory document, which
is saved when the discussion's shape changes (status, an agent's answer, a
round, the summary); readers fold in the rest from the event log. If the agent
replica is lost mid-run, the interrupted round is re-run (on another replica)
from the transcript. Which discussions run, and what happens around a run
(admission, the queue, leases), is services/session/discussions.py's.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import TypeAlias

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from opentelemetry.context import Context

from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2
from services.session.agents_client import AgentEvents, AgentRunFailed, AgentsClient
from services.session.document import apply_event, cancel_running_results, failure_reasons, is_terminal, now_timestamp
from services.session.metrics import DISCUSSIONS_FINISHED
from services.session.notifier import EventNotifier
from services.session.stores.interface import Store
from services.shared import tracing
from services.shared.logs import session_context

logger = logging.getLogger(__name__)


Status: TypeAlias = session_pb2.DiscussionStatus.ValueType

AGENT_ATTEMPTS = 4

# Events after which the stored document is rewritten; the others (started, deltas) live in the
# event log only, and whoever reads a stored document of a running discussion folds them in.
DOCUMENT_EVENTS = frozenset(
    {"status_changed", "agent_completed", "agent_failed", "round_completed", "summary_completed"}
)

# A run ending in one of these is an error in its trace (a cancel or a suspend is not).
FAILED_STATUSES = frozenset({session_pb2.DISCUSSION_STATUS_FAILED, session_pb2.DISCUSSION_STATUS_TIMED_OUT})

# A stop with this status leaves the discussion RUNNING in the store, to be resumed after a restart.
SUSPEND: Status = session_pb2.DISCUSSION_STATUS_RUNNING


@dataclass
class LiveDiscussion:
    """A discussion this replica is running or holding in the queue: its document and owner."""

    doc: session_pb2.Discussion
    owner: str
    started_monotonic: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    stop_status: Status = session_pb2.DISCUSSION_STATUS_UNSPECIFIED
    stop_reason: str = ""
    # Its lease went to another replica: stop without writing anything more.
    abandoned: bool = False
    # It waited in the queue: its record may have been removed meanwhile (expired, or deleted elsewhere).
    waited: bool = False
    # Its run got past driving the agents (ended, stopped or failed) and settled its record: its slot is free to go.
    settled: bool = False
    # Where it was made (CreateDiscussion's span, when traced): its run's span is a child of that, even when the
    # run starts later, promoted from the queue by another call.
    trace_context: Context = field(default_factory=tracing.current_context)


class DiscussionRunner:
    """Drives discussions through the agent service and records what happens, one event at a time."""

    def __init__(
        self,
        *,
        store: Store,
        agents: AgentsClient,
        notifier: EventNotifier,
        max_events_per_discussion: int,
        terminal_event_delay_seconds: float = 0.0,
    ) -> None:
        self._store = store
        self._agents = agents
        self._notifier = notifier
        self._max_events = max_events_per_discussion
        self._terminal_event_delay_seconds = terminal_event_delay_seconds

    async def run(self, live: LiveDiscussion) -> None:
        """Drive the discussion to its end (or its stop) and record the outcome; sets live.settled once done.

        Raises CancelledError only when cancelled without a stop (the event loop is closing).
        """
        doc = live.doc
        span = tracing.start_span(
            "discussion.run", parent=live.trace_context, attributes={"roundtable.discussion_id": doc.discussion_id}
        )
        try:
            with tracing.active(span):
                await self._run(live)
        finally:
            if span is not None:
                status = session_pb2.DiscussionStatus.Name(doc.status)
                span.set_attribute("roundtable.status", status)
                if doc.status in FAILED_STATUSES:
                    tracing.fail(span, status)
                span.end()

    async def _run(self, live: LiveDiscussion) -> None:
        doc = live.doc
        with session_context(doc.discussion_id):
            resumed = doc.completed_rounds > 0 or doc.last_sequence > 1
            if resumed:
                logger.info("resuming after round %d", doc.completed_rounds)
            else:
                logger.info("创建新讨论会话，话题: %s", doc.topic[:200])
            final: session_pb2.StatusChanged | None
            try:
                await self.record(live, status_changed=session_pb2.StatusChanged(status=doc.status))
                await self._drive_until_deadline(live)
                if doc.completed_agents:
                    final = session_pb2.StatusChanged(status=session_pb2.DISCUSSION_STATUS_COMPLETED)
                else:
                    final = session_pb2.StatusChanged(
                        status=session_pb2.DISCUSSION_STATUS_FAILED,
                        error=f"every agent failed: {failure_reasons(doc)}",
                    )
            except asyncio.CancelledError:
                if live.stop_status == session_pb2.DISCUSSION_STATUS_UNSPECIFIED:
                    raise  # not ours: the event loop is closing
                if live.stop_status == SUSPEND or live.abandoned:
                    final = None
                else:
                    cancel_running_results(doc)
                    final = session_pb2.StatusChanged(status=live.stop_status, error=live.stop_reason)
            except AgentRunFailed as error:
                logger.warning("agent service call failed: %s %s", error.code_name, error.details)
                final = session_pb2.StatusChanged(
                    status=session_pb2.DISCUSSION_STATUS_FAILED,
                    error=f"agent service failed: {error.code_name}: {error.details}",
                )
            except Exception as error:  # keep the slot and the record consistent whatever broke
                logger.exception("discussion runner crashed")
                final = session_pb2.StatusChanged(
                    status=session_pb2.DISCUSSION_STATUS_FAILED, error=f"internal error: {type(error).__name__}"
                )
            live.settled = True
            if final is not None:
                await self.finish(live, final)
            elif live.abandoned:
                logger.warning("stopped: its lease is gone (another replica took it over, or deleted it)")
            else:
                await asyncio.shield(self._store.save(doc))
                logger.info("suspended after round %d, to resume on restart", doc.completed_rounds)

    async def stop(self, live: LiveDiscussion, status: Status, reason: str) -> None:
        """End a running discussion with this status (SUSPEND: leave it to be resumed); returns once its task has."""
        if live.task is None:
            return
        if live.stop_status == session_pb2.DISCUSSION_STATUS_UNSPECIFIED:
            live.stop_status, live.stop_reason = status, reason
            live.task.cancel()
        await asyncio.wait({live.task})

    def abandon(self, live: LiveDiscussion) -> None:
        """Stop a running discussion without writing anything more (its lease is another replica's now)."""
        if live.task is None:
            return
        live.abandoned = True
        live.stop_status = SUSPEND
        live.task.cancel()

    async def finish(self, live: LiveDiscussion, final: session_pb2.StatusChanged) -> None:
        """Record the discussion's terminal status."""
        await self.record(live, status_changed=final)
        DISCUSSIONS_FINISHED.labels(session_pb2.DiscussionStatus.Name(final.status)).inc()
        logger.info("discussion ended: %s", session_pb2.DiscussionStatus.Name(final.status))

    async def _drive_until_deadline(self, live: LiveDiscussion) -> None:
        """Drive the discussion; once its deadline passes it stops TIMED_OUT, its agent call cancelled."""
        deadline = deadline_of(live.doc)
        if deadline is None:
            await self._drive(live)
            return
        remaining_seconds = deadline - time.time()
        if remaining_seconds <= 0:
            # Promoted or resumed after its deadline: end it as a stop would, without calling the agents.
            live.stop_status, live.stop_reason = session_pb2.DISCUSSION_STATUS_TIMED_OUT, timed_out_reason(live.doc)
            raise asyncio.CancelledError
        timer = asyncio.get_running_loop().call_later(remaining_seconds, self._time_out, live)
        try:
            await self._drive(live)
        finally:
            timer.cancel()

    def _time_out(self, live: LiveDiscussion) -> None:
        """Stop a running discussion whose deadline passed, as stop() does: its task ends it TIMED_OUT."""
        if live.task is None or live.task.done() or live.stop_status != session_pb2.DISCUSSION_STATUS_UNSPECIFIED:
            return
        live.stop_status, live.stop_reason = session_pb2.DISCUSSION_STATUS_TIMED_OUT, timed_out_reason(live.doc)
        logger.warning("discussion %s: %s", live.doc.discussion_id, live.stop_reason)
        live.task.cancel()

    async def _drive(self, live: LiveDiscussion) -> None:
        """Run the rest of the discussion; if the agent replica is lost, re-run its round on another."""
        for attempt in range(1, AGENT_ATTEMPTS + 1):
            try:
                await self._drive_once(live)
                return
            except AgentRunFailed as error:
                if not error.replica_lost or attempt == AGENT_ATTEMPTS:
                    raise
                logger.warning(
                    "agent service lost mid-discussion (%s: %s); re-running from round %d, attempt %d",
                    error.code_name,
                    error.details,
                    live.doc.completed_rounds + 1,
                    attempt + 1,
                )
                await asyncio.sleep(min(0.2 * 2**attempt, 2.0))

    async def _drive_once(self, live: LiveDiscussion) -> None:
        doc = live.doc
        if doc.summary:
            return  # everything was done before the interruption but the final status
        # Deltas stop being recorded near the cap; the structural events always fit within it.
        delta_cutoff = self._max_events - 3 * len(doc.personas) * (doc.rounds + 1) - 10
        async for batch in self._agents.run(doc, live.owner):
            await self._record_batch(live, merged_deltas(batch), delta_cutoff)

    async def _record_batch(self, live: LiveDiscussion, batch: AgentEvents, delta_cutoff: int) -> None:
        """Sequence events that arrived together (deltas only below delta_cutoff), store them in one write, fold
        them in, then wake readers once. A batch holds no terminal status (record() writes that one)."""
        doc = live.doc
        stamp = now_timestamp()
        events = [
            _sequenced(doc, kind, payload, stamp)
            for kind, payload in batch
            if not (kind == "agent_delta" and doc.last_sequence >= delta_cutoff)
        ]
        if not events:
            return
        # Shielded: a cancel arriving mid-write must not leave a gap in the sequence. The log is written
        # before the document, so a document never claims an event the log lacks.
        await asyncio.shield(self._store.append_events(events))
        if any(event.WhichOneof("event") in DOCUMENT_EVENTS for event in events):
            await asyncio.shield(self._store.save(doc))
        self._notifier.publish(doc.discussion_id, doc.last_sequence)

    async def record(self, live: LiveDiscussion, **payload: Message) -> None:
        """Sequence one event, store it, fold it into the document, then wake readers."""
        ((kind, value),) = payload.items()
        if not (isinstance(value, session_pb2.StatusChanged) and is_terminal(value.status)):
            await self._record_batch(live, [(kind, value)], delta_cutoff=sys.maxsize)
            return
        # The terminal status is saved before its event is appended, so whoever sees the end in the event
        # log (a reader on another replica) reads a finished document too. Shielded, as above.
        doc = live.doc
        event = _sequenced(doc, kind, value, now_timestamp())
        await asyncio.shield(self._store.save(doc))
        if self._terminal_event_delay_seconds:  # fault injection (tests): the log lags the document
            await asyncio.shield(asyncio.sleep(self._terminal_event_delay_seconds))
        await asyncio.shield(self._store.append_events([event]))
        self._notifier.publish(doc.discussion_id, event.sequence)


def _sequenced(
    doc: session_pb2.Discussion, kind: str, payload: Message, stamp: timestamp_pb2.Timestamp
) -> session_pb2.DiscussionEvent:
    """The discussion's next event, folded into its document (progress, not deltas, extends its expiry)."""
    event = session_pb2.DiscussionEvent(
        discussion_id=doc.discussion_id,
        sequence=doc.last_sequence + 1,
        time=stamp,
        **{kind: payload},  # type: ignore[arg-type]
    )
    apply_event(doc, event)
    if kind != "agent_delta":
        _extend_expiry(doc)
    return event


def merged_deltas(batch: AgentEvents) -> AgentEvents:
    """The batch with each run of consecutive deltas of one answer merged into one delta (same text, fewer events)."""
    merged: AgentEvents = []
    for kind, payload in batch:
        if kind == "agent_delta" and merged and merged[-1][0] == "agent_delta":
            previous = merged[-1][1]
            assert isinstance(previous, discussion_pb2.AgentDelta) and isinstance(payload, discussion_pb2.AgentDelta)
            if (previous.agent, previous.round) == (payload.agent, payload.round):
                merged[-1] = (
                    kind,
                    discussion_pb2.AgentDelta(
                        agent=payload.agent, round=payload.round, text=previous.text + payload.text
                    ),
                )
                continue
        merged.append((kind, payload))
    return merged


def _extend_expiry(doc: session_pb2.Discussion) -> None:
    """Progress counts as activity: a discussion never expires while it is moving."""
    candidate = doc.updated_at.ToNanoseconds() + doc.ttl.ToNanoseconds()
    if candidate > doc.expires_at.ToNanoseconds():
        doc.expires_at.FromNanoseconds(candidate)


def deadline_of(doc: session_pb2.Discussion) -> float | None:
    """When the discussion must have ended (seconds since the epoch), or None without a timeout."""
    if not doc.HasField("timeout"):
        return None
    return (doc.created_at.ToNanoseconds() + doc.timeout.ToNanoseconds()) / 1e9


def timed_out_reason(doc: session_pb2.Discussion) -> str:
    """The error of a discussion its deadline ended."""
    return f"timed out: the discussion's timeout of {doc.timeout.ToNanoseconds() / 1e9:g} s (from its creation) passed"
