"""Starts the whole suite in-process on port 0: simulator, agents, session and monitor, real servers."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from services.agents.service import AgentsService
from services.agents.settings import AgentsSettings
from services.gen.roundtable.agents.v1 import agents_pb2_grpc
from services.gen.roundtable.monitor.v1 import monitor_pb2_grpc
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from services.monitor.service import MonitorService
from services.monitor.settings import MonitorSettings
from services.session.service import SessionService
from services.session.settings import SessionSettings
from services.shared.server import ServiceHost
from services.simulator.server import RunningSimulator, start_simulator
from services.simulator.settings import SimulatorSettings

# Any: splatted into SimulatorSettings, whose signature also takes pydantic-settings' own options.
FAST_SIMULATOR: dict[str, Any] = {"port": 0, "first_token_latency_ms": 5, "tokens_per_second": 2000}


@dataclass
class Suite:
    """Running servers and client stubs for them."""

    simulator: RunningSimulator
    monitor_host: ServiceHost
    agents_host: ServiceHost
    session_host: ServiceHost
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def session_service(self) -> SessionService:
        return self.session_host.service  # type: ignore[return-value]

    @property
    def agents_service(self) -> AgentsService:
        return self.agents_host.service  # type: ignore[return-value]

    def _channel(self, host: ServiceHost) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(host.address)
        self.channels.append(channel)
        return channel

    def session(self) -> session_pb2_grpc.SessionServiceAsyncStub:
        """A stub on a channel of its own to the session service (closed with the suite)."""
        # On an aio channel the generated constructor's overload already gives the async stub.
        return session_pb2_grpc.SessionServiceStub(self._channel(self.session_host))

    def agents(self) -> agents_pb2_grpc.AgentServiceAsyncStub:
        """A stub on a channel of its own to the agent service."""
        return agents_pb2_grpc.AgentServiceStub(self._channel(self.agents_host))

    def monitor(self) -> monitor_pb2_grpc.MonitorServiceAsyncStub:
        """A stub on a channel of its own to the monitor service."""
        return monitor_pb2_grpc.MonitorServiceStub(self._channel(self.monitor_host))

    async def restart_session(self, **overrides: Any) -> None:
        """Stop the session service and start a new one with the same settings (and store file)."""
        settings = self.session_host.settings.model_copy(update={"port": self.session_host.port, **overrides})
        await self.session_host.stop(grace_seconds=0)
        self.session_host = ServiceHost(settings, SessionService(settings))  # type: ignore[arg-type]
        await self.session_host.start()

    async def stop(self) -> None:
        for channel in self.channels:
            await channel.close()
        for host in (self.session_host, self.agents_host, self.monitor_host):
            await host.stop(grace_seconds=0)
        await self.simulator.stop()


async def start_suite(
    tmp_path: pathlib.Path,
    *,
    session: dict[str, Any] | None = None,
    agents: dict[str, Any] | None = None,
    simulator: dict[str, Any] | None = None,
) -> Suite:
    """Start every service on loopback with test-sized settings; overrides per service."""
    sim = await start_simulator(SimulatorSettings(**{**FAST_SIMULATOR, **(simulator or {})}))
    # Its own registry: several suites may run in one test process.
    settings = MonitorSettings(port=0, metrics_port=-1)
    monitor_host = ServiceHost(settings, MonitorService(settings, registry=CollectorRegistry()))
    await monitor_host.start()
    common = {"port": 0, "metrics_port": -1, "monitor_address": monitor_host.address, "report_interval_seconds": 0.5}
    agents_settings = AgentsSettings(
        **{
            **common,
            "llm_base_url": sim.base_url,
            "llm_max_tokens": 24,
            "delta_flush_interval_ms": 5,
            "delta_flush_chars": 40,
            **(agents or {}),
        }
    )
    agents_host = ServiceHost(agents_settings, AgentsService(agents_settings))
    await agents_host.start()
    session_settings = SessionSettings(
        **{
            **common,
            "agents_address": agents_host.address,
            "sqlite_path": tmp_path / "roundtable.db",
            "max_concurrent_sessions": 500,
            "max_concurrent_sessions_per_principal": 1000,
            **(session or {}),
        }
    )
    session_host = ServiceHost(session_settings, SessionService(session_settings))
    await session_host.start()
    return Suite(simulator=sim, monitor_host=monitor_host, agents_host=agents_host, session_host=session_host)


async def run_to_end(
    stub: session_pb2_grpc.SessionServiceAsyncStub, request: session_pb2.CreateDiscussionRequest
) -> tuple[session_pb2.Discussion, list[session_pb2.DiscussionEvent]]:
    """Create a discussion, stream it to the end, and return the final document and every event."""
    created = await stub.CreateDiscussion(request, timeout=30)
    events = [
        event
        async for event in stub.StreamDiscussion(
            session_pb2.StreamDiscussionRequest(discussion_id=created.discussion_id), timeout=60
        )
    ]
    final = await stub.GetDiscussion(session_pb2.GetDiscussionRequest(discussion_id=created.discussion_id), timeout=10)
    return final, events
