"""The session service as the shared server host runs it: its parts, wired together."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from services.gen.roundtable.session.v1 import session_pb2_grpc
from services.session.admission import Admission, MemoryAdmission
from services.session.agents_client import AgentsClient, GrpcAgentsClient, agents_channel
from services.session.agents_lanes import LaneAgentsClient
from services.session.auth import Authenticator, load_keys
from services.session.cancel_relay import CancelRelay, LocalCancelRelay
from services.session.discussions import Discussions
from services.session.expiry import ExpirySweeper
from services.session.ids import IdScope
from services.session.memory_watch import MemoryWatch
from services.session.metrics import DISCUSSION_CAPACITY
from services.session.personas import PersonaCatalog
from services.session.rate_limit import NoRateLimit, RateLimiter, WindowRateLimiter
from services.session.redis.admission import RedisAdmission
from services.session.redis.cancel_relay import RedisCancelRelay
from services.session.redis.connection import Client as RedisClient
from services.session.redis.connection import connect as connect_redis
from services.session.redis.rate_limit import RedisRateLimiter
from services.session.servicer import SessionServicer
from services.session.settings import SessionSettings
from services.session.stores.interface import Store
from services.session.stores.memory import MemoryStore
from services.session.stores.redis import RedisStore
from services.session.stores.sqlite import SqliteStore
from services.shared.health import HealthCheck, ping_check
from services.shared.reporter import InstanceLoad


@dataclass
class SessionParts:
    """The stateful parts of a session replica: where discussions live, who may run, who may call, who cancels."""

    store: Store
    admission: Admission
    rate_limiter: RateLimiter
    cancel_relay: CancelRelay
    # Shared with the other replicas (store, admission, limits and cancels live there); None: this replica alone.
    redis: RedisClient | None = None


async def open_parts(settings: SessionSettings) -> SessionParts:
    """The parts the settings name, opened: Redis shared by replicas, or SQLite / memory for one replica.

    Raises RedisUnavailable (naming the cause) if Redis does not answer.
    """
    if settings.store == "redis":
        # One connection pool for the store, admission, rate limits and cancels.
        redis = connect_redis(settings.redis_url, timeout_seconds=settings.redis_timeout_seconds)
        prefix = settings.redis_key_prefix
        return SessionParts(
            store=await RedisStore.open(redis, key_prefix=prefix),
            # Shared by every replica: max_concurrent_sessions is then a fleet-wide cap.
            admission=RedisAdmission(
                redis,
                capacity=settings.max_concurrent_sessions,
                max_queued=settings.max_queued_sessions,
                max_per_principal=settings.principal_cap,
                lease_ttl_seconds=settings.lease_ttl_seconds,
                replica_id=settings.instance_id,
                key_prefix=prefix,
            ),
            rate_limiter=(
                RedisRateLimiter(redis, settings.rate_limit_per_minute, key_prefix=prefix)
                if settings.enable_rate_limiting
                else NoRateLimit()
            ),
            # A cancel may reach a replica that does not run the discussion: it tells the one that does.
            cancel_relay=RedisCancelRelay(redis, key_prefix=prefix),
            redis=redis,
        )
    return SessionParts(
        store=await SqliteStore.open(settings.sqlite_path) if settings.store == "sqlite" else MemoryStore(),
        admission=MemoryAdmission(
            capacity=settings.max_concurrent_sessions,
            max_queued=settings.max_queued_sessions,
            max_per_principal=settings.principal_cap,
            lease_ttl_seconds=settings.lease_ttl_seconds,
        ),
        rate_limiter=(
            WindowRateLimiter(settings.rate_limit_per_minute) if settings.enable_rate_limiting else NoRateLimit()
        ),
        cancel_relay=LocalCancelRelay(),
    )


def _agents_client(settings: SessionSettings) -> GrpcAgentsClient:
    """The agents port the settings name: lanes (many discussions per stream) or one call per discussion."""
    channel = agents_channel(settings.agents_address, settings, max_message_bytes=settings.max_message_bytes)
    if settings.agents_transport == "calls":
        return GrpcAgentsClient(
            channel,
            call_timeout_seconds=settings.agents_call_timeout_seconds,
            max_concurrent_runs=settings.max_concurrent_agent_runs,
        )
    return LaneAgentsClient(
        channel,
        call_timeout_seconds=settings.agents_call_timeout_seconds,
        max_concurrent_runs=settings.max_concurrent_agent_runs,
        lane_count=settings.agent_lanes,
        lane_key_prefix=settings.instance_id,
        lane_max_age_seconds=settings.agent_lane_max_age_seconds,
    )


class SessionService:
    """One session replica: its parts (made from the settings, or given ready-made) and the servicer over them."""

    name: str = "session"
    grpc_services: Sequence[str] = ("roundtable.session.v1.SessionService",)

    def __init__(
        self, settings: SessionSettings, *, parts: SessionParts | None = None, agents: AgentsClient | None = None
    ) -> None:
        self.settings = settings
        self._given_parts = parts
        self._given_agents = agents
        self._parts: SessionParts | None = None
        self._agents: AgentsClient | None = None
        self._discussions: Discussions | None = None
        self._sweeper: ExpirySweeper | None = None
        self._servicer: SessionServicer | None = None
        self._id_scope: IdScope | None = None
        # Read now: a malformed keys file stops start-up before anything opens.
        self._authenticator = Authenticator(
            load_keys(settings.api_keys_file) if settings.api_keys_file else {}, settings.allow_anonymous
        )

    async def start(self) -> None:
        """Open the parts, connect to the agent service, take up leftovers, start the background loops."""
        settings = self.settings
        parts = self._parts = self._given_parts or await open_parts(settings)
        self._agents = self._given_agents or _agents_client(settings)
        DISCUSSION_CAPACITY.labels("fleet" if parts.redis is not None else "replica").set(
            settings.max_concurrent_sessions
        )
        memory_watch = (
            MemoryWatch(
                limit_rss_bytes=settings.memory_limit_rss_mb * 2**20,
                limit_system_percent=settings.memory_limit_system_percent,
            )
            if settings.enable_memory_monitoring
            else None
        )
        self._discussions = Discussions(
            store=parts.store,
            admission=parts.admission,
            agents=self._agents,
            cancel_relay=parts.cancel_relay,
            lease_ttl_seconds=settings.lease_ttl_seconds,
            max_events_per_discussion=settings.max_events_per_discussion,
            max_retained_per_principal=settings.max_retained_discussions_per_principal,
            resume_interrupted=settings.resume_interrupted,
            shared_state=parts.redis is not None,
            memory_watch=memory_watch,
            terminal_event_delay_seconds=settings.terminal_event_delay_seconds,
        )
        self._id_scope = IdScope(await parts.store.id_secret())
        self._servicer = SessionServicer(
            settings=settings,
            discussions=self._discussions,
            personas=PersonaCatalog(self._agents, settings.max_personas),
            authenticator=self._authenticator,
            rate_limiter=parts.rate_limiter,
            id_scope=self._id_scope,
        )
        await self._discussions.start()
        self._sweeper = ExpirySweeper(self._discussions.expire_due, interval_seconds=settings.cleanup_interval_seconds)
        self._sweeper.start()

    @property
    def parts(self) -> SessionParts:
        """The replica's stateful parts (after start())."""
        if self._parts is None:
            raise RuntimeError("start() must run first")
        return self._parts

    @property
    def store(self) -> Store:
        """Where the discussions live (for tools and tests)."""
        return self.parts.store

    @property
    def admission(self) -> Admission:
        """Who may run (for tools and tests)."""
        return self.parts.admission

    @property
    def discussions(self) -> Discussions:
        """The discussions of this replica (after start())."""
        if self._discussions is None:
            raise RuntimeError("start() must run first")
        return self._discussions

    def store_id(self, owner: str, discussion_id: str) -> str:
        """The id the store, the agents and the log files know a caller's discussion by (for tools and tests)."""
        if self._id_scope is None:
            raise RuntimeError("start() must run before store_id()")
        return self._id_scope.store_id(owner, discussion_id)

    def register(self, server: grpc.aio.Server) -> None:
        """Add the SessionService servicer (built in start(), which the host runs first)."""
        if self._servicer is None:
            raise RuntimeError("start() must run before register()")
        session_pb2_grpc.add_SessionServiceServicer_to_server(self._servicer, server)

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new discussions, give running ones the grace period, then suspend or interrupt the rest."""
        if self._discussions is not None:
            await self._discussions.drain(grace_seconds)

    async def close(self) -> None:
        """Stop the background loops, close the agent client and the store."""
        if self._sweeper is not None:
            await self._sweeper.stop()
        if self._discussions is not None:
            await self._discussions.close()
        if isinstance(self._agents, GrpcAgentsClient):
            await self._agents.close()
        if self._parts is not None:
            await self._parts.store.close()

    def health_checks(self) -> dict[str, HealthCheck]:
        """The agent service and, with Redis, Redis: while either fails, this replica is NOT_SERVING."""
        checks = {}
        if isinstance(self._agents, GrpcAgentsClient):
            checks["agents"] = self._agents.health_check()
        if self.parts.redis is not None:
            checks["redis"] = ping_check(self.parts.redis)
        return checks

    def load(self) -> InstanceLoad:
        """The discussions this replica runs and queues (its share: the monitor sums them) and the cap, for reports."""
        discussions = self._discussions
        return InstanceLoad(
            active_sessions=discussions.running_count() if discussions is not None else 0,
            queued_sessions=discussions.queued_count() if discussions is not None else 0,
            session_capacity=self.settings.max_concurrent_sessions,
            # With Redis, admission's cap is the fleet's, and every replica reports the same one.
            session_capacity_shared=self._parts is not None and self._parts.redis is not None,
        )
