"""AgentService servicer: translates the internal contract to agent sets and discussion runs."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from services.agents.agent_set import AgentSetRegistry
from services.agents.discussion import DiscussionRun, StreamingLimits
from services.agents.lanes import Lane
from services.agents.llm import CallOptions, LLMClient
from services.agents.personas import PersonaRegistry
from services.gen.roundtable.agents.v1 import agents_pb2, agents_pb2_grpc
from services.shared.errors import FailedPrecondition, InvalidArgument
from services.shared.limits import MAX_ROUNDS, MAX_SESSION_ID_CHARS, MAX_TOPIC_CHARS

logger = logging.getLogger(__name__)

SIMULATOR_NOTICE = "LLM backend is the built-in SIMULATOR: answers are synthetic filler, not a language model's text"


class AgentServicer(agents_pb2_grpc.AgentServiceServicer):
    """Runs discussions with one fresh agent set per session."""

    def __init__(
        self,
        *,
        personas: PersonaRegistry,
        registry: AgentSetRegistry,
        llm: LLMClient,
        limits: StreamingLimits,
        release_grace_seconds: float,
        describe: Callable[[CallOptions], tuple[str, str]],
    ) -> None:
        self._personas = personas
        self._registry = registry
        self._llm = llm
        self._limits = limits
        self._release_grace_seconds = release_grace_seconds
        self._describe = describe

    async def ListPersonas(
        self, request: agents_pb2.ListPersonasRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.ListPersonasResponse:
        """The personas, the default roster and the backend and model answering for each."""
        personas = []
        for p in self._personas.personas.values():
            backend, model = self._describe(p.call_options)
            personas.append(
                agents_pb2.Persona(
                    name=p.name,
                    aliases=p.aliases,
                    description=p.description,
                    moderator=p.moderator,
                    backend=backend,
                    model=model,
                )
            )
        backend, model = self._describe(CallOptions())
        simulated = backend == "simulator" or any(p.backend == "simulator" for p in personas)
        return agents_pb2.ListPersonasResponse(
            personas=personas,
            default_roster=self._personas.default_roster,
            backend=backend,
            model=model,
            notice=SIMULATOR_NOTICE if simulated else "",
        )

    async def RunDiscussion(
        self, request: agents_pb2.RunDiscussionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agents_pb2.AgentEvent]:
        """Run the rounds and the summary for one session, streaming every event."""
        remaining = context.time_remaining()
        async for event in self.run_events(request, None if remaining is None else time.monotonic() + remaining):
            yield event

    async def RunLane(
        self, requests: AsyncIterator[agents_pb2.RunLaneRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agents_pb2.RunLaneResponse]:
        """Many sessions' runs over one stream: runs, cancels, releases and credit in; batched events out."""
        async for response in Lane(self.run_events, self._registry.release).serve(requests):
            yield response

    async def run_events(
        self, request: agents_pb2.RunDiscussionRequest, deadline: float | None
    ) -> AsyncIterator[agents_pb2.AgentEvent]:
        """Validate the request, then run its rounds and summary with the session's agent set (monotonic deadline)."""
        if not request.session_id or len(request.session_id) > MAX_SESSION_ID_CHARS:
            raise InvalidArgument(f"session_id must be 1 to {MAX_SESSION_ID_CHARS} characters", "session_id")
        if not request.topic.strip() or len(request.topic) > MAX_TOPIC_CHARS:
            raise InvalidArgument(f"topic must be 1 to {MAX_TOPIC_CHARS} characters", "topic")
        if not 1 <= request.rounds <= MAX_ROUNDS:
            raise InvalidArgument(f"rounds must be between 1 and {MAX_ROUNDS}", "rounds")
        personas = []
        for name in request.personas:
            persona = self._personas.resolve(name)
            if persona is None:
                raise InvalidArgument(f"unknown persona {name!r}", "personas")
            personas.append(persona)
        if not any(not p.moderator for p in personas):
            raise InvalidArgument("at least one persona other than the moderator is needed", "personas")
        if request.token_budget < 0:
            raise InvalidArgument("token_budget must be 0 (no limit) or positive", "token_budget")
        if not 0 <= request.start_round <= request.rounds + 1:
            raise InvalidArgument(f"start_round must be between 0 and rounds + 1 ({request.rounds + 1})", "start_round")
        prior: dict[int, dict[str, str]] = {}
        for answer in request.prior_answers:
            if not 1 <= answer.round < max(request.start_round, 1):
                raise InvalidArgument("prior_answers may only hold rounds before start_round", "prior_answers")
            prior.setdefault(answer.round, {})[answer.agent] = answer.text
        existing = self._registry.get(request.session_id)
        if existing is not None and existing.running:
            raise FailedPrecondition(f"session {request.session_id} is already running on this replica")
        agent_set = self._registry.acquire(request.session_id, personas)
        agent_set.running = True
        run = DiscussionRun(
            agent_set=agent_set,
            topic=request.topic,
            persona_names=[p.name for p in personas],
            rounds=request.rounds,
            llm=self._llm,
            limits=self._limits,
            deadline=deadline,
            start_round=request.start_round,
            prior_answers=prior,
            token_budget=request.token_budget,
            principal=request.principal,
        )
        try:
            async for event in run.events():
                yield event
        finally:
            agent_set.running = False
            self._registry.release_later(request.session_id, self._release_grace_seconds)

    async def ReleaseSession(
        self, request: agents_pb2.ReleaseSessionRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.ReleaseSessionResponse:
        """Drop the session's agent set now."""
        return agents_pb2.ReleaseSessionResponse(released=self._registry.release(request.session_id))

    async def GetAgentStats(
        self, request: agents_pb2.GetAgentStatsRequest, context: grpc.aio.ServicerContext
    ) -> agents_pb2.AgentStats:
        """Live agent sets, and the queried session's agent instances."""
        stats = agents_pb2.AgentStats(
            live_agent_sets=len(self._registry),
            max_agent_sets=self._registry.max_agent_sets,
            created_agent_sets_total=self._registry.created_total,
            released_agent_sets_total=self._registry.released_total,
        )
        if request.session_id:
            agent_set = self._registry.get(request.session_id)
            if agent_set is not None:
                stats.session_present = True
                for name, agent in agent_set.agents.items():
                    stats.session_agent_instances[name] = agent.instance_id
        return stats
