"""Runs each admitted discussion as its own asyncio task that drives the agent service.

Every agent event becomes a sequence-numbered DiscussionEvent, written to the
store before readers are woken, and folded into the in-memory document, which
is saved when the discussion's shape changes (status, an agent's answer, a
round, the summary); readers fold in the rest from the event log. Discussions
that find no free slot wait in admission's queue and start, in order, as slots
free. At most max_concurrent_agent_runs RunDiscussion calls are open at once:
the rest wait here, not in gRPC core's queue where an overloaded agent service
would let them time out unseen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeAlias

import grpc
from google.protobuf import timestamp_pb2

from services.gen.roundtable.agents.v1 import agents_pb2, agents_pb2_grpc
from services.gen.roundtable.session.v1 import session_pb2
from services.session.admission import Admission
from services.session.document import apply_event, cancel_running_results, failure_reasons, prior_answers
from services.session.metrics import (
    AGENT_RUNS_WAITING,
    DISCUSSIONS_ACTIVE,
    DISCUSSIONS_FINISHED,
    DISCUSSIONS_QUEUED,
)
from services.session.notifier import EventNotifier
from services.session.stores.interface import TERMINAL_STATUSES, Store
from services.shared.logs import session_context

logger = logging.getLogger(__name__)


Status: TypeAlias = session_pb2.DiscussionStatus.ValueType

# A lost agent replica (connection reset, drained, ejected): its rounds can be re-run elsewhere.
RETRYABLE_AGENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
AGENT_ATTEMPTS = 4

# Events after which the stored document is rewritten; the others (started, deltas) live in the
# event log only, and whoever reads a stored document of a running discussion folds them in.
DOCUMENT_EVENTS = frozenset(
    {"status_changed", "agent_completed", "agent_failed", "round_completed", "summary_completed"}
)

# stop() with this status leaves the discussion RUNNING in the store, to be resumed after a restart.
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


def now_timestamp() -> timestamp_pb2.Timestamp:
    """The current time as a protobuf Timestamp."""
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


class DiscussionRunner:
    """The running and queued discussions of this replica."""

    def __init__(
        self,
        *,
        store: Store,
        agents: agents_pb2_grpc.AgentServiceAsyncStub,
        admission: Admission,
        notifier: EventNotifier,
        agents_call_timeout_seconds: float,
        lease_ttl_seconds: float,
        max_events_per_discussion: int,
        max_concurrent_agent_runs: int = 1000,
        shared_state: bool = False,
        terminal_event_delay_seconds: float = 0.0,
    ) -> None:
        self._store = store
        self._agents = agents
        self._admission = admission
        self._notifier = notifier
        self._call_timeout = agents_call_timeout_seconds
        self._lease_ttl_seconds = lease_ttl_seconds
        self._max_events = max_events_per_discussion
        self._agent_runs = asyncio.Semaphore(max_concurrent_agent_runs)
        self._agent_runs_waiting = 0
        # With state shared between replicas a lapsed lease may be another replica's now.
        self._shared_state = shared_state
        self._terminal_event_delay_seconds = terminal_event_delay_seconds
        self.active: dict[str, LiveDiscussion] = {}
        self.queued: dict[str, LiveDiscussion] = {}
        # Given a slot by admission before their creator handed them over (see submit()).
        self._promoted_early: set[str] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._adopt_orphans: Callable[[], Awaitable[None]] | None = None
        DISCUSSIONS_ACTIVE.set_function(lambda: len(self.active))
        DISCUSSIONS_QUEUED.set_function(lambda: len(self.queued))
        AGENT_RUNS_WAITING.set_function(lambda: self._agent_runs_waiting)

    def live(self, discussion_id: str) -> LiveDiscussion | None:
        """The running or queued discussion, with the freshest document (the store's may lag by deltas)."""
        return self.active.get(discussion_id) or self.queued.get(discussion_id)

    def start_heartbeat(self, adopt_orphans: Callable[[], Awaitable[None]] | None = None) -> None:
        """Renew leases, admit queued discussions into lapsed slots, and (about once a ttl) adopt orphans."""
        self._adopt_orphans = adopt_orphans
        self._heartbeat = asyncio.create_task(self._renew_leases(), name="admission-heartbeat")

    async def stop_heartbeat(self) -> None:
        """Stop renewing (shutdown)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)

    async def submit(self, doc: session_pb2.Discussion, owner: str, admitted: bool) -> None:
        """Start an admitted, stored discussion now, or hold a queued one until admission promotes it."""
        live = LiveDiscussion(doc=doc, owner=owner)
        self._notifier.open(doc.discussion_id, doc.last_sequence)
        # Admission may have promoted it from the queue while its creator was still storing it.
        if doc.discussion_id in self._promoted_early:
            self._promoted_early.discard(doc.discussion_id)
            admitted = True
        if admitted:
            self._start(live)
            return
        self.queued[doc.discussion_id] = live
        if doc.status != session_pb2.DISCUSSION_STATUS_QUEUED or doc.last_sequence == 0:
            doc.status = session_pb2.DISCUSSION_STATUS_QUEUED
            await self._record(live, status_changed=session_pb2.StatusChanged(status=doc.status))
        logger.info("discussion %s queued (%d waiting)", doc.discussion_id, len(self.queued))

    def _start(self, live: LiveDiscussion) -> None:
        live.doc.status = session_pb2.DISCUSSION_STATUS_RUNNING
        live.started_monotonic = time.monotonic()
        self.active[live.doc.discussion_id] = live
        live.task = asyncio.create_task(self._run(live), name=f"discussion-{live.doc.discussion_id}")

    def start_promoted(self, promoted: list[str]) -> None:
        """Start the queued discussions admission has just given slots to."""
        for discussion_id in promoted:
            live = self.queued.pop(discussion_id, None)
            if live is not None:
                live.waited = True
                self._start(live)
            else:
                self._promoted_early.add(discussion_id)

    def forget_promotion(self, discussion_id: str) -> None:
        """A discussion admission promoted will never be submitted (its creation failed or was a replay)."""
        self._promoted_early.discard(discussion_id)

    async def drop_queued(self, discussion_id: str) -> bool:
        """Take a queued discussion out of the queue, recording nothing (its record is being removed)."""
        queued = self.queued.pop(discussion_id, None)
        if queued is None:
            return False
        self._notifier.close(discussion_id)
        self.start_promoted(await self._admission.release(discussion_id))
        return True

    async def stop(self, discussion_id: str, status: Status, reason: str) -> bool:
        """End a running or queued discussion with this status (SUSPEND: leave it to be resumed)."""
        queued = self.queued.pop(discussion_id, None)
        if queued is not None:
            self.start_promoted(await self._admission.release(discussion_id))
            if status != SUSPEND:
                await self._finish(queued, session_pb2.StatusChanged(status=status, error=reason))
            self._notifier.close(discussion_id)
            return True
        live = self.active.get(discussion_id)
        if live is None or live.task is None:
            return False
        if live.stop_status == session_pb2.DISCUSSION_STATUS_UNSPECIFIED:
            live.stop_status, live.stop_reason = status, reason
            live.task.cancel()
        await asyncio.wait({live.task})
        return True

    async def stop_all(self, status: Status, reason: str) -> None:
        """Stop every running and queued discussion (shutdown)."""
        await asyncio.gather(*(self.stop(i, status, reason) for i in [*self.queued, *self.active]))

    async def wait_idle(self, timeout_seconds: float) -> None:
        """Wait until no discussion runs, or the timeout passes."""
        tasks = {a.task for a in self.active.values() if a.task is not None}
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_seconds)

    async def settle(self, doc: session_pb2.Discussion, status: Status, reason: str) -> None:
        """Give a discussion that is not live here a terminal status, as an event and in its document."""
        await self._finish(LiveDiscussion(doc=doc, owner=""), session_pb2.StatusChanged(status=status, error=reason))

    async def release_agents(self, discussion_id: str) -> None:
        """Ask the agent service to drop the session's agent set now (best effort)."""
        try:
            await self._agents.ReleaseSession(
                agents_pb2.ReleaseSessionRequest(session_id=discussion_id),
                timeout=5,
                metadata=(("x-session-id", discussion_id),),
            )
        except grpc.aio.AioRpcError as error:
            logger.warning("could not release agent set of %s: %s", discussion_id, error.code().name)

    async def _run(self, live: LiveDiscussion) -> None:
        doc = live.doc
        if live.waited and await self._store.get(doc.discussion_id) is None:
            # Removed while it waited (another replica's sweep or delete): nothing to run or record.
            self.active.pop(doc.discussion_id, None)
            self._notifier.close(doc.discussion_id)
            self.start_promoted(await self._admission.release(doc.discussion_id))
            return
        with session_context(doc.discussion_id):
            resumed = doc.completed_rounds > 0 or doc.last_sequence > 1
            if resumed:
                logger.info("resuming after round %d", doc.completed_rounds)
            else:
                logger.info("创建新讨论会话，话题: %s", doc.topic[:200])
            final: session_pb2.StatusChanged | None
            try:
                await self._record(live, status_changed=session_pb2.StatusChanged(status=doc.status))
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
            except grpc.aio.AioRpcError as error:
                logger.warning("agent service call failed: %s %s", error.code().name, error.details())
                final = session_pb2.StatusChanged(
                    status=session_pb2.DISCUSSION_STATUS_FAILED,
                    error=f"agent service failed: {error.code().name}: {error.details()}",
                )
            except Exception as error:  # keep the slot and the record consistent whatever broke
                logger.exception("discussion runner crashed")
                final = session_pb2.StatusChanged(
                    status=session_pb2.DISCUSSION_STATUS_FAILED, error=f"internal error: {type(error).__name__}"
                )
            try:
                if final is not None:
                    await self._finish(live, final)
                elif live.abandoned:
                    logger.warning("stopped: its lease is gone (another replica took it over, or deleted it)")
                else:
                    await asyncio.shield(self._store.save(doc))
                    logger.info("suspended after round %d, to resume on restart", doc.completed_rounds)
            finally:
                self.active.pop(doc.discussion_id, None)
                self._notifier.close(doc.discussion_id)
                duration = time.monotonic() - live.started_monotonic
                self.start_promoted(await self._admission.release(doc.discussion_id, duration))

    async def _finish(self, live: LiveDiscussion, final: session_pb2.StatusChanged) -> None:
        await self._record(live, status_changed=final)
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

    async def _time_out_queued(self) -> None:
        """End the queued discussions whose deadline passed while they waited: TIMED_OUT, never run."""
        now = time.time()
        for discussion_id, queued in list(self.queued.items()):
            deadline = deadline_of(queued.doc)
            if deadline is not None and deadline <= now:
                await self.stop(discussion_id, session_pb2.DISCUSSION_STATUS_TIMED_OUT, timed_out_reason(queued.doc))

    async def _drive(self, live: LiveDiscussion) -> None:
        """Run the rest of the discussion; if the agent replica is lost, re-run its round on another."""
        for attempt in range(1, AGENT_ATTEMPTS + 1):
            sequence_before = live.doc.last_sequence
            try:
                await self._drive_once(live)
                return
            except grpc.aio.AioRpcError as error:
                # CANCELLED that we did not ask for (ours arrives as CancelledError) before any
                # event: gRPC core dropped the call unseen (the agent loop was overloaded). Safe to
                # re-issue: nothing of this run has started.
                dropped_unseen = error.code() == grpc.StatusCode.CANCELLED and live.doc.last_sequence == sequence_before
                if (error.code() not in RETRYABLE_AGENT_CODES and not dropped_unseen) or attempt == AGENT_ATTEMPTS:
                    raise
                logger.warning(
                    "agent service lost mid-discussion (%s: %s); re-running from round %d, attempt %d",
                    error.code().name,
                    error.details(),
                    live.doc.completed_rounds + 1,
                    attempt + 1,
                )
                await asyncio.sleep(min(0.2 * 2**attempt, 2.0))

    async def _drive_once(self, live: LiveDiscussion) -> None:
        doc = live.doc
        if doc.summary:
            return  # everything was done before the interruption but the final status
        budget = doc.token_budget
        if budget:
            budget = max(budget - doc.usage.total_tokens, 1)
        request = agents_pb2.RunDiscussionRequest(
            session_id=doc.discussion_id,
            topic=doc.topic,
            personas=doc.personas,
            rounds=doc.rounds,
            token_budget=budget,
            principal=live.owner,
            start_round=doc.completed_rounds + 1,
            prior_answers=prior_answers(doc),
        )
        self._agent_runs_waiting += 1
        try:
            await self._agent_runs.acquire()
        finally:
            self._agent_runs_waiting -= 1
        try:
            # x-session-id lets a load balancer keep a session on one agent replica.
            call = self._agents.RunDiscussion(
                request, timeout=self._call_timeout, metadata=(("x-session-id", doc.discussion_id),)
            )
            # Deltas stop being recorded near the cap; the structural events always fit within it.
            delta_cutoff = self._max_events - 3 * len(doc.personas) * (doc.rounds + 1) - 10
            try:
                async for agent_event in call:
                    kind = agent_event.WhichOneof("event")
                    if kind is None or (kind == "agent_delta" and doc.last_sequence >= delta_cutoff):
                        continue
                    await self._record(live, **{kind: getattr(agent_event, kind)})
            finally:
                call.cancel()
        finally:
            self._agent_runs.release()

    async def _record(self, live: LiveDiscussion, **payload: object) -> None:
        """Sequence an event, store it, fold it into the document, then wake readers."""
        doc = live.doc
        event = session_pb2.DiscussionEvent(
            discussion_id=doc.discussion_id,
            sequence=doc.last_sequence + 1,
            time=now_timestamp(),
            **payload,  # type: ignore[arg-type]
        )
        apply_event(doc, event)
        kind = event.WhichOneof("event")
        if kind != "agent_delta":
            _extend_expiry(doc)
        # Shielded: a cancel arriving mid-write must not leave a gap in the sequence. The terminal
        # status is saved before its event is appended, so whoever sees the end in the event log
        # (a reader on another replica) reads a finished document too; other events go log first,
        # so a document never claims an event the log lacks.
        if kind == "status_changed" and is_terminal(event.status_changed.status):
            await asyncio.shield(self._store.save(doc))
            if self._terminal_event_delay_seconds:  # fault injection (tests): the log lags the document
                await asyncio.shield(asyncio.sleep(self._terminal_event_delay_seconds))
            await asyncio.shield(self._store.append_events([event]))
        else:
            await asyncio.shield(self._store.append_events([event]))
            if kind in DOCUMENT_EVENTS:
                await asyncio.shield(self._store.save(doc))
        self._notifier.publish(doc.discussion_id, event.sequence)

    async def _renew_leases(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(self._lease_ttl_seconds / 3)
            with contextlib.suppress(Exception):
                for discussion_id in list(self.active):
                    if await self._admission.renew(discussion_id):
                        continue
                    live = self.active.get(discussion_id)
                    if not self._shared_state and live is not None:
                        # One replica: nobody else can have taken it; the loop only stalled. Keep running.
                        await self._admission.admit_unchecked(discussion_id, live.owner)
                        continue
                    # Its lease lapsed (this replica stalled past the ttl): another may own it now.
                    logger.warning("admission lease of %s lapsed; giving the discussion up", discussion_id)
                    self._abandon_later(discussion_id)
                self.start_promoted(await self._admission.reap())
                await self._time_out_queued()
                ticks += 1
                if self._shared_state and ticks % 3 == 0:  # about once a ttl
                    await self._drop_removed_queued()
                if self._adopt_orphans is not None and ticks % 3 == 0:
                    await self._adopt_orphans()

    async def _drop_removed_queued(self) -> None:
        """Let go of queued discussions whose record another replica removed (a delete there, or its sweep)."""
        for discussion_id in list(self.queued):
            if await self._store.get(discussion_id) is None:
                logger.info("discussion %s was removed while it waited; it leaves the queue", discussion_id)
                await self.drop_queued(discussion_id)

    def _abandon_later(self, discussion_id: str) -> None:
        live = self.active.get(discussion_id)
        if live is None or live.task is None:
            return
        live.abandoned = True
        live.stop_status = SUSPEND
        live.task.cancel()


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


def is_terminal(status: Status) -> bool:
    """Whether a status is final."""
    return status in TERMINAL_STATUSES
