"""Envoy's rendered config: accepted by the real Envoy, and under real traffic it keeps sessions on one replica.

The traffic tests start tiny gRPC backends (this module run as a program: grpc.health.v1 plus any
unary method, answering with its instance id in trailing metadata) behind a real Envoy on free
loopback ports, then kill or drain one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import pathlib
import secrets
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from deploy.envoy.__main__ import main as envoy_cli
from deploy.envoy.config import (
    AGENT_SERVICE,
    LOCAL_TUNING,
    NEVER_DELIVERED,
    SESSION_ID_HEADER,
    SESSION_SERVICE,
    Endpoint,
    GrpcService,
    Tuning,
    Upstream,
    kubernetes_topology,
    local_topology,
    render,
    validate_config,
    write_config,
)
from services.shared.processes import free_ports, kill, start_envoy
from tests.tools import require_tool

ROOT = pathlib.Path(__file__).resolve().parents[2]
INSTANCE_HEADER = "x-instance-id"
START_TIMEOUT_SECONDS = 20.0
MOVE_WITHIN_SECONDS = 6.0
SESSION_CALL = f"/{SESSION_SERVICE.name}/GetDiscussion"
AGENTS_CALL = f"/{AGENT_SERVICE.name}/GetAgentStats"
STREAM_SESSION_CALL = f"/{SESSION_SERVICE.name}/StreamDiscussion"
STREAM_AGENTS_CALL = f"/{AGENT_SERVICE.name}/RunDiscussion"
DELAY_HEADER = "x-test-delay-ms"  # the fake backend waits this long before each answer or message
STREAM_MESSAGES = 4


def require_envoy() -> str:
    """The envoy binary; skips without it, fails under ROUNDTABLE_REQUIRE_TOOLS=1."""
    return require_tool("envoy")


# --- the rendered config ---------------------------------------------------------------------------


def _grpc_clusters(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster for cluster in config["static_resources"]["clusters"] if cluster["name"] != "envoy_admin"]


def _grpc_routes(config: dict[str, Any], listener_name: str | None = None) -> list[dict[str, Any]]:
    routes = []
    for listener in config["static_resources"]["listeners"]:
        if listener["name"] == "stats" or listener_name not in (None, listener["name"]):
            continue
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        for host in manager["route_config"]["virtual_hosts"]:
            routes.extend(host["routes"])
    return routes


TOPOLOGIES = {
    "local 1x1": local_topology([50061], [50071]),
    "local 2x3": local_topology([50061, 50062], [50071, 50072, 50073]),
    "kubernetes": kubernetes_topology("roundtable"),
}


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_rendered_config_passes_envoy_validate(name: str, tmp_path: pathlib.Path) -> None:
    """`envoy --mode validate` accepts every rendered config, without deprecated fields."""
    envoy = require_envoy()
    path = write_config(TOPOLOGIES[name], tmp_path / "envoy.json")
    output = validate_config(path, envoy)
    assert "Deprecated field" not in output and "warning" not in output, output


def test_broken_config_fails_envoy_validate(tmp_path: pathlib.Path) -> None:
    """A config Envoy would refuse makes the check fail, with Envoy's reason."""
    envoy = require_envoy()
    config = render(TOPOLOGIES["local 2x3"])
    config["static_resources"]["clusters"][0]["lb_policy"] = "MAGLEVV"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="MAGLEVV"):
        validate_config(path, envoy)
    config = render(TOPOLOGIES["local 2x3"])
    _grpc_routes(config)[0]["route"]["cluster"] = "nowhere"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="nowhere"):
        validate_config(path, envoy)


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_every_hop_hashes_the_session_id_over_maglev(name: str) -> None:
    """MAGLEV, explicit HTTP/2, gRPC health checks with no_traffic_interval, outlier detection, no panic routing."""
    config = render(TOPOLOGIES[name])
    clusters = _grpc_clusters(config)
    assert {cluster["name"] for cluster in clusters} == {"session", "agents"}
    for cluster in clusters:
        assert cluster["lb_policy"] == "MAGLEV"
        options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert "http2_protocol_options" in options["explicit_http_config"]
        (check,) = cluster["health_checks"]
        assert check["grpc_health_check"]["service_name"] in (SESSION_SERVICE.name, AGENT_SERVICE.name)
        assert check["no_traffic_interval"] == check["interval"]
        outliers = cluster["outlier_detection"]
        assert outliers["consecutive_5xx"] > 0 and outliers["consecutive_gateway_failure"] > 0
        assert outliers["enforcing_consecutive_gateway_failure"] == 100  # Envoy's default, 0, only counts
        assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0.0}
        assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] >= 10_000
    for route in _grpc_routes(config):
        assert route["route"]["hash_policy"] == [{"header": {"header_name": SESSION_ID_HEADER}}]


