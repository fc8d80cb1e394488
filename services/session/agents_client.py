"""The session service's one port to the agent service: run a discussion, release its agent set, list personas.

Only this module of the session service speaks gRPC to the agents. It sends `x-session-id` (so a load
balancer keeps a session on one agent replica), bounds the RunDiscussion calls open at once, tells a lost
agent replica (whose round can be re-run elsewhere) from a failure a re-run would not fix, and raises
domain errors, so the runner above it never sees a gRPC status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

import grpc
from google.protobuf.message import Message

from services.gen.roundtable.agents.v1 import agents_pb2, agents_pb2_grpc
from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2
from services.session.metrics import AGENT_RUNS_WAITING
from services.shared.client import client_interceptors, dependency_health_check
from services.shared.errors import Unavailable
from services.shared.health import HealthCheck
from services.shared.tls import ClientTlsSettings, create_channel

logger = logging.getLogger(__name__)

# An agent event: its kind (the DiscussionEvent field it fills, e.g. "agent_delta") and its payload.
AgentEvent: TypeAlias = tuple[str, Message]
# The events of one discussion that arrived together (recorded together: one store write, one wake-up).
AgentEvents: TypeAlias = list[AgentEvent]

# A lost agent replica (connection reset, drained, ejected): its round can be re-run on another.
REPLICA_LOST_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
RELEASE_TIMEOUT_SECONDS = 5.0
PERSONAS_TIMEOUT_SECONDS = 5.0


class AgentRunFailed(Exception):
    """A RunDiscussion call ended before the discussion did; `replica_lost` says a re-run elsewhere may succeed."""

    def __init__(self, code_name: str, details: str, *, replica_lost: bool) -> None:
        super().__init__(f"{code_name}: {details}")
        self.code_name = code_name
        self.details = details
        self.replica_lost = replica_lost


@dataclass(frozen=True)
class PersonaInfo:
    """One persona the agent service offers: its canonical name, other accepted names, and whether it moderates."""

    name: str
    aliases: tuple[str, ...] = ()
    moderator: bool = False


@dataclass(frozen=True)
class Roster:
    """What the agent service offers: its personas and the default panel."""

    personas: tuple[PersonaInfo, ...]
    default_roster: tuple[str, ...] = ()


class AgentsClient(Protocol):
    """The agent service as the session service uses it."""

    def run(self, doc: session_pb2.Discussion, principal: str) -> AsyncIterator[AgentEvents]:
        """Run the rest of a discussion from its document (resuming after its completed rounds): its agent events,
        in order, in the batches they arrived in.

        Raises AgentRunFailed when the call ends early.
        """
        ...

    async def release(self, discussion_id: str) -> None:
        """Ask the agent service to drop the discussion's agent set now (best effort, never raises)."""
        ...

    async def roster(self) -> Roster:
        """The personas on offer; raises Unavailable when the agent service cannot be reached."""
        ...


@dataclass
class RunCap:
    """At most `limit` RunDiscussion calls open at once; the rest wait here, counted.

    Here, not in gRPC core's queue, where an overloaded agent service would let them time out unseen.
    """

    limit: int
    waiting: int = 0
    _semaphore: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._semaphore = asyncio.Semaphore(self.limit)

    async def acquire(self) -> None:
        """Wait for a free call."""
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1

    def release(self) -> None:
        """Give a call back."""
        self._semaphore.release()


