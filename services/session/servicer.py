"""SessionService servicer: the public contract, translated to identity, limits and the discussions.

Callers name discussions by their own ids; everything below this class knows them by store ids,
scoped to their owner (services/session/ids.py): ids are translated here, on the way in and out.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator

import grpc

from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from services.session import validation
from services.session.auth import Authenticator
from services.session.discussions import (
    CANCEL_ELSEWHERE_TIMEOUT_SECONDS,
    AlreadyEnded,
    CancelNotConfirmed,
    Discussions,
    IdTaken,
    NewDiscussion,
    UnknownDiscussion,
)
from services.session.ids import IdScope
from services.session.metrics import ADMISSIONS_REJECTED, STREAM_SUBSCRIBERS
from services.session.personas import PersonaCatalog
from services.session.rate_limit import RateLimiter
from services.session.settings import MAX_DISCUSSION_TIMEOUT_SECONDS, SessionSettings
from services.shared.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.shared.logs import session_context

logger = logging.getLogger(__name__)

# Room left in a response for framing and the page token.
RESPONSE_MARGIN_BYTES = 4096


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    """Creates, reads, streams, cancels, lists and deletes discussions, each the caller's own."""

    def __init__(
        self,
        *,
        settings: SessionSettings,
        discussions: Discussions,
        personas: PersonaCatalog,
        authenticator: Authenticator,
        rate_limiter: RateLimiter,
        id_scope: IdScope,
    ) -> None:
        self._settings = settings
        self._discussions = discussions
        self._ids = id_scope
        self._personas = personas
        self._auth = authenticator
        self._rate = rate_limiter

    async def CreateDiscussion(
        self, request: session_pb2.CreateDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Discussion:
        """Authenticate, validate, then admit (or queue), store and start the discussion."""
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
        personas = await self._personas.resolve(list(request.personas), summary=not request.skip_summary)
        public_id, proposed = self._new_id(context)
        new = NewDiscussion(
            discussion_id=self._ids.store_id(owner, public_id),
            topic=topic,
            personas=personas,
            rounds=rounds,
            request_id=request_id,
            token_budget=token_budget,
            ttl_seconds=ttl_seconds,
            timeout_seconds=timeout_seconds,
            proposed_id=proposed,
        )
        try:
            doc, created = await self._discussions.create(owner, new)
        except IdTaken as taken:
            raise AlreadyExists(f"discussion id {public_id} (x-session-id) is taken; propose another") from taken
        if created:
            with session_context(new.discussion_id):
                # Its log file is named by the store id: this line lets `logs search <caller's id>` find it.
                logger.info("created for principal %s, who knows it as %s", owner, public_id)
        return self._as_public(doc, owner)

    async def GetDiscussion(
        self, request: session_pb2.GetDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Discussion:
        """The whole document; touches last_accessed_at."""
        owner = await self._caller(context, self._settings.read_cost)
        doc = await self._read(request.discussion_id, owner, touch=True)
        return self._as_public(doc, owner)

    async def StreamDiscussion(
        self, request: session_pb2.StreamDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[session_pb2.DiscussionEvent]:
        """Replay events after after_sequence, then follow live until the discussion is terminal."""
        owner = await self._caller(context, self._settings.read_cost)
        if request.after_sequence < 0:
            raise InvalidArgument("after_sequence must not be negative", "after_sequence")
        doc = await self._read(request.discussion_id, owner, fold_events=False, touch=True)
        STREAM_SUBSCRIBERS.inc()
        try:
            async for event in self._discussions.follow(doc.discussion_id, request.after_sequence):
                event.discussion_id = request.discussion_id
                yield event
        finally:
            STREAM_SUBSCRIBERS.dec()

    async def CancelDiscussion(
        self, request: session_pb2.CancelDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.Discussion:
        """Stop the agents now (or leave the queue); CANCELLED, partial results kept."""
        owner = await self._caller(context, self._settings.read_cost)
        store_id = self._store_id(request.discussion_id, owner)
        try:
            doc = await self._discussions.cancel(store_id, owner)
        except UnknownDiscussion as unknown:
            raise _not_found(request.discussion_id) from unknown
        except AlreadyEnded as ended:
            raise FailedPrecondition(
                f"discussion {request.discussion_id} is already {session_pb2.DiscussionStatus.Name(ended.status)}"
            ) from ended
        except CancelNotConfirmed as silent:
            raise Unavailable(
                f"discussion {request.discussion_id} did not end within {CANCEL_ELSEWHERE_TIMEOUT_SECONDS:g} s: "
                "the replica running it is not answering (another takes it over within a lease ttl); retry"
            ) from silent
        return self._as_public(doc, owner)

    async def ListDiscussions(
        self, request: session_pb2.ListDiscussionsRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.ListDiscussionsResponse:
        """The caller's discussions, newest first."""
        owner = await self._caller(context, self._settings.read_cost)
        page_size = validation.page_size(request.page_size)
        if request.status not in session_pb2.DiscussionStatus.values():
            raise InvalidArgument(f"status {request.status} is not a DiscussionStatus", "status")
        discussions, next_token = await self._discussions.list_page(
            owner,
            request.status,
            page_size,
            request.page_token,
            max_bytes=self._settings.max_message_bytes - RESPONSE_MARGIN_BYTES,
        )
        # Page tokens hold store ids (the store's keyset); the discussions go out under their owner's ids.
        for discussion in discussions:
            discussion.discussion_id = self._ids.public_id(owner, discussion.discussion_id)
        return session_pb2.ListDiscussionsResponse(discussions=discussions, next_page_token=next_token)

    async def DeleteDiscussion(
        self, request: session_pb2.DeleteDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.DeleteDiscussionResponse:
        """Remove the discussion, its events and its agent set."""
        owner = await self._caller(context, self._settings.read_cost)
        store_id = self._store_id(request.discussion_id, owner)
        try:
            await self._discussions.delete(store_id, owner)
        except UnknownDiscussion as unknown:
            raise _not_found(request.discussion_id) from unknown
        return session_pb2.DeleteDiscussionResponse()

    def _new_id(self, context: grpc.aio.ServicerContext) -> tuple[str, bool]:
        """The caller's id for the new discussion — fresh, or the one proposed in x-session-id (so a load
        balancer hashing on it sends the create to the replica that will serve the rest of the discussion)
        — and whether it was proposed."""
        proposed = next((v for k, v in context.invocation_metadata() or () if k == "x-session-id"), None)
        if proposed is None:
            return secrets.token_hex(16), False
        text = proposed.decode(errors="replace") if isinstance(proposed, bytes) else proposed
        if not validation.DISCUSSION_ID.fullmatch(text):
            raise InvalidArgument(
                "x-session-id must be 32 lowercase hex characters to name a new discussion", "x-session-id"
            )
        return text, True

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

    def _store_id(self, discussion_id: str, owner: str) -> str:
        """The store id of the caller's discussion id (validated)."""
        validation.discussion_id(discussion_id)
        return self._ids.store_id(owner, discussion_id)

    async def _read(
        self, discussion_id: str, owner: str, *, fold_events: bool = True, touch: bool = False
    ) -> session_pb2.Discussion:
        """The caller's discussion; NOT_FOUND for unknown ids and others' ones alike."""
        try:
            return await self._discussions.read(
                self._store_id(discussion_id, owner), owner, fold_events=fold_events, touch=touch
            )
        except UnknownDiscussion as unknown:
            raise _not_found(discussion_id) from unknown

    def _as_public(self, doc: session_pb2.Discussion, owner: str) -> session_pb2.Discussion:
        """The document under the id its owner knows (mapped back from the store id)."""
        doc.discussion_id = self._ids.public_id(owner, doc.discussion_id)
        return doc

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


def _not_found(discussion_id: str) -> NotFound:
    return NotFound(f"discussion {discussion_id} not found (it may have expired or been deleted)")
