"""The agent service as the shared server host runs it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from prometheus_client import Gauge

from services.agents.agent_set import AgentSetRegistry
from services.agents.discussion import StreamingLimits
from services.agents.llm import Backend, LLMRouter
from services.agents.llm_budget import BudgetLimits, LLMBudget, build_budget
from services.agents.personas import PersonaRegistry
from services.agents.servicer import SIMULATOR_NOTICE, AgentServicer
from services.agents.settings import AgentsSettings
from services.gen.roundtable.agents.v1 import agents_pb2_grpc
from services.shared.reporter import InstanceLoad

logger = logging.getLogger(__name__)

LIVE_AGENT_SETS = Gauge("roundtable_agent_sets_live", "Agent sets alive on this agent replica.")


class AgentsService:
    """Owns the persona registry, the agent sets and the LLM client of one replica."""

    name: str = "agents"
    grpc_services: Sequence[str] = ("roundtable.agents.v1.AgentService",)

    def __init__(self, settings: AgentsSettings, llm: LLMRouter | None = None) -> None:
        self.settings = settings
        self.personas = PersonaRegistry.load(settings.personas_file)
        self.registry = AgentSetRegistry(settings.max_agent_sets)
        default = Backend(
            name=settings.llm_backend,
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key,
            model=settings.llm_model,
            client=settings.llm_client,
            organization=settings.llm_organization,
            project=settings.llm_project,
            requests_per_minute=settings.llm_requests_per_minute,
            tokens_per_minute=settings.llm_tokens_per_minute,
        )
        extra = [
            Backend(
                name=b.name,
                base_url=b.base_url,
                api_key=b.api_key or settings.llm_api_key,
                model=b.model,
                client=b.client or settings.llm_client,
                organization=b.organization,
                project=b.project,
                requests_per_minute=b.requests_per_minute,
                tokens_per_minute=b.tokens_per_minute,
            )
            for b in self.personas.backends.values()
        ]
        # The LLM budget this service made (and closes); none when an LLM client is handed in.
        self.llm_budget: LLMBudget | None = None
        if llm is None:
            self.llm_budget = _budget([default, *extra], settings)
            llm = LLMRouter(
                default=default,
                extra=extra,
                temperature=settings.llm_temperature,
                max_tokens=settings.llm_max_tokens,
                max_retries=settings.llm_max_retries,
                max_concurrent_calls=settings.max_concurrent_llm_calls,
                budget=self.llm_budget,
            )
        self.llm = llm
        self.servicer = AgentServicer(
            personas=self.personas,
            registry=self.registry,
            llm=self.llm,
            limits=StreamingLimits(
                flush_chars=settings.delta_flush_chars,
                flush_interval_seconds=settings.delta_flush_interval_ms / 1000,
                llm_timeout_seconds=settings.llm_timeout_seconds,
                max_tokens=settings.llm_max_tokens,
            ),
            release_grace_seconds=settings.release_grace_seconds,
            describe=self.llm.describe,
        )
        LIVE_AGENT_SETS.set_function(lambda: len(self.registry))

    def register(self, server: grpc.aio.Server) -> None:
        """Add the AgentService servicer."""
        agents_pb2_grpc.add_AgentServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        """Say loudly which backend answers, so nobody mistakes simulated text for a model's."""
        if self.settings.llm_backend == "simulator":
            logger.warning("%s (%s)", SIMULATOR_NOTICE, self.settings.llm_base_url)
        else:
            logger.info(
                "LLM backend: %s, model %s at %s",
                self.settings.llm_backend,
                self.settings.llm_model,
                self.settings.llm_base_url,
            )

    async def drain(self, grace_seconds: float) -> None:
        """In-flight RunDiscussion streams finish within the server's grace period."""

    async def close(self) -> None:
        """Drop every agent set, close the LLM connection pools and release the LLM budget."""
        self.registry.release_all()
        await self.llm.close()
        if self.llm_budget is not None:
            await self.llm_budget.close()

    def load(self) -> InstanceLoad:
        """Live agent sets, for monitor reports."""
        return InstanceLoad(live_agent_sets=len(self.registry))


def _budget(backends: list[Backend], settings: AgentsSettings) -> LLMBudget:
    """One budget for every backend, keyed by endpoint and API key: backends that share a key share its quota."""
    limits: dict[str, BudgetLimits] = {}
    names: dict[str, str] = {}
    for backend in backends:
        key = backend.budget_key
        names.setdefault(key, backend.name)
        known = limits.get(key)
        # Two backend names on one key with different quotas: the smaller (non-zero) of each holds.
        limits[key] = BudgetLimits(
            requests_per_minute=_smaller_limit(known.requests_per_minute if known else 0, backend.requests_per_minute),
            tokens_per_minute=_smaller_limit(known.tokens_per_minute if known else 0, backend.tokens_per_minute),
        )
    return build_budget(
        limits,
        redis_url=settings.llm_budget_redis_url,
        when_redis_down=settings.llm_budget_when_redis_down,
        names=names,
    )


def _smaller_limit(first: int, second: int) -> int:
    """The smaller of two per-minute limits, where 0 means none."""
    return min(first, second) if first and second else first or second