class GrpcAgentsClient:
    """The agent service over one gRPC channel."""

    def __init__(self, channel: grpc.aio.Channel, *, call_timeout_seconds: float, max_concurrent_runs: int) -> None:
        self._channel = channel
        self._stub: agents_pb2_grpc.AgentServiceAsyncStub = agents_pb2_grpc.AgentServiceStub(channel)
        self._call_timeout_seconds = call_timeout_seconds
        self._runs = RunCap(max_concurrent_runs)
        AGENT_RUNS_WAITING.set_function(lambda: self._runs.waiting)

    async def run(self, doc: session_pb2.Discussion, principal: str) -> AsyncIterator[AgentEvents]:
        """Run the rest of the discussion as one RunDiscussion call; its events as they arrive, one a batch."""
        request = run_request(doc, principal)
        await self._runs.acquire()
        try:
            call = self._stub.RunDiscussion(
                request, timeout=self._call_timeout_seconds, metadata=(("x-session-id", doc.discussion_id),)
            )
            delivered = False
            try:
                async for agent_event in call:
                    kind = agent_event.WhichOneof("event")
                    if kind is None:
                        continue
                    delivered = True
                    yield [(kind, getattr(agent_event, kind))]
            except grpc.aio.AioRpcError as error:
                raise _classified(error, delivered) from error
            finally:
                call.cancel()
        finally:
            self._runs.release()

    async def release(self, discussion_id: str) -> None:
        """Drop the agent set now, on the replica the discussion's own id routes to."""
        await self._release_call(discussion_id, routing_key=discussion_id)

    async def _release_call(self, discussion_id: str, *, routing_key: str) -> None:
        """ReleaseSession routed by `routing_key` (x-session-id); a failure is logged (the agent service also
        reclaims idle sets itself)."""
        try:
            await self._stub.ReleaseSession(
                agents_pb2.ReleaseSessionRequest(session_id=discussion_id),
                timeout=RELEASE_TIMEOUT_SECONDS,
                metadata=(("x-session-id", routing_key),),
            )
        except grpc.aio.AioRpcError as error:
            logger.warning("could not release agent set of %s: %s", discussion_id, error.code().name)

    async def roster(self) -> Roster:
        """The personas on offer, fetched now."""
        try:
            response = await self._stub.ListPersonas(agents_pb2.ListPersonasRequest(), timeout=PERSONAS_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            raise Unavailable(
                f"the agent service is unavailable ({error.code().name}); retry with the same request_id"
            ) from error
        return Roster(
            personas=tuple(PersonaInfo(p.name, tuple(p.aliases), p.moderator) for p in response.personas),
            default_roster=tuple(response.default_roster),
        )

    def health_check(self) -> HealthCheck:
        """A check that fails while the agent service does not report SERVING."""
        return dependency_health_check(self._channel, "roundtable.agents.v1.AgentService")

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()


def agents_channel(address: str, tls: ClientTlsSettings, *, max_message_bytes: int) -> grpc.aio.Channel:
    """A channel to the agent service (no I/O until the first call)."""
    return create_channel(
        address,
        tls,
        interceptors=client_interceptors(),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # The runner re-issues lost agent runs itself (runner.py); gRPC's own retry support keeps a
            # replay buffer per call, ~5.6 KB per held discussion, for nothing.
            ("grpc.enable_retries", 0),
        ],
    )


def run_request(doc: session_pb2.Discussion, principal: str) -> agents_pb2.RunDiscussionRequest:
    """The RunDiscussion request that continues the discussion after its completed rounds, within its budget."""
    budget = doc.token_budget
    if budget:
        budget = max(budget - doc.usage.total_tokens, 1)
    return agents_pb2.RunDiscussionRequest(
        session_id=doc.discussion_id,
        topic=doc.topic,
        personas=doc.personas,
        rounds=doc.rounds,
        token_budget=budget,
        principal=principal,
        start_round=doc.completed_rounds + 1,
        prior_answers=prior_answers(doc),
    )


def prior_answers(doc: session_pb2.Discussion) -> Sequence[agents_pb2.PriorAnswer]:
    """The answers of every finished round, for resuming after them."""
    return [
        agents_pb2.PriorAnswer(agent=r.agent, round=r.round, text=r.text)
        for r in doc.results
        if r.status == discussion_pb2.AGENT_STATUS_COMPLETED and r.round <= doc.completed_rounds
    ]


def _classified(error: grpc.aio.AioRpcError, delivered: bool) -> AgentRunFailed:
    # CANCELLED that the runner did not ask for (its own arrives as CancelledError) before any event:
    # gRPC core dropped the call unseen (the agent loop was overloaded). Safe to re-issue.
    dropped_unseen = error.code() == grpc.StatusCode.CANCELLED and not delivered
    return AgentRunFailed(
        error.code().name,
        error.details() or "",
        replica_lost=error.code() in REPLICA_LOST_CODES or dropped_unseen,
    )
