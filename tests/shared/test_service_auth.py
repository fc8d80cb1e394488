"""The service credential: the internal services refuse callers without it; probes stay open."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError
from rich.console import Console

from services.agents.settings import AgentsSettings
from services.cli import dashboard, report
from services.gen.roundtable.agents.v1 import agents_pb2, agents_pb2_grpc
from services.gen.roundtable.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from services.monitor.settings import MonitorSettings
from services.session.settings import SessionSettings
from services.shared.interceptor import ServerInterceptor
from services.shared.server import ServiceHost
from services.shared.service_auth import INTERNAL_TOKEN_ENV, ServiceTokenCheck
from services.shared.tls import ClientTls, create_channel
from tests.shared.conftest import monitor_settings

TOKEN = "a-shared-secret-of-some-length"
REPORT = monitor_pb2.InstanceReport(instance_id="intruder-1", service="session", address="10.0.0.9:50051")


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def code_of(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_report_instance_without_the_service_credential_is_refused(
    start_monitor: Callable[[MonitorSettings], Awaitable[ServiceHost]],
) -> None:
    host = await start_monitor(monitor_settings(internal_token=TOKEN))
    async with grpc.aio.insecure_channel(host.address) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        assert await code_of(stub.ReportInstance(REPORT, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        wrong = bearer(TOKEN[:-1] + "X")
        assert await code_of(stub.ReportInstance(REPORT, metadata=wrong, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        request = monitor_pb2.GetConcurrencyStatsRequest()
        assert await code_of(stub.GetConcurrencyStats(request, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        # Nothing the refused reports said reached the fleet view.
        stats = await stub.GetConcurrencyStats(request, metadata=bearer(TOKEN), timeout=5)
        assert "intruder-1" not in [row.instance_id for row in stats.instances]
        assert await code_of(stub.ReportInstance(REPORT, metadata=bearer(TOKEN), timeout=5)) == grpc.StatusCode.OK


async def test_health_and_reflection_stay_open_without_the_credential(
    start_monitor: Callable[[MonitorSettings], Awaitable[ServiceHost]],
) -> None:
    host = await start_monitor(monitor_settings(internal_token=TOKEN))
    async with grpc.aio.insecure_channel(host.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "roundtable.monitor.v1.MonitorService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [service.name async for reply in replies for service in reply.list_services_response.service]
        assert "roundtable.monitor.v1.MonitorService" in names


async def test_every_instance_reporter_sends_the_credential(
    start_monitor: Callable[[MonitorSettings], Awaitable[ServiceHost]],
) -> None:
    first = await start_monitor(monitor_settings(internal_token=TOKEN))
    # A second instance reporting to the first: only its reporter's channel carries the credential.
    await start_monitor(
        monitor_settings(
            internal_token=TOKEN, instance_id="reporting-2", monitor_address=first.address, report_interval_seconds=0.1
        )
    )
    async with create_channel(first.address, ClientTls(internal_token_value=TOKEN)) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        deadline = time.monotonic() + 10
        while "reporting-2" not in [
            row.instance_id
            for row in (await stub.GetConcurrencyStats(monitor_pb2.GetConcurrencyStatsRequest(), timeout=5)).instances
        ]:
            assert time.monotonic() < deadline, "the reporter's reports never got through"
            await asyncio.sleep(0.05)


async def test_the_operators_monitor_tools_send_the_credential_from_the_environment(
    start_monitor: Callable[[MonitorSettings], Awaitable[ServiceHost]], monkeypatch: pytest.MonkeyPatch
) -> None:
    host = await start_monitor(monitor_settings(internal_token=TOKEN))
    console = Console(record=True, width=200, file=io.StringIO())

    monkeypatch.delenv(INTERNAL_TOKEN_ENV, raising=False)
    assert await dashboard.run(host.address, window_seconds=60, interval_seconds=0.01, console=console, frames=1) == 1
    assert "UNAUTHENTICATED" in console.export_text()

    monkeypatch.setenv(INTERNAL_TOKEN_ENV, TOKEN)
    assert await dashboard.run(host.address, window_seconds=60, interval_seconds=0.01, console=console, frames=1) == 0
    assert (await report.collect(host.address, 60)).summary.window_seconds == 60


async def test_a_server_without_a_credential_set_stays_open(
    start_monitor: Callable[[MonitorSettings], Awaitable[ServiceHost]],
) -> None:
    host = await start_monitor(monitor_settings())
    async with grpc.aio.insecure_channel(host.address) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        assert await code_of(stub.ReportInstance(REPORT, timeout=5)) == grpc.StatusCode.OK


async def test_streaming_methods_of_an_internal_contract_check_the_credential() -> None:
    # A bidirectional method under the agents' contract (as the session's lanes would be), on a bare server.
    async def echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    async def count(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        return str(len([r async for r in requests])).encode()

    handlers = grpc.method_handlers_generic_handler(
        "roundtable.agents.v1.AgentService",
        {"Lane": grpc.stream_stream_rpc_method_handler(echo), "Count": grpc.stream_unary_rpc_method_handler(count)},
    )
    server = grpc.aio.server(interceptors=[ServerInterceptor("test", ServiceTokenCheck(TOKEN))])
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            # No serializers: raw bytes both ways, as the handlers above take and answer them.
            lane: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
                "/roundtable.agents.v1.AgentService/Lane"
            )
            counter: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
                "/roundtable.agents.v1.AgentService/Count"
            )

            async def replies(requests: list[bytes], metadata: Any) -> list[bytes]:
                return [reply async for reply in lane(iter(requests), metadata=metadata, timeout=5)]

            # No requests on the refused calls: a client still sending when the server ends a call sees its
            # own send fail (INTERNAL) before the status arrives.
            assert await code_of(replies([], None)) == grpc.StatusCode.UNAUTHENTICATED
            assert await code_of(counter(iter([]), timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
            assert await replies([b"a", b"b"], bearer(TOKEN)) == [b"a", b"b"]
            assert await counter(iter([b"a", b"b", b"c"]), metadata=bearer(TOKEN), timeout=5) == b"3"
    finally:
        await server.stop(0)


@pytest.mark.parametrize("settings_cls", [SessionSettings, AgentsSettings, MonitorSettings])
def test_production_refuses_to_start_without_a_service_credential(settings_cls: type[Any]) -> None:
    extra = {"allow_anonymous": True} if settings_cls is SessionSettings else {}
    with pytest.raises(ValidationError, match=INTERNAL_TOKEN_ENV):
        settings_cls(profile="production", **extra)
    settings = settings_cls(profile="production", internal_token=TOKEN, **extra)
    assert settings.internal_token_value == TOKEN
    assert TOKEN not in repr(settings), "the secret is never printed with the settings"


@pytest.mark.parametrize("settings_cls", [SessionSettings, AgentsSettings, MonitorSettings])
def test_every_service_reads_one_unprefixed_variable(settings_cls: type[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INTERNAL_TOKEN_ENV, TOKEN)
    assert settings_cls().internal_token_value == TOKEN
    assert settings_cls(_cli_parse_args=["--internal-token", "z" * 20]).internal_token_value == "z" * 20


def test_a_short_token_is_refused() -> None:
    with pytest.raises(ValidationError, match="at least 16"):
        MonitorSettings(internal_token="short")


def test_an_empty_token_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INTERNAL_TOKEN_ENV, "")
    assert MonitorSettings().internal_token is None


async def test_the_session_service_runs_discussions_on_agents_that_require_the_credential(
    tmp_path: Any,
) -> None:
    from prometheus_client import CollectorRegistry

    from services.agents.service import AgentsService
    from services.monitor.service import MonitorService
    from services.session.service import SessionService
    from services.simulator.server import start_simulator
    from services.simulator.settings import SimulatorSettings
    from tests.suite import FAST_SIMULATOR

    simulator = await start_simulator(SimulatorSettings(**FAST_SIMULATOR))
    hosts: list[ServiceHost] = []
    try:
        monitor_config = MonitorSettings(port=0, metrics_port=-1, internal_token=TOKEN)
        hosts.append(ServiceHost(monitor_config, MonitorService(monitor_config, registry=CollectorRegistry())))
        await hosts[-1].start()
        common: dict[str, Any] = {
            "port": 0,
            "metrics_port": -1,
            "internal_token": TOKEN,
            "monitor_address": hosts[0].address,
            "report_interval_seconds": 0.1,
        }
        agents_config = AgentsSettings(**common, llm_base_url=simulator.base_url, llm_max_tokens=16)
        hosts.append(ServiceHost(agents_config, AgentsService(agents_config)))
        await hosts[-1].start()
        agents_address = hosts[-1].address
        session_config = SessionSettings(**common, agents_address=agents_address, store="memory")
        hosts.append(ServiceHost(session_config, SessionService(session_config)))
        await hosts[-1].start()

        async with grpc.aio.insecure_channel(agents_address) as channel:
            agents = agents_pb2_grpc.AgentServiceStub(channel)
            request = agents_pb2.RunDiscussionRequest(session_id="s1", topic="t", personas=["scientist"], rounds=1)
            refused = code_of(agents.RunDiscussion(request, timeout=5).read())
            assert await refused == grpc.StatusCode.UNAUTHENTICATED
        async with grpc.aio.insecure_channel(hosts[-1].address) as channel:
            session = session_pb2_grpc.SessionServiceStub(channel)
            created = await session.CreateDiscussion(
                session_pb2.CreateDiscussionRequest(topic="open doors", personas=["scientist"], rounds=1), timeout=10
            )
            stream = session.StreamDiscussion(
                session_pb2.StreamDiscussionRequest(discussion_id=created.discussion_id), timeout=30
            )
            _ = [event async for event in stream]
            final = await session.GetDiscussion(
                session_pb2.GetDiscussionRequest(discussion_id=created.discussion_id), timeout=5
            )
        assert (final.status, final.error) == (session_pb2.DISCUSSION_STATUS_COMPLETED, "")
    finally:
        for host in reversed(hosts):
            await host.stop(grace_seconds=0)
        await simulator.stop()
