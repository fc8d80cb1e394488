"""SessionService servicer: the public contract, translated to identity, limits, the store and the runner."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator

import grpc

from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from services.session import validation
from services.session.admission import Admission
from services.session.auth import Authenticator
from services.session.cancel_relay import CancelRelay
from services.session.document import apply_event
from services.session.ids import IdScope
from services.session.memory_watch import MemoryWatch
from services.session.metrics import ADMISSIONS_REJECTED, DISCUSSIONS_CREATED, STREAM_SUBSCRIBERS
from services.session.notifier import EventNotifier
from services.session.personas import PersonaCatalog
from services.session.rate_limit import RateLimiter
from services.session.runner import DiscussionRunner, is_terminal, now_timestamp
from services.session.settings import MAX_DISCUSSION_TIMEOUT_SECONDS, SessionSettings
from services.session.stores.interface import (
    UNFINISHED_STATUSES,
    DiscussionExists,
    InvalidPageToken,
    Store,
    created_nanos,
    encode_page_token,
)
from services.shared.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.shared.logs import session_context
from services.shared.session_logs import remove_session_log

logger = logging.getLogger(__name__)

EVENTS_PER_READ = 256
# Room left in a response for framing and the page token.
RESPONSE_MARGIN_BYTES = 4096
# A reader re-checks the store this often even without a wake-up (belt and braces).
STREAM_POLL_SECONDS = 2.0
CANCEL_REASON = "cancelled by the client"
# How long a cancel through a replica that does not run the discussion waits for its owner to end it.
CANCEL_ELSEWHERE_TIMEOUT_SECONDS = 5.0
# While waiting, how often it looks at the document, and how often it repeats its request (pub/sub keeps nothing).
CANCEL_POLL_SECONDS = 0.05
CANCEL_REPEAT_SECONDS = 0.5
# How long a reader waits for the terminal event of a discussion whose document already says finished.
TERMINAL_EVENT_GRACE_SECONDS = 10.0


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    """Creates, reads, streams, cancels, lists and deletes discussions, each the caller's own.

    Callers name discussions by their own ids; everything below this class knows them by store ids,
    scoped to their owner (services/session/ids.py): ids are translated here, on the way in and out.
    """

    def __init__(
        self,
        *,
        settings: SessionSettings,
        store: Store,
        runner: DiscussionRunner,
        admission: Admission,
        notifier: EventNotifier,
        personas: PersonaCatalog,
        authenticator: Authenticator,
        rate_limiter: RateLimiter,
        memory_watch: MemoryWatch | None,
        id_scope: IdScope,
        cancel_relay: CancelRelay,
    ) -> None:
        self._settings = settings
        self._ids = id_scope
        self._store = store
        self._runner = runner
        self._admission = admission
        self._notifier = notifier
        self._personas = personas
        self._auth = authenticator
        self._rate = rate_limiter
        self._memory = memory_watch
        self._cancel_relay = cancel_relay
        self.accepting = True

    async def CreateDiscussion(
        self, request: session_pb2.CreateDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Discussion:
        """Authenticate, validate, admit (or queue), store, then start the discussion."""
        try:
            return await self._create(request, context)
        except ResourceExhausted as refused:
            ADMISSIONS_REJECTED.labels(refused.limit).inc()
            raise

    async def _create(
        self, request: session_pb2.CreateDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Discussion:
        owner = await self._caller(context, self._settings.create_cost)
        topic = validation.topic(request.topic, self._settings.max_topic_chars)
        rounds = validation.rounds(request.rounds, self._settings.max_rounds)
        request_id = validation.request_id(request.request_id)
        token_budget = validation.token_budget(request.token_budget)
        ttl_seconds = self._ttl_seconds(request)
        timeout_seconds = self._timeout_seconds(request)
        personas = await self._personas.resolve(list(request.personas))
        if not self.accepting:
            raise Unavailable("the server is shutting down; retry with the same request_id")
        if self._memory is not None:
            self._memory.check()
        await self._check_retention(owner)
        public_id, replay = await self._new_id(context, owner, request_id)
        if replay is not None:
            return self._as_public(replay, public_id)
        discussion_id = self._ids.store_id(owner, public_id)
        admitted = await self._admission.admit(discussion_id, owner)
        # False once the slot turns out to be another create's (a concurrent retry of the same create).
        release_on_failure = True
        submitted = False
        try:
            now = now_timestamp()
            doc = session_pb2.Discussion(
                discussion_id=discussion_id,
                topic=topic,
                status=session_pb2.DISCUSSION_STATUS_RUNNING if admitted else session_pb2.DISCUSSION_STATUS_QUEUED,
                personas=personas,
                rounds=rounds,
                created_at=now,
                updated_at=now,
                last_accessed_at=now,
                request_id=request_id,
                token_budget=token_budget,
            )
            doc.ttl.FromNanoseconds(int(ttl_seconds * 1e9))
            doc.expires_at.FromNanoseconds(now.ToNanoseconds() + doc.ttl.ToNanoseconds())
            if timeout_seconds:
                # Stored with the discussion: the runner (here, after a restart, or on another replica) keeps it.
                doc.timeout.FromNanoseconds(int(timeout_seconds * 1e9))
            try:
                stored = await self._store.create(owner, doc)
            except DiscussionExists as taken:
                # Only the caller's own discussions can hold this store id: this reveals nothing of others'.
                raise AlreadyExists(f"discussion id {public_id} (x-session-id) is taken; propose another") from taken
            if stored != doc:  # idempotent replay: the owner's earlier create with this request_id
                release_on_failure = stored.discussion_id != discussion_id
                live = self._runner.live(stored.discussion_id)
                return self._as_public(live.doc if live is not None else stored, owner=owner)
            await self._runner.submit(stored, owner, admitted)
            submitted = True
            DISCUSSIONS_CREATED.inc()
            with session_context(discussion_id):
                # Its log file is named by the store id: this line lets `logs search <caller's id>` find it.
                logger.info("created for principal %s, who knows it as %s", owner, public_id)
            return self._as_public(stored, public_id)
        finally:
            if not submitted and release_on_failure:
                self._runner.forget_promotion(discussion_id)
                self._runner.start_promoted(await self._admission.release(discussion_id))

    async def GetDiscussion(
        self, request: session_pb2.GetDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Discussion:
        """The whole document; touches last_accessed_at."""
        owner = await self._caller(context, self._settings.read_cost)
        doc = await self._visible(request.discussion_id, owner)
        await self._touch(doc)
        return self._as_public(doc, request.discussion_id)

    async def StreamDiscussion(
        self, request: session_pb2.StreamDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[session_pb2.DiscussionEvent]:
        """Replay events after after_sequence, then follow live until the discussion is terminal."""
        owner = await self._caller(context, self._settings.read_cost)
        if request.after_sequence < 0:
            raise InvalidArgument("after_sequence must not be negative", "after_sequence")
        doc = await self._visible(request.discussion_id, owner, fold_events=False)
        await self._touch(doc)
        STREAM_SUBSCRIBERS.inc()
        try:
            async for event in self._follow(doc.discussion_id, request.after_sequence):
                event.discussion_id = request.discussion_id
                yield event
        finally:
            STREAM_SUBSCRIBERS.dec()

    async def _follow(self, discussion_id: str, after_sequence: int) -> AsyncIterator[session_pb2.DiscussionEvent]:
        """The events after after_sequence: replayed from the store, then as they are recorded."""
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
            if self._runner.live(discussion_id) is not None:
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
            # Its owner saves the finished document before appending the terminal event (runner._record):
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

    async def CancelDiscussion(
        self, request: session_pb2.CancelDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Discussion:
        """Stop the agents now (or leave the queue); CANCELLED, partial results kept."""
        owner = await self._caller(context, self._settings.read_cost)
        doc = await self._visible(request.discussion_id, owner)
        if is_terminal(doc.status):
            raise FailedPrecondition(
                f"discussion {request.discussion_id} is already {session_pb2.DiscussionStatus.Name(doc.status)}"
            )
        stopped = await self._runner.stop(doc.discussion_id, session_pb2.DISCUSSION_STATUS_CANCELLED, CANCEL_REASON)
        if stopped:
            await self._runner.release_agents(doc.discussion_id)
            found = await self._store.get(doc.discussion_id)
        else:
            found = await self._cancel_elsewhere(doc.discussion_id)
        if found is None:
            raise NotFound(f"discussion {request.discussion_id} not found")
        if not is_terminal(found.status):
            raise Unavailable(
                f"discussion {request.discussion_id} did not end within {CANCEL_ELSEWHERE_TIMEOUT_SECONDS:g} s: "
                "the replica running it is not answering (another takes it over within a lease ttl); retry"
            )
        return self._as_public(found, request.discussion_id)

    async def _cancel_elsewhere(self, discussion_id: str) -> session_pb2.Discussion | None:
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

    async def ListDiscussions(
        self, request: session_pb2.ListDiscussionsRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.ListDiscussionsResponse:
        """The caller's discussions, newest first."""
        owner = await self._caller(context, self._settings.read_cost)
        page_size = validation.page_size(request.page_size)
        if request.status not in session_pb2.DiscussionStatus.values():
            raise InvalidArgument(f"status {request.status} is not a DiscussionStatus", "status")
        try:
            discussions, next_token = await self._store.list_page(owner, request.status, page_size, request.page_token)
        except InvalidPageToken as error:
            raise InvalidArgument(str(error), "page_token") from error
        # A page of long topics can outgrow the largest message: end it early and let the token go on.
        budget = self._settings.max_message_bytes - RESPONSE_MARGIN_BYTES
        size = 0
        for index, discussion in enumerate(discussions):
            size += discussion.ByteSize() + 8
            if size > budget and index > 0:
                last = discussions[index - 1]
                next_token = encode_page_token(created_nanos(last), last.discussion_id)
                discussions = discussions[:index]
                break
        # Page tokens hold store ids (the store's keyset); the discussions go out under their owner's ids.
        for discussion in discussions:
            discussion.discussion_id = self._ids.public_id(owner, discussion.discussion_id)
        return session_pb2.ListDiscussionsResponse(discussions=discussions, next_page_token=next_token)

    async def DeleteDiscussion(
        self, request: session_pb2.DeleteDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.DeleteDiscussionResponse:
        """Remove the discussion, its events and its agent set."""
        owner = await self._caller(context, self._settings.read_cost)
        doc = await self._visible(request.discussion_id, owner, fold_events=False)
        stopped = await self._runner.stop(
            doc.discussion_id, session_pb2.DISCUSSION_STATUS_CANCELLED, "deleted by the client"
        )
        await self._store.delete(doc.discussion_id)
        if not stopped and doc.status in UNFINISHED_STATUSES:
            # Another replica runs (or queues) it: free its slot now, after the record is gone so nobody
            # adopts it; that replica finds its lease gone at its next renewal and stops, writing nothing.
            self._runner.start_promoted(await self._admission.release(doc.discussion_id))
        await self._runner.release_agents(doc.discussion_id)
        remove_session_log(doc.discussion_id)
        return session_pb2.DeleteDiscussionResponse()

    async def _new_id(
        self, context: grpc.aio.ServicerContext, owner: str, request_id: str
    ) -> tuple[str, session_pb2.Discussion | None]:
        """The caller's id for the new discussion — fresh, or the one proposed in x-session-id (so a load
        balancer hashing on it sends the create to the replica that will serve the rest of the discussion)
        — and the caller's discussion this create repeats, if it is a replay (same id and request_id)."""
        proposed = next((v for k, v in context.invocation_metadata() or () if k == "x-session-id"), None)
        if proposed is None:
            return secrets.token_hex(16), None
        text = proposed.decode(errors="replace") if isinstance(proposed, bytes) else proposed
        if not validation.DISCUSSION_ID.fullmatch(text):
            raise InvalidArgument(
                "x-session-id must be 32 lowercase hex characters to name a new discussion", "x-session-id"
            )
        # Checked before admission, so a replay takes no slot (nor frees the one its original holds).
        existing = await self._store.get(self._ids.store_id(owner, text))
        if existing is None:
            return text, None
        if not (request_id and existing.request_id == request_id):
            raise AlreadyExists(f"discussion id {text} (x-session-id) is taken; propose another")
        live = self._runner.live(existing.discussion_id)
        return text, live.doc if live is not None else existing

    async def _caller(self, context: grpc.aio.ServicerContext, cost: int) -> str:
        """The authenticated principal, after charging the call to its rate limit."""
        principal = self._auth.principal(context.invocation_metadata())
        try:
            await self._rate.spend(principal, cost)
        except ResourceExhausted as refused:
            if cost != self._settings.create_cost:  # creates are counted once, in CreateDiscussion
                ADMISSIONS_REJECTED.labels(refused.limit).inc()
            raise
        return principal

    async def _check_retention(self, owner: str) -> None:
        count, earliest_expiry = await self._store.owned(owner)
        limit = self._settings.max_retained_discussions_per_principal
        if count >= limit:
            retry_after = max((earliest_expiry or time.time()) - time.time(), 1.0)
            raise ResourceExhausted(
                f"you have {count} stored discussions, the most one caller may keep; delete some "
                "(DeleteDiscussion) or wait for the oldest to expire",
                retry_after_seconds=retry_after,
                subject=f"principal:{owner}",
                limit="max_retained_discussions_per_principal",
            )

    async def _visible(self, discussion_id: str, owner: str, *, fold_events: bool = True) -> session_pb2.Discussion:
        """The caller's discussion under its store id, freshest copy; NOT_FOUND for unknown ids and others' ones.

        fold_events=False skips bringing another replica's document up to date, for callers that
        need only its id.
        """
        validation.discussion_id(discussion_id)
        not_found = NotFound(f"discussion {discussion_id} not found (it may have expired or been deleted)")
        discussion_id = self._ids.store_id(owner, discussion_id)
        live = self._runner.live(discussion_id)
        if live is not None:
            if live.owner != owner:
                raise not_found
            return _copy(live.doc)
        found = await self._store.get_with_owner(discussion_id)
        if found is None or found[1] != owner:
            raise not_found
        doc = found[0]
        if fold_events and not is_terminal(doc.status):
            await self._fold_recorded_events(doc)
        return doc

    def _as_public(
        self, doc: session_pb2.Discussion, public_id: str = "", *, owner: str = ""
    ) -> session_pb2.Discussion:
        """A copy of the document under the id its owner knows (given, or mapped back from the store id)."""
        copy = _copy(doc)
        copy.discussion_id = public_id or self._ids.public_id(owner, doc.discussion_id)
        return copy

    async def _fold_recorded_events(self, doc: session_pb2.Discussion) -> None:
        """Fold in the events recorded since the document was saved (its replica saves it only at milestones)."""
        while events := await self._store.events_after(doc.discussion_id, doc.last_sequence, EVENTS_PER_READ):
            for event in events:
                apply_event(doc, event)
            if len(events) < EVENTS_PER_READ:
                return

    async def _touch(self, doc: session_pb2.Discussion) -> None:
        """Record an access, at most once per tenth of the ttl (or minute), so reads stay cheap."""
        now = time.time()
        ttl_seconds = doc.ttl.ToNanoseconds() / 1e9
        last = doc.last_accessed_at.ToNanoseconds() / 1e9
        if now - last < min(60.0, ttl_seconds / 10):
            return
        expires_at = now + ttl_seconds
        doc.last_accessed_at.FromNanoseconds(int(now * 1e9))
        doc.expires_at.FromNanoseconds(int(expires_at * 1e9))
        live = self._runner.live(doc.discussion_id)
        if live is not None:
            live.doc.last_accessed_at.CopyFrom(doc.last_accessed_at)
            live.doc.expires_at.CopyFrom(doc.expires_at)
        # One statement that only moves the times forward: safe beside the runner's saves.
        await self._store.touch(doc.discussion_id, now, expires_at)

    def _ttl_seconds(self, request: session_pb2.CreateDiscussionRequest) -> float:
        maximum = self._settings.session_timeout_seconds
        if not request.HasField("ttl"):
            return maximum
        ttl = request.ttl.ToNanoseconds() / 1e9
        if ttl <= 0 or ttl > maximum:
            raise InvalidArgument(f"ttl must be above 0 and at most {maximum:.0f} seconds", "ttl")
        return ttl

    def _timeout_seconds(self, request: session_pb2.CreateDiscussionRequest) -> float:
        """The whole discussion's timeout (0: none): the request's, at most the server's; the server's if unset."""
        configured = self._settings.discussion_timeout_seconds
        if not request.HasField("timeout"):
            return configured
        maximum = configured or MAX_DISCUSSION_TIMEOUT_SECONDS
        timeout = request.timeout.ToNanoseconds() / 1e9
        if timeout <= 0 or timeout > maximum:
            raise InvalidArgument(f"timeout must be above 0 and at most {maximum:.0f} seconds", "timeout")
        return timeout


def _terminal_event(doc: session_pb2.Discussion) -> session_pb2.DiscussionEvent:
    """The terminal status event of a finished document, rebuilt from it (its owner never appended it)."""
    return session_pb2.DiscussionEvent(
        discussion_id=doc.discussion_id,
        sequence=doc.last_sequence,
        time=doc.updated_at,
        status_changed=session_pb2.StatusChanged(status=doc.status, error=doc.error),
    )


def _copy(doc: session_pb2.Discussion) -> session_pb2.Discussion:
    copy = session_pb2.Discussion()
    copy.CopyFrom(doc)
    return copy
