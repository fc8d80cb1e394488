"""A discussion's whole life on this replica, in one place: create, admit or queue, run, promote the next,
read, follow, cancel, forget, resume, adopt, expire.

This is the only module that combines admission, the runner, the store and the notifier. It knows
discussions by their store ids (services/session/ids.py); callers' ids are the servicer's business.
Whenever admission frees a slot or a queue place (a discussion ends, is cancelled, deleted or expires,
a lease lapses), the queued discussions it admits in its stead start here, in one private step
(`_release`, `_reap`) that no caller can forget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.gen.roundtable.session.v1 import session_pb2
from services.session.admission import Admission
from services.session.agents_client import AgentsClient
from services.session.cancel_relay import CancelRelay
from services.session.document import UNFINISHED_STATUSES, apply_event, copied, is_terminal, now_timestamp
from services.session.memory_watch import MemoryWatch
from services.session.metrics import (
    DISCUSSIONS_ACTIVE,
    DISCUSSIONS_CREATED,
    DISCUSSIONS_EXPIRED,
    DISCUSSIONS_QUEUED,
)
from services.session.notifier import EventNotifier
from services.session.runner import SUSPEND, DiscussionRunner, LiveDiscussion, Status, deadline_of, timed_out_reason
from services.session.stores.interface import (
    DiscussionExists,
    DiscussionStatus,
    InvalidPageToken,
    Store,
    created_nanos,
    encode_page_token,
)
from services.shared.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.shared.session_logs import remove_session_log

logger = logging.getLogger(__name__)

Discussion = session_pb2.Discussion
DiscussionEvent = session_pb2.DiscussionEvent

CANCEL_REASON = "cancelled by the client"
DELETE_REASON = "deleted by the client"
STOP_REASON = "the session service stopped while this discussion ran"
EVENTS_PER_READ = 256
# A reader re-checks the store this often even without a wake-up (belt and braces).
STREAM_POLL_SECONDS = 2.0
# How long a cancel through a replica that does not run the discussion waits for its owner to end it.
CANCEL_ELSEWHERE_TIMEOUT_SECONDS = 5.0
# While waiting, how often it looks at the document, and how often it repeats its request (pub/sub keeps nothing).
CANCEL_POLL_SECONDS = 0.05
CANCEL_REPEAT_SECONDS = 0.5
# How long a reader waits for the terminal event of a discussion whose document already says finished.
TERMINAL_EVENT_GRACE_SECONDS = 10.0
EXPIRY_BATCH = 500


class UnknownDiscussion(LookupError):
    """No discussion of the caller's has this id: it never existed, expired, was deleted, or is another's."""


class IdTaken(ValueError):
    """The id proposed for a new discussion already names another discussion of the caller's."""


class AlreadyEnded(ValueError):
    """The discussion has already ended; `status` is how."""

    def __init__(self, status: DiscussionStatus) -> None:
        super().__init__(session_pb2.DiscussionStatus.Name(status))
        self.status = status


class CancelNotConfirmed(TimeoutError):
    """The replica running the discussion did not end it within CANCEL_ELSEWHERE_TIMEOUT_SECONDS."""


@dataclass(frozen=True)
class NewDiscussion:
    """A validated request for a discussion, under its store id."""

    discussion_id: str
    topic: str
    personas: list[str]
    rounds: int
    request_id: str
    token_budget: int
    ttl_seconds: float
    # The whole discussion's timeout from its creation; 0: none.
    timeout_seconds: float
    # The caller proposed the id (x-session-id): an earlier create under it with the same request_id is a replay.
    proposed_id: bool = False


