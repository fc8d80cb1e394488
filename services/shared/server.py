"""The one place a gRPC server is built, started and stopped, for every service."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.shared.health import LIVENESS_SERVICE, HealthCheck, HealthComponents
from services.shared.interceptor import ServerInterceptor
from services.shared.logs import setup_logging
from services.shared.metrics import MetricsServer, watch_event_loop_lag
from services.shared.reporter import InstanceLoad, MonitorReporter
from services.shared.service_auth import ServiceTokenCheck
from services.shared.settings import EventLoop, S, ServiceSettings, load_settings
from services.shared.tls import create_channel, server_credentials
from services.shared.tracing import setup_tracing, shutdown_tracing

logger = logging.getLogger(__name__)


class Service(Protocol):
    """What a service hands the host: its servicers and its own start/drain/close steps."""

    name: str
    grpc_services: Sequence[str]

    async def start(self) -> None:
        """Open resources and start background work; runs before register()."""

    def register(self, server: grpc.aio.Server) -> None:
        """Add the servicers to the server."""

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new work and let in-flight work finish, within the grace period."""

    async def close(self) -> None:
        """Release resources after the server has stopped."""

    def load(self) -> InstanceLoad:
        """Current load, for monitor reports."""


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Channel arguments every server uses."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Above admission's limits, so overload is answered by RESOURCE_EXHAUSTED, not CANCELLED.
        ("grpc.server.max_pending_requests", settings.max_pending_rpcs),
        ("grpc.server.max_pending_requests_hard_limit", settings.max_pending_rpcs * 3),
        # gRPC core cancels a call the application has not picked up within this time (default 30 s), and
        # the aio server picks calls up from its event loop: on a saturated loop they were CANCELLED before
        # any handler saw them. At least the longest deadline a caller gives, so the caller's deadline and
        # max_pending_requests bound the wait, not a limit nobody chose.
        ("grpc.server_max_unrequested_time_in_server", settings.max_unrequested_rpc_seconds),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


