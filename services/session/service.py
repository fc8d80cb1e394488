"""The session service as the shared server host runs it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from services.gen.roundtable.agents.v1 import agents_pb2_grpc
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from services.session.admission import Admission, MemoryAdmission
from services.session.auth import Authenticator, load_keys
from services.session.cancel_relay import CancelRelay, LocalCancelRelay
from services.session.document import apply_event
from services.session.expiry import ExpirySweeper
from services.session.ids import IdScope
from services.session.memory_watch import MemoryWatch
from services.session.metrics import DISCUSSION_CAPACITY
from services.session.notifier import EventNotifier
from services.session.personas import PersonaCatalog
from services.session.rate_limit import NoRateLimit, RateLimiter, WindowRateLimiter
from services.session.redis.admission import RedisAdmission
from services.session.redis.cancel_relay import RedisCancelRelay
from services.session.redis.connection import connect as connect_redis
from services.session.redis.rate_limit import RedisRateLimiter
from services.session.runner import SUSPEND, DiscussionRunner
from services.session.servicer import CANCEL_REASON, SessionServicer
from services.session.settings import SessionSettings
from services.session.stores.interface import UNFINISHED_STATUSES, Store
from services.session.stores.memory import MemoryStore
from services.session.stores.redis import RedisStore
from services.session.stores.sqlite import SqliteStore
from services.shared.client import client_interceptors, dependency_health_check
from services.shared.health import HealthCheck, ping_check
from services.shared.reporter import InstanceLoad
from services.shared.tls import create_channel

logger = logging.getLogger(__name__)

STOP_REASON = "the session service stopped while this discussion ran"


class SessionService:
    """Owns the store, the runner, identity, limits and expiry of one session replica."""

    name: str = "session"
    grpc_services: Sequence[str] = ("roundtable.session.v1.SessionService",)

    def __init__(self, settings: SessionSettings) -> None:
        self.settings = settings
        # One connection pool for the store, admission and rate limits; no I/O until start().
        self.redis = (
            connect_redis(settings.redis_url, timeout_seconds=settings.redis_timeout_seconds)
            if settings.store == "redis"
            else None
        )
        self.admission: Admission
        if self.redis is not None:
            # Shared by every replica: max_concurrent_sessions is then a fleet-wide cap.
            self.admission = RedisAdmission(
                self.redis,
                capacity=settings.max_concurrent_sessions,
                max_queued=settings.max_queued_sessions,
                max_per_principal=settings.principal_cap,
                lease_ttl_seconds=settings.lease_ttl_seconds,
                replica_id=settings.instance_id,
                key_prefix=settings.redis_key_prefix,
            )
        else:
            self.admission = MemoryAdmission(
                capacity=settings.max_concurrent_sessions,
                max_queued=settings.max_queued_sessions,
                max_per_principal=settings.principal_cap,
                lease_ttl_seconds=settings.lease_ttl_seconds,
            )
        DISCUSSION_CAPACITY.labels("fleet" if self.redis is not None else "replica").set(
            settings.max_concurrent_sessions
        )
        # A cancel may reach a replica that does not run the discussion: it tells the one that does.
        self.cancel_relay: CancelRelay = (
            RedisCancelRelay(self.redis, key_prefix=settings.redis_key_prefix)
            if self.redis is not None
            else LocalCancelRelay()
        )
        self.notifier = EventNotifier()
        self.store: Store = MemoryStore()
        self.authenticator = Authenticator(
            load_keys(settings.api_keys_file) if settings.api_keys_file else {}, settings.allow_anonymous
        )
        self.rate_limiter: RateLimiter = NoRateLimit()
        if settings.enable_rate_limiting:
            self.rate_limiter = (
                RedisRateLimiter(self.redis, settings.rate_limit_per_minute, key_prefix=settings.redis_key_prefix)
                if self.redis is not None
                else WindowRateLimiter(settings.rate_limit_per_minute)
            )
        self.memory_watch = (
            MemoryWatch(
                limit_rss_bytes=settings.memory_limit_rss_mb * 2**20,
                limit_system_percent=settings.memory_limit_system_percent,
            )
            if settings.enable_memory_monitoring
            else None
        )
        self._channel: grpc.aio.Channel | None = None
        self.runner: DiscussionRunner | None = None
        self.sweeper: ExpirySweeper | None = None
        self.servicer: SessionServicer | None = None
        self.id_scope: IdScope | None = None

    async def start(self) -> None:
        """Open the store, connect to the agent service, take up leftovers, start the background loops."""
        if self.settings.store == "sqlite":
            self.store = await SqliteStore.open(self.settings.sqlite_path)
        elif self.redis is not None:
            # Fails start-up with RedisUnavailable (naming the cause) if Redis does not answer.
            self.store = await RedisStore.open(self.redis, key_prefix=self.settings.redis_key_prefix)
        self._channel = create_channel(
            self.settings.agents_address,
            self.settings,
            interceptors=client_interceptors(),
            options=[
                ("grpc.max_receive_message_length", self.settings.max_message_bytes),
                ("grpc.max_send_message_length", self.settings.max_message_bytes),
                # The runner re-issues lost agent calls itself (runner._drive); gRPC's own retry
                # support keeps a replay buffer per call, ~5.6 KB per held discussion, for nothing.
                ("grpc.enable_retries", 0),
            ],
        )
        agents: agents_pb2_grpc.AgentServiceAsyncStub = agents_pb2_grpc.AgentServiceStub(self._channel)
        self.id_scope = IdScope(await self.store.id_secret())
        self.runner = DiscussionRunner(
            store=self.store,
            agents=agents,
            admission=self.admission,
            notifier=self.notifier,
            agents_call_timeout_seconds=self.settings.agents_call_timeout_seconds,
            lease_ttl_seconds=self.settings.lease_ttl_seconds,
            max_events_per_discussion=self.settings.max_events_per_discussion,
            max_concurrent_agent_runs=self.settings.max_concurrent_agent_runs,
            shared_state=self.redis is not None,
            terminal_event_delay_seconds=self.settings.terminal_event_delay_seconds,
        )
        self.servicer = SessionServicer(
            settings=self.settings,
            store=self.store,
            runner=self.runner,
            admission=self.admission,
            notifier=self.notifier,
            personas=PersonaCatalog(agents, self.settings.max_personas),
            authenticator=self.authenticator,
            rate_limiter=self.rate_limiter,
            memory_watch=self.memory_watch,
            id_scope=self.id_scope,
            cancel_relay=self.cancel_relay,
        )
        self.cancel_relay.start(self._cancel_here)
        await self._take_up_leftovers(self.runner)
        runner = self.runner
        # While running, only RUNNING discussions whose lease lapsed are orphans (their replica died);
        # a queued one is still in some replica's queue.
        self.runner.start_heartbeat(lambda: self._adopt_orphans(runner))
        self.sweeper = ExpirySweeper(
            store=self.store, runner=self.runner, interval_seconds=self.settings.cleanup_interval_seconds
        )
        self.sweeper.start()

    def store_id(self, owner: str, discussion_id: str) -> str:
        """The id the store, the agents and the log files know a caller's discussion by (for tools and tests)."""
        if self.id_scope is None:
            raise RuntimeError("start() must run before store_id()")
        return self.id_scope.store_id(owner, discussion_id)

    def register(self, server: grpc.aio.Server) -> None:
        """Add the SessionService servicer (built in start(), which the host runs first)."""
        if self.servicer is None:
            raise RuntimeError("start() must run before register()")
        session_pb2_grpc.add_SessionServiceServicer_to_server(self.servicer, server)

    async def _take_up_leftovers(self, runner: DiscussionRunner, running_only: bool = False) -> None:
        """Discussions a previous process left unfinished: resume or re-queue them, or mark them INTERRUPTED."""
        leftovers = sorted(await self.store.unfinished(), key=lambda d: d.created_at.ToNanoseconds())
        for doc in leftovers:
            if runner.live(doc.discussion_id) is not None:
                continue  # ours, running or queued
            if running_only and doc.status != session_pb2.DISCUSSION_STATUS_RUNNING:
                continue
            owner = await self.store.owner(doc.discussion_id) or ""
            # With a shared store another replica may still be running it: take only what nobody holds.
            if not await self.admission.adopt(doc.discussion_id, owner):
                continue
            # The list was read before adopt(): the discussion may have finished since. Read it again.
            fresh = await self.store.get(doc.discussion_id)
            if fresh is None or fresh.status not in UNFINISHED_STATUSES or runner.live(doc.discussion_id):
                await self.admission.release(doc.discussion_id)
                continue
            doc = fresh
            await self._catch_up(doc)
            if doc.status == session_pb2.DISCUSSION_STATUS_QUEUED:
                runner.start_promoted(await self.admission.release(doc.discussion_id))
                admitted = await self.admission.admit(doc.discussion_id, owner)
                await runner.submit(doc, owner, admitted)
            elif self.settings.resume_interrupted:
                # It held a slot before the stop: adopt() gave it one back whatever the caps say now.
                await runner.submit(doc, owner, admitted=True)
                logger.warning("resuming discussion %s after round %d", doc.discussion_id, doc.completed_rounds)
            else:
                await runner.settle(doc, session_pb2.DISCUSSION_STATUS_INTERRUPTED, STOP_REASON)
                await self.admission.release(doc.discussion_id)
                logger.warning("discussion %s was cut short by a stop: INTERRUPTED", doc.discussion_id)

    async def _adopt_orphans(self, runner: DiscussionRunner) -> None:
        # Only a shared store has other replicas' orphans; and not while draining: what this replica
        # suspends is for another replica (or its own restart).
        if self.redis is not None and self.servicer is not None and self.servicer.accepting:
            await self._take_up_leftovers(runner, running_only=True)

    async def _cancel_here(self, discussion_id: str) -> None:
        """Cancel a discussion another replica was asked to cancel, if this replica runs or queues it."""
        if self.runner is None or self.runner.live(discussion_id) is None:
            return
        if await self.runner.stop(discussion_id, session_pb2.DISCUSSION_STATUS_CANCELLED, CANCEL_REASON):
            await self.runner.release_agents(discussion_id)

    async def _catch_up(self, doc: session_pb2.Discussion) -> None:
        """Fold in events recorded after the document was last saved (text deltas, or a save cut off)."""
        while events := await self.store.events_after(doc.discussion_id, doc.last_sequence, 1000):
            for event in events:
                apply_event(doc, event)

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new discussions, give running ones the grace period, then suspend or interrupt the rest."""
        if self.servicer is not None:
            self.servicer.accepting = False
        if self.runner is None:
            return
        await self.runner.wait_idle(grace_seconds)
        if self.settings.resume_interrupted:
            await self.runner.stop_all(SUSPEND, STOP_REASON)
        else:
            await self.runner.stop_all(session_pb2.DISCUSSION_STATUS_INTERRUPTED, STOP_REASON)

    async def close(self) -> None:
        """Stop the background loops, close the agent channel and the store."""
        await self.cancel_relay.stop()
        if self.sweeper is not None:
            await self.sweeper.stop()
        if self.runner is not None:
            await self.runner.stop_heartbeat()
        if self._channel is not None:
            await self._channel.close()
        await self.store.close()

    def health_checks(self) -> dict[str, HealthCheck]:
        """The agent service and, with the Redis store, Redis: while either fails, this replica is NOT_SERVING."""
        if self._channel is None:
            raise RuntimeError("start() must run before health_checks()")
        checks = {"agents": dependency_health_check(self._channel, "roundtable.agents.v1.AgentService")}
        if self.redis is not None:
            checks["redis"] = ping_check(self.redis)
        return checks

    def load(self) -> InstanceLoad:
        """The discussions this replica runs and queues (its share: the monitor sums them) and the cap, for reports."""
        return InstanceLoad(
            active_sessions=len(self.runner.active) if self.runner is not None else 0,
            queued_sessions=len(self.runner.queued) if self.runner is not None else 0,
            session_capacity=self.admission.capacity,
            # With Redis, admission's cap is the fleet's, and every replica reports the same one.
            session_capacity_shared=self.redis is not None,
        )