class Discussions:
    """The discussions of one session replica: those it runs, those it queues, and the stored ones it serves."""

    def __init__(
        self,
        *,
        store: Store,
        admission: Admission,
        agents: AgentsClient,
        notifier: EventNotifier | None = None,
        cancel_relay: CancelRelay,
        lease_ttl_seconds: float,
        max_events_per_discussion: int,
        max_retained_per_principal: int,
        resume_interrupted: bool,
        shared_state: bool,
        memory_watch: MemoryWatch | None = None,
        terminal_event_delay_seconds: float = 0.0,
    ) -> None:
        self._store = store
        self._admission = admission
        self._agents = agents
        self._notifier = notifier or EventNotifier()
        self._cancel_relay = cancel_relay
        self._lease_ttl_seconds = lease_ttl_seconds
        self._max_retained = max_retained_per_principal
        self._resume_interrupted = resume_interrupted
        # With state shared between replicas (Redis), other replicas run, queue and lose discussions too.
        self._shared_state = shared_state
        self._memory_watch = memory_watch
        self._runner = DiscussionRunner(
            store=store,
            agents=agents,
            notifier=self._notifier,
            max_events_per_discussion=max_events_per_discussion,
            terminal_event_delay_seconds=terminal_event_delay_seconds,
        )
        self._running: dict[str, LiveDiscussion] = {}
        self._queued: dict[str, LiveDiscussion] = {}
        # Given a slot by admission before their creator handed them over (see _submit()).
        self._promoted_early: set[str] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        # False while draining: creates are refused and orphans are left for other replicas.
        self.accepting = True
        DISCUSSIONS_ACTIVE.set_function(lambda: len(self._running))
        DISCUSSIONS_QUEUED.set_function(lambda: len(self._queued))

    # --- what runs here -------------------------------------------------------------------------------

    def is_here(self, discussion_id: str) -> bool:
        """Whether this replica runs or queues the discussion."""
        return discussion_id in self._running or discussion_id in self._queued

    def running_count(self) -> int:
        """Discussions this replica runs now."""
        return len(self._running)

    def queued_count(self) -> int:
        """Discussions this replica holds in the queue."""
        return len(self._queued)

    # --- life cycle of the replica --------------------------------------------------------------------

    async def start(self) -> None:
        """Take up what a previous process left unfinished, then listen for cancels and keep leases alive."""
        self._cancel_relay.start(self._cancel_here)
        await self.resume_leftovers()
        self._heartbeat = asyncio.create_task(self._keep_leases(), name="admission-heartbeat")

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new discussions, give running ones the grace period, then suspend or interrupt the rest."""
        self.accepting = False
        tasks = {live.task for live in self._running.values() if live.task is not None}
        if tasks:
            await asyncio.wait(tasks, timeout=grace_seconds)
        status = SUSPEND if self._resume_interrupted else session_pb2.DISCUSSION_STATUS_INTERRUPTED
        await asyncio.gather(*(self._stop(i, status, STOP_REASON) for i in [*self._queued, *self._running]))

    async def close(self) -> None:
        """Stop listening for cancels and renewing leases."""
        await self._cancel_relay.stop()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)

    # --- the operations callers ask for ---------------------------------------------------------------

    async def create(self, owner: str, new: NewDiscussion) -> tuple[Discussion, bool]:
        """Admit (or queue), store and start a discussion: (it, True); an idempotent replay: (the original, False).

        Raises Unavailable (draining), ResourceExhausted (memory, retention or admission limits) or IdTaken.
        """
        if not self.accepting:
            raise Unavailable("the server is shutting down; retry with the same request_id")
        if self._memory_watch is not None:
            self._memory_watch.check()
        await self._check_retention(owner)
        if new.proposed_id:
            # Checked before admission, so a replay takes no slot (nor frees the one its original holds).
            existing = await self._store.get(new.discussion_id)
            if existing is not None:
                if not (new.request_id and existing.request_id == new.request_id):
                    raise IdTaken(new.discussion_id)
                return self._freshest(existing), False
        admitted = await self._admission.admit(new.discussion_id, owner)
        # False once the slot turns out to be another create's (a concurrent retry of the same create).
        release_on_failure = True
        submitted = False
        try:
            doc = _new_document(new, admitted)
            try:
                stored = await self._store.create(owner, doc)
            except DiscussionExists as taken:
                # Only the caller's own discussions can hold this store id: this reveals nothing of others'.
                raise IdTaken(new.discussion_id) from taken
            if stored != doc:  # idempotent replay: the owner's earlier create with this request_id
                release_on_failure = stored.discussion_id != new.discussion_id
                return self._freshest(stored), False
            await self._submit(stored, owner, admitted)
            submitted = True
            DISCUSSIONS_CREATED.inc()
            return copied(stored), True
        finally:
            if not submitted and release_on_failure:
                self._promoted_early.discard(new.discussion_id)
                await self._release(new.discussion_id)

    async def read(
        self, discussion_id: str, owner: str, *, fold_events: bool = True, touch: bool = False
    ) -> Discussion:
        """The owner's discussion, freshest copy; raises UnknownDiscussion for unknown ids and others' ones.

        fold_events=False skips bringing another replica's document up to date, for callers that need
        only its id and status; touch=True counts the read as access (it keeps the discussion from expiring).
        """
        live = self._live(discussion_id)
        if live is not None:
            if live.owner != owner:
                raise UnknownDiscussion(discussion_id)
            doc = copied(live.doc)
        else:
            found = await self._store.get_with_owner(discussion_id)
            if found is None or found[1] != owner:
                raise UnknownDiscussion(discussion_id)
            doc = found[0]
            if fold_events and not is_terminal(doc.status):
                await self._fold_recorded_events(doc)
        if touch:
            await self._touch(doc)
        return doc

    async def follow(self, discussion_id: str, after_sequence: int) -> AsyncIterator[DiscussionEvent]:
        """The events after after_sequence: replayed from the store, then as they are recorded, to the last."""
        last = after_sequence
        # When the store first showed the discussion finished with its terminal event not yet in the log.
        terminal_seen_monotonic: float | None = None
        while True:
            events = await self._store.events_after(discussion_id, last, EVENTS_PER_READ)
            for event in events:
                yield event
                last = event.sequence
                if event.WhichOneof("event") == "status_changed" and is_terminal(event.status_changed.status):
                    return
            if len(events) == EVENTS_PER_READ:
                continue  # more may be waiting; otherwise go straight to waiting for the next
            if self.is_here(discussion_id):
                await self._notifier.wait_beyond(discussion_id, last, STREAM_POLL_SECONDS)
                continue
            # Not live here. Another replica may be running it (shared store): follow the store.
            doc = await self._store.get(discussion_id)
            if doc is None:
                return  # deleted meanwhile
            if not is_terminal(doc.status):
                await self._store.wait_for_events(discussion_id, last, STREAM_POLL_SECONDS)
                continue
            if doc.last_sequence <= last:
                return  # finished, and everything up to its end was delivered
            # Its owner saves the finished document before appending the terminal event (runner.record):
            # wait for that event rather than end the stream without it.
            if terminal_seen_monotonic is None:
                terminal_seen_monotonic = time.monotonic()
            waited_seconds = time.monotonic() - terminal_seen_monotonic
            if waited_seconds < TERMINAL_EVENT_GRACE_SECONDS:
                await self._store.wait_for_events(
                    discussion_id, last, min(STREAM_POLL_SECONDS, TERMINAL_EVENT_GRACE_SECONDS - waited_seconds)
                )
                continue
            # The owner stopped between the two writes: the document holds what the event said.
            yield _terminal_event(doc)
            return

    async def cancel(self, discussion_id: str, owner: str) -> Discussion:
        """Stop the agents now (or leave the queue): CANCELLED, partial results kept; the ended document.

        Raises UnknownDiscussion, AlreadyEnded, or CancelNotConfirmed when the replica running it does not answer.
        """
        doc = await self.read(discussion_id, owner)
        if is_terminal(doc.status):
            raise AlreadyEnded(doc.status)
        if await self._stop(discussion_id, session_pb2.DISCUSSION_STATUS_CANCELLED, CANCEL_REASON):
            await self._agents.release(discussion_id)
            found = await self._store.get(discussion_id)
        else:
            found = await self._cancel_elsewhere(discussion_id)
        if found is None:
            raise UnknownDiscussion(discussion_id)
        if not is_terminal(found.status):
            raise CancelNotConfirmed(discussion_id)
        return found

    async def delete(self, discussion_id: str, owner: str) -> None:
        """Remove the owner's discussion, its events, its agent set and its log; raises UnknownDiscussion."""
        await self.read(discussion_id, owner, fold_events=False)
        await self._forget(discussion_id, cancel_reason=DELETE_REASON)

    async def list_page(
        self, owner: str, status: DiscussionStatus, page_size: int, page_token: str, *, max_bytes: int
    ) -> tuple[list[Discussion], str]:
        """The owner's discussions newest first, at most max_bytes of them, and the token of the next page."""
        try:
            discussions, next_token = await self._store.list_page(owner, status, page_size, page_token)
        except InvalidPageToken as error:
            raise InvalidArgument(str(error), "page_token") from error
        # A page of long topics can outgrow the largest message: end it early and let the token go on.
        size = 0
        for index, discussion in enumerate(discussions):
            size += discussion.ByteSize() + 8
            if size > max_bytes and index > 0:
                last = discussions[index - 1]
                return discussions[:index], encode_page_token(created_nanos(last), last.discussion_id)
        return discussions, next_token

    async def expire_due(self) -> int:
        """Remove the discussions idle past their ttl, with their agent sets and logs; how many were removed."""
        removed = 0
        while True:
            expired = await self._store.expired(time.time(), EXPIRY_BATCH)
            # A running discussion extends its own expiry as it progresses; one that is still
            # here past it is stalled, and is left to its runner's deadline.
            due = [i for i in expired if i not in self._running]
            for discussion_id in due:
                if await self._forget(discussion_id):
                    removed += 1
                    DISCUSSIONS_EXPIRED.inc()
                    logger.info("discussion %s expired and was removed", discussion_id)
            if len(expired) < EXPIRY_BATCH or not due:
                return removed

    # --- taking up what others left -------------------------------------------------------------------

    async def resume_leftovers(self, *, running_only: bool = False) -> None:
        """Discussions a previous process (or a dead replica) left unfinished: resume or re-queue them, or
        mark them INTERRUPTED; only those whose lease nobody holds."""
        leftovers = sorted(await self._store.unfinished(), key=lambda d: d.created_at.ToNanoseconds())
        for doc in leftovers:
            if self.is_here(doc.discussion_id):
                continue  # ours, running or queued
            if running_only and doc.status != session_pb2.DISCUSSION_STATUS_RUNNING:
                continue
            owner = await self._store.owner(doc.discussion_id) or ""
            # With a shared store another replica may still be running it: take only what nobody holds.
            if not await self._admission.adopt(doc.discussion_id, owner):
                continue
            # The list was read before adopt(): the discussion may have finished since. Read it again.
            fresh = await self._store.get(doc.discussion_id)
            if fresh is None or fresh.status not in UNFINISHED_STATUSES or self.is_here(doc.discussion_id):
                await self._release(doc.discussion_id)
                continue
            doc = fresh
            await self._fold_recorded_events(doc)
            if doc.status == session_pb2.DISCUSSION_STATUS_QUEUED:
                # Back in line, behind those queued meanwhile: adopt() leased past the caps, admit() does not.
                await self._release(doc.discussion_id)
                admitted = await self._admission.admit(doc.discussion_id, owner)
                await self._submit(doc, owner, admitted)
            elif self._resume_interrupted:
                # It held a slot before the stop: adopt() gave it one back whatever the caps say now.
                await self._submit(doc, owner, admitted=True)
                logger.warning("resuming discussion %s after round %d", doc.discussion_id, doc.completed_rounds)
            else:
                live = LiveDiscussion(doc=doc, owner=owner)
                await self._runner.finish(
                    live, session_pb2.StatusChanged(status=session_pb2.DISCUSSION_STATUS_INTERRUPTED, error=STOP_REASON)
                )
                await self._release(doc.discussion_id)
                logger.warning("discussion %s was cut short by a stop: INTERRUPTED", doc.discussion_id)

    # --- private steps --------------------------------------------------------------------------------

    def _live(self, discussion_id: str) -> LiveDiscussion | None:
        """The running or queued discussion, with the freshest document (the store's may lag by deltas)."""
        return self._running.get(discussion_id) or self._queued.get(discussion_id)

    def _freshest(self, stored: Discussion) -> Discussion:
        """A copy of the live document if the discussion runs or waits here, else the stored one."""
        live = self._live(stored.discussion_id)
        return copied(live.doc if live is not None else stored)

    async def _submit(self, doc: Discussion, owner: str, admitted: bool) -> None:
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
        self._queued[doc.discussion_id] = live
        if doc.status != session_pb2.DISCUSSION_STATUS_QUEUED or doc.last_sequence == 0:
            doc.status = session_pb2.DISCUSSION_STATUS_QUEUED
            await self._runner.record(live, status_changed=session_pb2.StatusChanged(status=doc.status))
        logger.info("discussion %s queued (%d waiting)", doc.discussion_id, len(self._queued))

    def _start(self, live: LiveDiscussion) -> None:
        live.doc.status = session_pb2.DISCUSSION_STATUS_RUNNING
        live.started_monotonic = time.monotonic()
        self._running[live.doc.discussion_id] = live
        live.task = asyncio.create_task(self._run(live), name=f"discussion-{live.doc.discussion_id}")

    async def _run(self, live: LiveDiscussion) -> None:
        discussion_id = live.doc.discussion_id
        if live.waited and await self._store.get(discussion_id) is None:
            # Removed while it waited (another replica's sweep or delete): nothing to run or record.
            self._running.pop(discussion_id, None)
            self._notifier.close(discussion_id)
            await self._release(discussion_id)
            return
        try:
            await self._runner.run(live)
        finally:
            # Not settled: cancelled with no stop asked for, the event loop is closing; leave everything be.
            if live.settled:
                self._running.pop(discussion_id, None)
                self._notifier.close(discussion_id)
                await self._release(discussion_id, time.monotonic() - live.started_monotonic)

    async def _release(self, discussion_id: str, duration_seconds: float | None = None) -> None:
        """Free the discussion's slot or queue place, and start whatever admission lets in instead."""
        self._promote(await self._admission.release(discussion_id, duration_seconds))

    def _promote(self, promoted: list[str]) -> None:
        """Start the queued discussions admission has just given slots to."""
        for discussion_id in promoted:
            live = self._queued.pop(discussion_id, None)
            if live is not None:
                live.waited = True
                self._start(live)
            else:
                self._promoted_early.add(discussion_id)

    async def _stop(self, discussion_id: str, status: Status, reason: str) -> bool:
        """End a running or queued discussion with this status (SUSPEND: leave it to be resumed); False if not here."""
        queued = self._queued.pop(discussion_id, None)
        if queued is not None:
            await self._release(discussion_id)
            if status != SUSPEND:
                await self._runner.finish(queued, session_pb2.StatusChanged(status=status, error=reason))
            self._notifier.close(discussion_id)
            return True
        live = self._running.get(discussion_id)
        if live is None or live.task is None:
            return False
        await self._runner.stop(live, status, reason)
        return True

    async def _drop_queued(self, discussion_id: str) -> bool:
        """Take a queued discussion out of the queue, recording nothing (its record is being removed)."""
        if self._queued.pop(discussion_id, None) is None:
            return False
        self._notifier.close(discussion_id)
        await self._release(discussion_id)
        return True

    async def _forget(self, discussion_id: str, *, cancel_reason: str | None = None) -> bool:
        """Remove a discussion, its events, its agent set and its log; False if its record was already gone.

        cancel_reason: first stop it CANCELLED if it runs or waits here (a delete). None: only drop it from
        this replica's queue (expiry, which never removes a discussion running here).
        """
        if cancel_reason is not None:
            stopped = await self._stop(discussion_id, session_pb2.DISCUSSION_STATUS_CANCELLED, cancel_reason)
        else:
            stopped = await self._drop_queued(discussion_id)
        stored = None if stopped else await self._store.get(discussion_id)
        removed = await self._store.delete(discussion_id)
        if stored is not None and stored.status in UNFINISHED_STATUSES:
            # Another replica runs (or queues) it: free its slot now, after the record is gone so nobody
            # adopts it; that replica finds its lease gone at its next renewal and stops, writing nothing.
            await self._release(discussion_id)
        await self._agents.release(discussion_id)
        remove_session_log(discussion_id)
        return removed

    async def _cancel_here(self, discussion_id: str) -> None:
        """Cancel a discussion another replica was asked to cancel, if this replica runs or queues it."""
        if self.is_here(discussion_id) and await self._stop(
            discussion_id, session_pb2.DISCUSSION_STATUS_CANCELLED, CANCEL_REASON
        ):
            await self._agents.release(discussion_id)

    async def _cancel_elsewhere(self, discussion_id: str) -> Discussion | None:
        """Ask the replica running or queueing the discussion to cancel it; its document once ended or timed out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_ELSEWHERE_TIMEOUT_SECONDS
        next_request = loop.time()
        while True:
            heard = 1
            if loop.time() >= next_request:
                heard = await self._cancel_relay.request(discussion_id)
                next_request = loop.time() + CANCEL_REPEAT_SECONDS
            found = await self._store.get(discussion_id)
            # Nobody heard (one replica, or none subscribed): nobody will end it, waiting is pointless.
            if found is None or is_terminal(found.status) or not heard or loop.time() >= deadline:
                return found
            await asyncio.sleep(CANCEL_POLL_SECONDS)

    async def _check_retention(self, owner: str) -> None:
        count, earliest_expiry = await self._store.owned(owner)
        if count >= self._max_retained:
            retry_after = max((earliest_expiry or time.time()) - time.time(), 1.0)
            raise ResourceExhausted(
                f"you have {count} stored discussions, the most one caller may keep; delete some "
                "(DeleteDiscussion) or wait for the oldest to expire",
                retry_after_seconds=retry_after,
                subject=f"principal:{owner}",
                limit="max_retained_discussions_per_principal",
            )

    async def _fold_recorded_events(self, doc: Discussion) -> None:
        """Fold in the events recorded since the document was saved (its replica saves it only at milestones)."""
        while events := await self._store.events_after(doc.discussion_id, doc.last_sequence, EVENTS_PER_READ):
            for event in events:
                apply_event(doc, event)
            if len(events) < EVENTS_PER_READ:
                return

    async def _touch(self, doc: Discussion) -> None:
        """Record an access, at most once per tenth of the ttl (or minute), so reads stay cheap."""
        now = time.time()
        ttl_seconds = doc.ttl.ToNanoseconds() / 1e9
        last = doc.last_accessed_at.ToNanoseconds() / 1e9
        if now - last < min(60.0, ttl_seconds / 10):
            return
        expires_at = now + ttl_seconds
        doc.last_accessed_at.FromNanoseconds(int(now * 1e9))
        doc.expires_at.FromNanoseconds(int(expires_at * 1e9))
        live = self._live(doc.discussion_id)
        if live is not None:
            live.doc.last_accessed_at.CopyFrom(doc.last_accessed_at)
            live.doc.expires_at.CopyFrom(doc.expires_at)
        # One statement that only moves the times forward: safe beside the runner's saves.
        await self._store.touch(doc.discussion_id, now, expires_at)

    async def _keep_leases(self) -> None:
        """Renew leases, admit queued discussions into lapsed slots, time out queued ones, and about once a
        ttl let go of queued ones removed elsewhere and adopt orphans."""
        ticks = 0
        while True:
            await asyncio.sleep(self._lease_ttl_seconds / 3)
            with contextlib.suppress(Exception):
                await self._renew_leases()
                self._promote(await self._admission.reap())
                await self._time_out_queued()
                ticks += 1
                if self._shared_state and ticks % 3 == 0:  # about once a ttl
                    await self._drop_removed_queued()
                    # Not while draining: what this replica suspends is for another replica (or its restart).
                    if self.accepting:
                        # While running, only RUNNING discussions whose lease lapsed are orphans (their
                        # replica died); a queued one is still in some replica's queue.
                        await self.resume_leftovers(running_only=True)

    async def _renew_leases(self) -> None:
        for discussion_id in list(self._running):
            if await self._admission.renew(discussion_id):
                continue
            live = self._running.get(discussion_id)
            if live is None:
                continue
            if not self._shared_state:
                # One replica: nobody else can have taken it; the loop only stalled. Keep running.
                await self._admission.admit_unchecked(discussion_id, live.owner)
                continue
            # Its lease lapsed (this replica stalled past the ttl): another may own it now.
            logger.warning("admission lease of %s lapsed; giving the discussion up", discussion_id)
            self._runner.abandon(live)

    async def _time_out_queued(self) -> None:
        """End the queued discussions whose deadline passed while they waited: TIMED_OUT, never run."""
        now = time.time()
        for discussion_id, queued in list(self._queued.items()):
            deadline = deadline_of(queued.doc)
            if deadline is not None and deadline <= now:
                await self._stop(discussion_id, session_pb2.DISCUSSION_STATUS_TIMED_OUT, timed_out_reason(queued.doc))

    async def _drop_removed_queued(self) -> None:
        """Let go of queued discussions whose record another replica removed (a delete there, or its sweep)."""
        for discussion_id in list(self._queued):
            if await self._store.get(discussion_id) is None:
                logger.info("discussion %s was removed while it waited; it leaves the queue", discussion_id)
                await self._drop_queued(discussion_id)


def _new_document(new: NewDiscussion, admitted: bool) -> Discussion:
    now = now_timestamp()
    doc = Discussion(
        discussion_id=new.discussion_id,
        topic=new.topic,
        status=session_pb2.DISCUSSION_STATUS_RUNNING if admitted else session_pb2.DISCUSSION_STATUS_QUEUED,
        personas=new.personas,
        rounds=new.rounds,
        created_at=now,
        updated_at=now,
        last_accessed_at=now,
        request_id=new.request_id,
        token_budget=new.token_budget,
    )
    doc.ttl.FromNanoseconds(int(new.ttl_seconds * 1e9))
    doc.expires_at.FromNanoseconds(now.ToNanoseconds() + doc.ttl.ToNanoseconds())
    if new.timeout_seconds:
        # Stored with the discussion: the runner (here, after a restart, or on another replica) keeps it.
        doc.timeout.FromNanoseconds(int(new.timeout_seconds * 1e9))
    return doc


def _terminal_event(doc: Discussion) -> DiscussionEvent:
    """The terminal status event of a finished document, rebuilt from it (its owner never appended it)."""
    return DiscussionEvent(
        discussion_id=doc.discussion_id,
        sequence=doc.last_sequence,
        time=doc.updated_at,
        status_changed=session_pb2.StatusChanged(status=doc.status, error=doc.error),
    )
