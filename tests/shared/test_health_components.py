"""Health from components: a host whose dependency is down answers NOT_SERVING, and SERVING again after."""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.monitor.service import MONITOR_SERVICE_NAME, MonitorService
from services.monitor.settings import MonitorSettings
from services.shared.client import dependency_health_check
from services.shared.health import LIVENESS_SERVICE, HealthCheck, HealthState, ping_check
from services.shared.server import ServiceHost
from tests.redis_server import RedisServer, require_redis_server
from tests.shared.conftest import monitor_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Any: splatted into settings constructors, whose signatures also take pydantic-settings' own options.
FAST: dict[str, Any] = {"health_check_interval_seconds": 0.05, "health_check_timeout_seconds": 0.5}


async def statuses(host: ServiceHost) -> dict[str, int]:
    """What a probe sees: the overall status, the service's own, and liveness."""
    async with grpc.aio.insecure_channel(host.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {
            name: (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
            for name in ("", MONITOR_SERVICE_NAME, LIVENESS_SERVICE)
        }


async def until(host: ServiceHost, expected: dict[str, int], within_seconds: float = 10) -> None:
    deadline = time.monotonic() + within_seconds
    while (seen := await statuses(host)) != expected:
        assert time.monotonic() < deadline, f"health stayed {seen}, expected {expected}"
        await asyncio.sleep(0.02)


def all_serving() -> dict[str, int]:
    return {"": SERVING, MONITOR_SERVICE_NAME: SERVING, LIVENESS_SERVICE: SERVING}


def routed_away() -> dict[str, int]:
    # Balancers and readiness see NOT_SERVING; liveness stays SERVING so Kubernetes does not restart the pod.
    return {"": NOT_SERVING, MONITOR_SERVICE_NAME: NOT_SERVING, LIVENESS_SERVICE: SERVING}


async def start_with_checks(
    start_monitor: Callable[[MonitorSettings], Awaitable[ServiceHost]],
    checks: Mapping[str, HealthCheck],
    monkeypatch: pytest.MonkeyPatch,
) -> ServiceHost:
    """A monitor host whose service declares these health checks (as a service's health_checks() does)."""
    monkeypatch.setattr(MonitorService, "health_checks", lambda self: checks, raising=False)
    return await start_monitor(monitor_settings(**FAST))


async def test_a_failing_state_turns_the_host_not_serving_until_it_passes_again(
    start_monitor: Callable[[MonitorSettings], Awaitable[ServiceHost]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, queue = HealthState(), HealthState()
    host = await start_with_checks(start_monitor, {"store": store, "queue": queue}, monkeypatch)
    await until(host, all_serving())

    store.set_failing("connection refused")
    await until(host, routed_away())
    queue.set_failing("stuck")
    store.set_healthy()
    await asyncio.sleep(0.2)  # several polls: one component still fails
    assert await statuses(host) == routed_away()
    queue.set_healthy()
    await until(host, all_serving())


async def test_a_check_that_hangs_counts_as_failing(
    start_monitor: Callable[[MonitorSettings], Awaitable[ServiceHost]], monkeypatch: pytest.MonkeyPatch
) -> None:
    hang = asyncio.Event()

    async def slow() -> None:
        if hang.is_set():
            await asyncio.sleep(3600)

    host = await start_with_checks(start_monitor, {"slow": slow}, monkeypatch)
    await until(host, all_serving())
    hang.set()
    await until(host, routed_away())
    hang.clear()
    await until(host, all_serving())


async def test_a_host_starts_not_serving_while_a_component_fails(
    start_monitor: Callable[[MonitorSettings], Awaitable[ServiceHost]], monkeypatch: pytest.MonkeyPatch
) -> None:
    down = HealthState()
    down.set_failing("not yet")
    host = await start_with_checks(start_monitor, {"dependency": down}, monkeypatch)
    assert await statuses(host) == routed_away(), "the first answer already reflects the components"
    down.set_healthy()
    await until(host, all_serving())


async def test_a_graceful_stop_stays_not_serving_when_components_recover(
    start_monitor: Callable[[MonitorSettings], Awaitable[ServiceHost]], monkeypatch: pytest.MonkeyPatch
) -> None:
    draining = asyncio.Event()

    async def slow_drain(self: MonitorService, grace_seconds: float) -> None:
        draining.set()
        await asyncio.sleep(0.5)  # the server still answers while the service drains

    monkeypatch.setattr(MonitorService, "drain", slow_drain)
    host = await start_with_checks(start_monitor, {"dependency": HealthState()}, monkeypatch)
    async with grpc.aio.insecure_channel(host.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stopping = asyncio.create_task(host.stop(grace_seconds=1))
        await draining.wait()
        await asyncio.sleep(0.2)  # the component poll (every 0.05 s, all passing) would have run several times
        for service in ("", MONITOR_SERVICE_NAME):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == NOT_SERVING
        await stopping


async def test_a_dependency_channel_down_turns_the_host_not_serving_and_back(
    start_monitor: Callable[[MonitorSettings], Awaitable[ServiceHost]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real dependency: another gRPC server, watched through its own health service.
    dependency = await start_monitor(monitor_settings())
    port = dependency.port
    channel = grpc.aio.insecure_channel(
        dependency.address, options=[("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 200)]
    )
    try:
        check = dependency_health_check(channel, MONITOR_SERVICE_NAME)
        host = await start_with_checks(start_monitor, {"monitor-dependency": check}, monkeypatch)
        await until(host, all_serving())

        await dependency.stop(grace_seconds=0)
        await until(host, routed_away())

        # The dependency comes back: a plain monitor again, without the checks this test gave the watcher.
        monkeypatch.delattr(MonitorService, "health_checks")
        await start_monitor(monitor_settings(port=port))
        await until(host, all_serving())
    finally:
        await channel.close()


@pytest.fixture
async def own_redis(tmp_path: pathlib.Path) -> AsyncIterator[RedisServer]:
    """A redis-server of this test alone: the test stops and restarts it."""
    server = RedisServer(require_redis_server(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_redis_down_turns_the_host_not_serving_and_back(
    start_monitor: Callable[[MonitorSettings], Awaitable[ServiceHost]],
    monkeypatch: pytest.MonkeyPatch,
    own_redis: RedisServer,
) -> None:
    client = redis.Redis.from_url(own_redis.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    try:
        host = await start_with_checks(start_monitor, {"redis": ping_check(client)}, monkeypatch)
        await until(host, all_serving())
        own_redis.stop()
        await until(host, routed_away())
        own_redis.start()
        await until(host, all_serving())
    finally:
        await client.aclose()


async def session_statuses(host: ServiceHost) -> tuple[int, int]:
    async with grpc.aio.insecure_channel(host.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return tuple(
            [
                (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
                for name in ("", "roundtable.session.v1.SessionService")
            ]
        )


async def session_until(host: ServiceHost, status: int, within_seconds: float = 15) -> None:
    deadline = time.monotonic() + within_seconds
    while (seen := await session_statuses(host)) != (status, status):
        assert time.monotonic() < deadline, f"the session service stayed {seen}"
        await asyncio.sleep(0.05)


async def test_the_session_service_is_not_serving_while_its_agents_or_its_redis_are_down(
    own_redis: RedisServer,
) -> None:
    from services.agents.service import AgentsService
    from services.agents.settings import AgentsSettings
    from services.session.service import SessionService
    from services.session.settings import SessionSettings

    agents_config = AgentsSettings(port=0, metrics_port=-1)
    agents = ServiceHost(agents_config, AgentsService(agents_config))
    await agents.start()
    session_config = SessionSettings(
        port=0,
        metrics_port=-1,
        store="redis",
        redis_url=own_redis.url,
        agents_address=agents.address,
        **FAST,
    )
    session = ServiceHost(session_config, SessionService(session_config))
    await session.start()
    try:
        await session_until(session, SERVING)

        own_redis.stop()
        await session_until(session, NOT_SERVING)
        own_redis.start()
        await session_until(session, SERVING)

        agents_port = agents.port
        await agents.stop(grace_seconds=0)
        await session_until(session, NOT_SERVING)
        agents_config = agents_config.model_copy(update={"port": agents_port})
        agents = ServiceHost(agents_config, AgentsService(agents_config))
        await agents.start()
        await session_until(session, SERVING)
    finally:
        await session.stop(grace_seconds=0)
        await agents.stop(grace_seconds=0)


async def test_one_failed_check_does_not_take_a_passing_replica_out_but_failures_in_a_row_do(
    start_monitor: Callable[[MonitorSettings], Awaitable[ServiceHost]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A loaded machine answers one check late now and then; with a single replica behind Envoy, turning
    # NOT_SERVING on that would leave "no healthy upstream" (seen in the quota-storm benchmark).
    answers: list[bool] = []
    flaky_failures = 0

    async def flaky() -> None:
        nonlocal flaky_failures
        fail = len(answers) % 2 == 1 and flaky_failures < 10  # every other poll fails, ten times
        answers.append(not fail)
        if fail:
            flaky_failures += 1
            raise RuntimeError("slow answer")

    steady = HealthState()
    monkeypatch.setattr(MonitorService, "health_checks", lambda self: {"flaky": flaky, "steady": steady}, raising=False)
    host = await start_monitor(monitor_settings(**FAST, health_failures_before_not_serving=3))
    async with asyncio.timeout(10):
        while flaky_failures < 10:
            assert await statuses(host) == all_serving()
            await asyncio.sleep(0.01)

    steady.set_failing("connection refused")  # failing at every poll: out after three in a row
    await until(host, routed_away())
    steady.set_healthy()  # one pass restores it
    await until(host, all_serving())
