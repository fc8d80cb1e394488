"""Runs each admitted discussion as its own asyncio task that drives the agent service.

Every agent event becomes a sequence-numbered DiscussionEvent, written to the
store before readers are woken, and folded into the in-memory document, which
is saved whenever something other than a text delta happens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TypeAlias

import grpc
from google.protobuf import timestamp_pb2
from prometheus_client import Counter, Gauge

from services.gen.roundtable.agents.v1 import agents_pb2, agents_pb2_grpc
from services.gen.roundtable.session.v1 import session_pb2
from services.session.admission import Admission
from services.session.document import apply_event, cancel_running_results, failure_reasons
from services.session.notifier import EventNotifier
from services.session.store import TERMINAL_STATUSES, Store
from services.shared.logs import session_context

logger = logging.getLogger(__name__)

DISCUSSIONS_FINISHED = Counter(
    "roundtable_discussions_finished_total", "Discussions that reached a terminal status.", ["status"]
)
DISCUSSIONS_ACTIVE = Gauge("roundtable_discussions_active", "Discussions running on this session replica.")

Status: TypeAlias = session_pb2.DiscussionStatus.ValueType


@dataclass
class ActiveDiscussion:
    """A running discussion: its live document and its task."""

    doc: session_pb2.Discussion
    started_monotonic: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    stop_status: Status = session_pb2.DISCUSSION_STATUS_UNSPECIFIED
    stop_reason: str = ""


def now_timestamp() -> timestamp_pb2.Timestamp:
    """The current time as a protobuf Timestamp."""
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


class DiscussionRunner:
    """The running discussions of this replica."""

    def __init__(
        self,
        *,
        store: Store,
        agents: agents_pb2_grpc.AgentServiceAsyncStub,
        admission: Admission,
        notifier: EventNotifier,
        agents_call_timeout_seconds: float,
    ) -> None:
        self._store = store
        self._agents = agents
        self._admission = admission
        self._notifier = notifier
        self._call_timeout = agents_call_timeout_seconds
        self.active: dict[str, ActiveDiscussion] = {}
        DISCUSSIONS_ACTIVE.set_function(lambda: len(self.active))

    def live_document(self, discussion_id: str) -> session_pb2.Discussion | None:
        """The freshest document of a running discussion (the store's may lag by text deltas)."""
        active = self.active.get(discussion_id)
        return None if active is None else active.doc

    def start(self, doc: session_pb2.Discussion) -> None:
        """Run an admitted, stored discussion; its admission slot is released when it ends."""
        active = ActiveDiscussion(doc=doc)
        self.active[doc.discussion_id] = active
        self._notifier.open(doc.discussion_id, doc.last_sequence)
        active.task = asyncio.create_task(self._run(active), name=f"discussion-{doc.discussion_id}")

    async def stop(self, discussion_id: str, status: Status, reason: str) -> bool:
        """Stop a running discussion with this terminal status; False if it was not running here."""
        active = self.active.get(discussion_id)
        if active is None or active.task is None:
            return False
        if active.stop_status == session_pb2.DISCUSSION_STATUS_UNSPECIFIED:
            active.stop_status, active.stop_reason = status, reason
            active.task.cancel()
        await asyncio.wait({active.task})
        return True

    async def stop_all(self, status: Status, reason: str) -> None:
        """Stop every running discussion (shutdown)."""
        await asyncio.gather(*(self.stop(i, status, reason) for i in list(self.active)))

    async def wait_idle(self, timeout_seconds: float) -> None:
        """Wait until no discussion runs, or the timeout passes."""
        tasks = {a.task for a in self.active.values() if a.task is not None}
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_seconds)

    async def _run(self, active: ActiveDiscussion) -> None:
        doc = active.doc
        with session_context(doc.discussion_id):
            logger.info("创建新讨论会话，话题: %s", doc.topic[:200])
            try:
                await self._record(active, status_changed=session_pb2.StatusChanged(status=doc.status))
                await self._drive(active)
                if doc.completed_agents:
                    final = session_pb2.StatusChanged(status=session_pb2.DISCUSSION_STATUS_COMPLETED)
                else:
                    final = session_pb2.StatusChanged(
                        status=session_pb2.DISCUSSION_STATUS_FAILED,
                        error=f"every agent failed: {failure_reasons(doc)}",
                    )
            except asyncio.CancelledError:
                if active.stop_status == session_pb2.DISCUSSION_STATUS_UNSPECIFIED:
                    raise  # not ours: the event loop is closing
                cancel_running_results(doc)
                final = session_pb2.StatusChanged(status=active.stop_status, error=active.stop_reason)
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
                await self._record(active, status_changed=final)
                logger.info("discussion ended: %s", session_pb2.DiscussionStatus.Name(final.status))
            finally:
                DISCUSSIONS_FINISHED.labels(session_pb2.DiscussionStatus.Name(final.status)).inc()
                self.active.pop(doc.discussion_id, None)
                self._notifier.close(doc.discussion_id)
                self._admission.release(time.monotonic() - active.started_monotonic)

    async def _drive(self, active: ActiveDiscussion) -> None:
        doc = active.doc
        request = agents_pb2.RunDiscussionRequest(
            session_id=doc.discussion_id,
            topic=doc.topic,
            personas=doc.personas,
            rounds=doc.rounds,
            token_budget=doc.token_budget,
        )
        # x-session-id lets a load balancer keep a session on one agent replica.
        call = self._agents.RunDiscussion(
            request, timeout=self._call_timeout, metadata=(("x-session-id", doc.discussion_id),)
        )
        try:
            async for agent_event in call:
                kind = agent_event.WhichOneof("event")
                if kind is None:
                    continue
                await self._record(active, **{kind: getattr(agent_event, kind)})
        finally:
            call.cancel()

    async def _record(self, active: ActiveDiscussion, **payload: object) -> None:
        """Sequence an event, store it, fold it into the document, then wake readers."""
        doc = active.doc
        event = session_pb2.DiscussionEvent(
            discussion_id=doc.discussion_id,
            sequence=doc.last_sequence + 1,
            time=now_timestamp(),
            **payload,  # type: ignore[arg-type]
        )
        apply_event(doc, event)
        # Shielded: a cancel arriving mid-write must not leave a gap in the sequence.
        await asyncio.shield(self._store.append_events([event]))
        if event.WhichOneof("event") != "agent_delta":
            _extend_expiry(doc)
            await asyncio.shield(self._store.save(doc))
        self._notifier.publish(doc.discussion_id, event.sequence)

    async def settle(self, doc: session_pb2.Discussion, status: Status, reason: str) -> None:
        """Give a discussion that is not running here a terminal status, as an event and in its document."""
        final = session_pb2.StatusChanged(status=status, error=reason)
        await self._record(ActiveDiscussion(doc=doc), status_changed=final)

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


def _extend_expiry(doc: session_pb2.Discussion) -> None:
    """Progress counts as activity: a discussion never expires while it is moving."""
    ttl_nanos = doc.ttl.ToNanoseconds()
    candidate = doc.updated_at.ToNanoseconds() + ttl_nanos
    if candidate > doc.expires_at.ToNanoseconds():
        doc.expires_at.FromNanoseconds(candidate)


def is_terminal(status: Status) -> bool:
    """Whether a status is final."""
    return status in TERMINAL_STATUSES