def test_kubernetes_clusters_resolve_headless_services() -> None:
    """Kubernetes finds replicas by STRICT_DNS over headless Services; local mode lists loopback ports."""
    for cluster in _grpc_clusters(render(TOPOLOGIES["kubernetes"])):
        assert cluster["cluster_type"]["name"] == "envoy.cluster.dns"
        assert cluster["cluster_type"]["typed_config"]["all_addresses_in_single_endpoint"] is False
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        host = endpoint["endpoint"]["address"]["socket_address"]["address"]
        assert host == f"roundtable-{cluster['name']}-headless.roundtable.svc.cluster.local"
    local = _grpc_clusters(render(TOPOLOGIES["local 2x3"]))
    assert [cluster["type"] for cluster in local] == ["STATIC", "STATIC"]
    assert [len(cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]) for cluster in local] == [2, 3]


def _route_for(config: dict[str, Any], method: str) -> dict[str, Any]:
    listener = "session" if method.startswith(f"/{SESSION_SERVICE.name}/") else "agents"
    for route in _grpc_routes(config, listener):
        match = route["match"]
        if match.get("path") == method or ("prefix" in match and method.startswith(match["prefix"])):
            return route
    raise AssertionError(f"no route for {method}")


@pytest.mark.parametrize("service", [SESSION_SERVICE, AGENT_SERVICE], ids=lambda service: service.name)
def test_timeouts_and_retries_follow_what_each_method_may_do(service: GrpcService) -> None:
    """Streams have no route timeout; only read-only unary methods retry on UNAVAILABLE or a reset."""
    config = render(TOPOLOGIES["local 2x3"])
    for method in service.methods:
        route = _route_for(config, f"/{service.name}/{method}")["route"]
        retry_on = set(route["retry_policy"]["retry_on"].split(","))
        assert set(NEVER_DELIVERED.split(",")) <= retry_on
        limits = route["max_stream_duration"]
        assert limits["grpc_timeout_header_max"] == "0s"  # the caller's deadline always applies
        if method in service.streaming_methods:
            assert route["timeout"] == limits["max_stream_duration"] == "0s", method
        else:
            assert route["timeout"] == limits["max_stream_duration"] != "0s", method
        if method in service.read_only_methods:
            assert {"unavailable", "reset"} <= retry_on, method
        else:
            assert not {"unavailable", "reset", "5xx", "cancelled"} & retry_on, method
    # Health, reflection and anything new: the catch-all, never retried once delivered.
    other = _route_for(config, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")["route"]
    assert other["max_stream_duration"]["max_stream_duration"] == "0s"
    assert other["retry_policy"]["retry_on"] == NEVER_DELIVERED


def test_method_lists_match_the_protos() -> None:
    """The renderer knows every method of both services, and which ones stream, as the protos say."""
    from services.gen.roundtable.agents.v1 import agents_pb2
    from services.gen.roundtable.session.v1 import session_pb2

    for module, service in ((session_pb2, SESSION_SERVICE), (agents_pb2, AGENT_SERVICE)):
        package, name = service.name.rsplit(".", 1)
        descriptor = module.DESCRIPTOR.services_by_name[name]
        assert descriptor.full_name == service.name
        methods = {method.name: method for method in descriptor.methods}
        assert sorted(service.methods) == sorted(methods), service.name
        streaming = {name for name, method in methods.items() if method.server_streaming or method.client_streaming}
        assert set(service.streaming_methods) == streaming
        assert package == module.DESCRIPTOR.package


def test_description_rejects_what_envoy_could_not_serve() -> None:
    """An empty cluster, two DNS names for one STRICT_DNS cluster, or a bad port fail early."""
    with pytest.raises(ValueError, match="no endpoints"):
        Upstream("session", SESSION_SERVICE, ())
    with pytest.raises(ValueError, match="STRICT_DNS"):
        Upstream("session", SESSION_SERVICE, (Endpoint("a", 1), Endpoint("b", 1)), "STRICT_DNS")
    with pytest.raises(ValueError, match="out of range"):
        Endpoint("127.0.0.1", 70000)


def test_command_line_writes_a_valid_config(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m deploy.envoy local …` writes what local_topology renders."""
    output = tmp_path / "envoy.json"
    assert envoy_cli(["local", "--session-ports", "50061,50062", "--agent-ports", "50071", "-o", str(output)]) == 0
    assert json.loads(output.read_text()) == render(local_topology([50061, 50062], [50071]))
    assert envoy_cli(["kubernetes", "--namespace", "roundtable-dev"]) == 0
    assert json.loads(capsys.readouterr().out) == render(kubernetes_topology("roundtable-dev"))


# --- real traffic ----------------------------------------------------------------------------------


@dataclass
class Backend:
    """One fake replica: a child process serving health and any unary method."""

    instance_id: str
    port: int
    process: asyncio.subprocess.Process

    async def kill(self) -> None:
        """SIGKILL, like a crashed pod: no goodbye to Envoy."""
        await kill(self.process)

    def drain(self) -> None:
        """Health turns NOT_SERVING while calls are still answered, like the start of a graceful stop."""
        self.process.send_signal(signal.SIGUSR1)


async def start_backend(instance_id: str) -> Backend:
    """Run this module as a backend and read the port it bound."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.deploy.test_envoy",
        instance_id,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    async with asyncio.timeout(START_TIMEOUT_SECONDS):
        line = (await process.stdout.readline()).decode()
    assert line.startswith("listening "), line
    return Backend(instance_id, int(line.split()[1]), process)


@dataclass
class Proxy:
    """A running Envoy and the addresses it serves."""

    process: asyncio.subprocess.Process
    session_address: str
    agents_address: str
    admin_port: int

    def clusters(self) -> str:
        """The admin /clusters page (host health flags)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/clusters", timeout=2) as response:
            return str(response.read().decode())


@dataclass
class Fleet:
    """Two backends behind one Envoy, both hops pointing at them."""

    proxy: Proxy
    backends: dict[str, Backend]


@contextlib.asynccontextmanager
async def fleet(tmp_path: pathlib.Path, tuning: Tuning = LOCAL_TUNING) -> AsyncIterator[Fleet]:
    """Start backends a and b and an Envoy in front of them; stop everything after."""
    envoy = require_envoy()
    backends = {name: await start_backend(name) for name in ("a", "b")}
    ports = [backend.port for backend in backends.values()]
    session_port, agents_port, admin_port = free_ports(3)
    topology = local_topology(
        ports,
        ports,
        session_listen_port=session_port,
        agents_listen_port=agents_port,
        admin_port=admin_port,
        tuning=tuning,
    )
    config = write_config(topology, tmp_path / "envoy.json")
    session_address, agents_address = f"127.0.0.1:{session_port}", f"127.0.0.1:{agents_port}"
    started = await start_envoy(
        envoy,
        config,
        tmp_path / "envoy.log",
        session_address=session_address,
        agents_address=agents_address,
        admin_port=admin_port,
    )
    proxy = Proxy(started.process, session_address, agents_address, admin_port)
    try:
        await _wait_until_all_healthy(proxy, ports)
        yield Fleet(proxy, backends)
    finally:
        for child in [started.process, *(backend.process for backend in backends.values())]:
            await kill(child)


async def _wait_until_all_healthy(proxy: Proxy, ports: Iterable[int]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    wanted = [
        f"{cluster}::127.0.0.1:{port}::health_flags::healthy" for cluster in ("session", "agents") for port in ports
    ]
    page = ""
    while time.monotonic() < deadline:
        if proxy.process.returncode is not None:
            raise RuntimeError(f"envoy exited with {proxy.process.returncode}")
        with contextlib.suppress(OSError):
            page = await asyncio.to_thread(proxy.clusters)
            if all(line in page for line in wanted):
                return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"backends not healthy in Envoy:\n{page}")


async def call(channel: grpc.aio.Channel, method: str, session_id: str | None) -> str:
    """One unary call through Envoy; the instance id of the replica that answered."""
    metadata = ((SESSION_ID_HEADER, session_id),) if session_id else None
    stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
    response = stub(b"", metadata=metadata, timeout=2.0)
    await response
    trailers = await response.trailing_metadata()
    return str(dict(trailers or ())[INSTANCE_HEADER])


async def owners(channel: grpc.aio.Channel, method: str, session_ids: list[str], rounds: int = 3) -> dict[str, str]:
    """The replica each session id reached, asserting it was the same one on every round."""
    seen: dict[str, set[str]] = {session_id: set() for session_id in session_ids}
    for _ in range(rounds):
        for session_id in session_ids:
            seen[session_id].add(await call(channel, method, session_id))
    split = {session_id: replicas for session_id, replicas in seen.items() if len(replicas) != 1}
    assert not split, f"sessions reached more than one replica: {split}"
    return {session_id: replicas.pop() for session_id, replicas in seen.items()}


async def moved_within(
    channel: grpc.aio.Channel, method: str, moving: list[str], staying: list[str], survivor: str, seconds: float
) -> tuple[float, int]:
    """Call every session until the moving ones reach the survivor; (seconds it took, failed calls of moving ones).

    The staying sessions (the survivor's own) must answer from the survivor on every call, without a failure.
    """
    start = time.monotonic()
    failures = 0
    pending = set(moving)
    while pending:
        assert time.monotonic() - start < seconds, f"{len(pending)} sessions did not move within {seconds} s"
        for session_id in staying:
            assert await call(channel, method, session_id) == survivor, "a surviving replica's session moved"
        for session_id in sorted(pending):
            try:
                if await call(channel, method, session_id) == survivor:
                    pending.discard(session_id)
            except grpc.aio.AioRpcError:
                failures += 1
        if pending:
            await asyncio.sleep(0.05)
    return time.monotonic() - start, failures


SESSION_IDS = [secrets.token_hex(16) for _ in range(40)]


@pytest.mark.parametrize("hop", ["client→session", "session→agents"])
async def test_a_session_stays_on_one_replica_and_sessions_spread(hop: str, tmp_path: pathlib.Path) -> None:
    """Same x-session-id → same replica, every time; different ids → both replicas; no id → still served."""
    async with fleet(tmp_path) as running:
        address, method = _hop(running, hop)
        async with grpc.aio.insecure_channel(address) as channel:
            placement = await owners(channel, method, SESSION_IDS, rounds=5)
            assert set(placement.values()) == {"a", "b"}, placement
            anonymous = {await call(channel, method, None) for _ in range(40)}
            assert anonymous <= {"a", "b"} and anonymous


def _hop(running: Fleet, hop: str) -> tuple[str, str]:
    if hop == "client→session":
        return running.proxy.session_address, SESSION_CALL
    return running.proxy.agents_address, AGENTS_CALL


@pytest.mark.parametrize("hop", ["client→session", "session→agents"])
async def test_streams_outlive_the_unary_timeout_and_deadlines_hold(hop: str, tmp_path: pathlib.Path) -> None:
    """A server stream runs past the unary ceiling on the session's replica; slow unary calls and deadlines end."""
    tuning = dataclasses.replace(LOCAL_TUNING, unary_timeout_seconds=1.0)
    async with fleet(tmp_path, tuning) as running:
        address, method = _hop(running, hop)
        streaming = STREAM_SESSION_CALL if hop == "client→session" else STREAM_AGENTS_CALL
        async with grpc.aio.insecure_channel(address) as channel:
            session_id = SESSION_IDS[0]
            owner = await call(channel, method, session_id)
            stub: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(streaming)
            started = time.monotonic()
            stream = stub(b"", metadata=((SESSION_ID_HEADER, session_id), (DELAY_HEADER, "500")), timeout=10)
            messages = [message async for message in stream]
            assert len(messages) == STREAM_MESSAGES
            assert time.monotonic() - started > 2 * tuning.unary_timeout_seconds
            assert dict(await stream.trailing_metadata() or ())[INSTANCE_HEADER] == owner

            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
            # No deadline from the caller: Envoy's unary ceiling ends it, long before the replica answers.
            slow = unary(b"", metadata=((SESSION_ID_HEADER, session_id), (DELAY_HEADER, "4000")))
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await slow
            assert cut.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert tuning.unary_timeout_seconds * 0.9 < time.monotonic() - started < 3.0

            late = unary(b"", metadata=((SESSION_ID_HEADER, session_id), (DELAY_HEADER, "800")), timeout=0.3)
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                await late
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("hop", ["client→session", "session→agents"])
async def test_killed_replica_sessions_move_and_survivors_stay(hop: str, tmp_path: pathlib.Path) -> None:
    """kill -9 of b: a's sessions never move; b's reach a and succeed within a few seconds."""
    async with fleet(tmp_path) as running:
        address, method = _hop(running, hop)
        async with grpc.aio.insecure_channel(address) as channel:
            placement = await owners(channel, method, SESSION_IDS)
            on_a = [session_id for session_id, owner in placement.items() if owner == "a"]
            on_b = [session_id for session_id, owner in placement.items() if owner == "b"]
            assert on_a and on_b

            await running.backends["b"].kill()
            took, failures = await moved_within(channel, method, on_b, on_a, "a", MOVE_WITHIN_SECONDS)
            # The survivor's sessions never moved and never failed, and b's stay on a from now on.
            assert await owners(channel, method, on_a + on_b) == dict.fromkeys(on_a + on_b, "a")

            # Envoy's own health check has marked b down as well (not only the retries).
            deadline = time.monotonic() + MOVE_WITHIN_SECONDS
            b_port = running.backends["b"].port
            while f"127.0.0.1:{b_port}::health_flags::healthy" in await asyncio.to_thread(running.proxy.clusters):
                assert time.monotonic() < deadline, "b still healthy in Envoy"
                await asyncio.sleep(0.1)
        print(f"{hop}: {len(on_b)} sessions moved in {took:.2f} s with {failures} failed calls")


@pytest.mark.parametrize("hop", ["client→session", "session→agents"])
async def test_draining_replica_hands_its_sessions_over_without_errors(hop: str, tmp_path: pathlib.Path) -> None:
    """NOT_SERVING (a graceful stop's first step): b's sessions move to a, and no call fails meanwhile."""
    async with fleet(tmp_path) as running:
        address, method = _hop(running, hop)
        async with grpc.aio.insecure_channel(address) as channel:
            placement = await owners(channel, method, SESSION_IDS)
            on_a = [session_id for session_id, owner in placement.items() if owner == "a"]
            on_b = [session_id for session_id, owner in placement.items() if owner == "b"]
            running.backends["b"].drain()
            _took, failures = await moved_within(channel, method, on_b, on_a, "a", MOVE_WITHIN_SECONDS)
            assert failures == 0
            assert set((await owners(channel, method, SESSION_IDS)).values()) == {"a"}


# --- the backend, when this module runs as a program -----------------------------------------------


async def _serve(instance_id: str) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    def delay_seconds(context: grpc.aio.ServicerContext[bytes, bytes]) -> float:
        return float(dict(context.invocation_metadata() or ()).get(DELAY_HEADER, 0)) / 1000

    class AnyMethod(grpc.GenericRpcHandler):
        """Any unary method answers empty bytes; the streaming ones send STREAM_MESSAGES; instance id in trailers."""

        def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            if handler_call_details.method.startswith("/grpc.health."):
                return None

            async def answer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
                await asyncio.sleep(delay_seconds(context))
                context.set_trailing_metadata(((INSTANCE_HEADER, instance_id),))
                return b""

            async def stream(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
                context.set_trailing_metadata(((INSTANCE_HEADER, instance_id),))
                for index in range(STREAM_MESSAGES):
                    await asyncio.sleep(delay_seconds(context))
                    yield str(index).encode()

            if handler_call_details.method in (STREAM_SESSION_CALL, STREAM_AGENTS_CALL):
                return grpc.unary_stream_rpc_method_handler(stream)
            return grpc.unary_unary_rpc_method_handler(answer)

    server = grpc.aio.server()
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_generic_rpc_handlers((AnyMethod(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for name in ("", SESSION_SERVICE.name, AGENT_SERVICE.name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def drain() -> None:
        task = loop.create_task(health_servicer.enter_graceful_shutdown())
        tasks.add(task)

    loop.add_signal_handler(signal.SIGUSR1, drain)
    print(f"listening {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1]))