class ServiceHost:
    """A service's gRPC server with health, reflection, metrics and monitor reports."""

    def __init__(self, settings: ServiceSettings, service: Service) -> None:
        self.settings = settings
        self.service = service
        self.health = health.aio.HealthServicer()
        service_token = ServiceTokenCheck(settings.internal_token_value) if settings.internal_token_value else None
        self.server = grpc.aio.server(
            interceptors=[ServerInterceptor(settings.instance_id, service_token)], options=server_options(settings)
        )
        self.port = 0
        self.metrics: MetricsServer | None = None
        self._reporter: MonitorReporter | None = None
        self._lag_watch: asyncio.Task[None] | None = None
        self._components: HealthComponents | None = None
        self._stopping = False

    @property
    def address(self) -> str:
        """host:port the server listens on."""
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> None:
        """Bind, start serving, and mark every service SERVING, or NOT_SERVING while a health component fails."""
        # Read before anything opens, so unreadable certificates stop start-up with nothing to clean up.
        credentials = server_credentials(self.settings)
        # The service builds its servicers (store, channels) before they are registered.
        await self.service.start()
        self.service.register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.settings.enable_reflection:
            names = [*self.service.grpc_services, health.SERVICE_NAME, reflection.SERVICE_NAME]
            reflection.enable_server_reflection(names, self.server)
        bind = f"{self.settings.host}:{self.settings.port}"
        if credentials is None:
            self.port = self.server.add_insecure_port(bind)
        else:
            self.port = self.server.add_secure_port(bind, credentials)
        if self.port == 0:
            raise OSError(f"cannot bind {self.settings.host}:{self.settings.port}")
        if self.settings.metrics_port >= 0:
            self.metrics = MetricsServer(self.settings.host, self.settings.metrics_port)
        try:
            await self.server.start()
        except BaseException:
            if self.metrics is not None:
                self.metrics.stop()
            raise
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        # Optional (HasHealthChecks); looked up, not isinstance-checked: protocol checks cache per class.
        declare: Callable[[], Mapping[str, HealthCheck]] | None = getattr(self.service, "health_checks", None)
        checks = declare() if declare is not None else {}
        self._components = HealthComponents(
            checks,
            self.health,
            tuple(self.service.grpc_services),
            interval_seconds=self.settings.health_check_interval_seconds,
            timeout_seconds=self.settings.health_check_timeout_seconds,
            failures_before_not_serving=self.settings.health_failures_before_not_serving,
        )
        # SERVING unless a component already fails: the first answer a probe gets is already true.
        await self._components.evaluate()
        if checks:
            self._components.start()
        if self.settings.monitor_address:
            self._reporter = MonitorReporter(
                open_channel=functools.partial(create_channel, self.settings.monitor_address, self.settings),
                interval_seconds=self.settings.report_interval_seconds,
                instance_id=self.settings.instance_id,
                service=self.service.name,
                address=self.address,
                grpc_services=list(self.service.grpc_services),
                load=self.service.load,
            )
            self._reporter.start()
        self._lag_watch = asyncio.create_task(
            watch_event_loop_lag(self.settings.event_loop_lag_interval_seconds), name="event-loop-lag"
        )
        logger.info(
            "%s service listening on %s (%s; metrics on %s; %s event loop)",
            self.service.name,
            self.address,
            _transport(self.settings),
            f"{self.settings.host}:{self.metrics.port}" if self.metrics else "off",
            loop_name(asyncio.get_running_loop()),
        )

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Graceful stop: NOT_SERVING first so balancers move away, then drain, then close."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        if self._components is not None:
            await self._components.stop()  # a recovering component must not turn a stopping host SERVING
        await self.health.enter_graceful_shutdown()
        await self.service.drain(grace)
        # stop(grace) refuses new RPCs at once and cancels those still running after `grace` seconds.
        await self.server.stop(grace)
        if self._reporter is not None:
            await self._reporter.stop()
        await self.service.close()
        if self._lag_watch is not None:
            self._lag_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_watch
        if self.metrics is not None:
            self.metrics.stop()
        logger.info("%s service stopped", self.service.name)


def _transport(settings: ServiceSettings) -> str:
    if settings.tls_cert_file is None:
        return "plaintext"
    return "mTLS" if settings.tls_client_ca_file is not None else "TLS"


def loop_factory(event_loop: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the event loop to run on: uvloop's, or None for asyncio's default."""
    if event_loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if event_loop == "uvloop":
            raise
        return None  # auto: uvloop has no build for this platform
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """'uvloop' or 'asyncio', for the start-up log line."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run_service(settings_cls: type[S], build: Callable[[S], Service], argv: list[str] | None = None) -> None:
    """Entry point of a service process: settings, logging, serve until SIGTERM/SIGINT."""
    settings = load_settings(settings_cls, argv)
    setup_logging(settings, settings_cls.__name__)
    # uvloop: ~8 % less CPU per discussion in the benchmarks (bench/findings.md, 2c); grpc.aio runs on it.
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        runner.run(serve(settings, build))


async def serve(settings: S, build: Callable[[S], Service]) -> None:
    """Run a service until SIGTERM or SIGINT, then stop it gracefully."""
    service = build(settings)
    # Once per process, from the OTEL_* variables: off (no provider at all) unless an OTLP endpoint is set.
    setup_tracing(f"roundtable-{service.name}")
    host = ServiceHost(settings, service)
    await host.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # A parent (roundtable up, a test) reads this line to learn the ports.
    metrics_port = host.metrics.port if host.metrics else -1
    print(f"{service.name} listening on {host.address} metrics {metrics_port}", flush=True)
    await stop.wait()
    logger.info("%s service: shutdown requested", service.name)
    await host.stop()
    shutdown_tracing()  # exports the spans still buffered
