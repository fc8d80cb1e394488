"""The session service as the shared server host runs it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from services.gen.roundtable.agents.v1 import agents_pb2_grpc
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from services.session.admission import Admission
from services.session.expiry import ExpirySweeper
from services.session.memory_store import MemoryStore
from services.session.notifier import EventNotifier
from services.session.personas import PersonaCatalog
from services.session.runner import DiscussionRunner
from services.session.servicer import SessionServicer
from services.session.settings import SessionSettings
from services.session.sqlite_store import SqliteStore
from services.session.store import Store
from services.shared.client import client_interceptors
from services.shared.reporter import InstanceLoad

logger = logging.getLogger(__name__)

RESTART_REASON = "the session service stopped while this discussion ran"


class SessionService:
    """Owns the store, the runner, admission and expiry of one session replica."""

    name: str = "session"
    grpc_services: Sequence[str] = ("roundtable.session.v1.SessionService",)

    def __init__(self, settings: SessionSettings) -> None:
        self.settings = settings
        self.admission = Admission(settings.max_concurrent_sessions)
        self.notifier = EventNotifier()
        self.store: Store = MemoryStore()
        self._channel: grpc.aio.Channel | None = None
        self.runner: DiscussionRunner | None = None
        self.sweeper: ExpirySweeper | None = None
        self.servicer: SessionServicer | None = None

    def register(self, server: grpc.aio.Server) -> None:
        """Add the SessionService servicer (built in start(), which the host runs first)."""
        if self.servicer is None:
            raise RuntimeError("start() must run before register()")
        session_pb2_grpc.add_SessionServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        """Open the store, connect to the agent service, settle leftovers, start sweeping."""
        if self.settings.store == "sqlite":
            self.store = await SqliteStore.open(self.settings.sqlite_path)
        self._channel = grpc.aio.insecure_channel(
            self.settings.agents_address,
            interceptors=client_interceptors(),
            options=[
                ("grpc.max_receive_message_length", self.settings.max_message_bytes),
                ("grpc.max_send_message_length", self.settings.max_message_bytes),
            ],
        )
        agents: agents_pb2_grpc.AgentServiceAsyncStub = agents_pb2_grpc.AgentServiceStub(self._channel)
        self.runner = DiscussionRunner(
            store=self.store,
            agents=agents,
            admission=self.admission,
            notifier=self.notifier,
            agents_call_timeout_seconds=self.settings.agents_call_timeout_seconds,
        )
        await self._interrupt_leftovers()
        self.servicer = SessionServicer(
            settings=self.settings,
            store=self.store,
            runner=self.runner,
            admission=self.admission,
            notifier=self.notifier,
            personas=PersonaCatalog(agents, self.settings.max_personas),
        )
        self.sweeper = ExpirySweeper(
            store=self.store, runner=self.runner, interval_seconds=self.settings.cleanup_interval_seconds
        )
        self.sweeper.start()

    async def _interrupt_leftovers(self) -> None:
        """Discussions a previous process left running can't be continued (yet): mark them INTERRUPTED."""
        assert self.runner is not None
        for doc in await self.store.unfinished():
            await self.runner.settle(doc, session_pb2.DISCUSSION_STATUS_INTERRUPTED, RESTART_REASON)
            logger.warning("discussion %s was left running by a previous process: INTERRUPTED", doc.discussion_id)

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new discussions, give running ones the grace period, then interrupt the rest."""
        self.admission.closed = True
        if self.runner is None:
            return
        await self.runner.wait_idle(grace_seconds)
        await self.runner.stop_all(session_pb2.DISCUSSION_STATUS_INTERRUPTED, RESTART_REASON)

    async def close(self) -> None:
        """Stop sweeping, close the agent channel and the store."""
        if self.sweeper is not None:
            await self.sweeper.stop()
        if self._channel is not None:
            await self._channel.close()
        await self.store.close()

    def load(self) -> InstanceLoad:
        """Running discussions and capacity, for monitor reports."""
        return InstanceLoad(active_sessions=self.admission.active, session_capacity=self.admission.capacity)
