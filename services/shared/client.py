"""Client-side go-grpc-prometheus metrics for the calls one service makes to another (carrying the active
trace's traceparent when tracing is on), and a health check of the service a channel leads to."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.shared import metrics, tracing
from services.shared.health import ComponentFailing, HealthCheck


class _ClientMethodMetrics:
    """Label children of one client method, resolved once."""

    def __init__(self, full_method: str, grpc_type: str) -> None:
        service, method = metrics.split_method(full_method)
        self.labels = (grpc_type, service, method)
        self.started = metrics.CLIENT_STARTED.labels(*self.labels)
        self.seconds = metrics.CLIENT_HANDLING_SECONDS.labels(*self.labels)

    def handled(self, code: grpc.StatusCode) -> None:
        metrics.CLIENT_HANDLED.labels(*self.labels, code.name).inc()


def _traced(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    """The call's details with the active span's traceparent (and tracestate) added to its metadata."""
    carrier: dict[str, str] = {}
    tracing.inject(carrier)
    if not carrier:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *carrier.items())
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


def _method_name(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self._stats: dict[str, _ClientMethodMetrics] = {}

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        name = _method_name(client_call_details)
        stats = self._stats.get(name) or self._stats.setdefault(name, _ClientMethodMetrics(name, "unary"))
        stats.started.inc()
        started = time.perf_counter()
        if tracing.is_on():
            client_call_details = _traced(client_call_details)
        call = await continuation(client_call_details, request)
        call.add_done_callback(lambda finished: _observe(stats, started, finished))
        return call


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self) -> None:
        self._stats: dict[str, _ClientMethodMetrics] = {}

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> AsyncIterator[Any] | grpc.aio.UnaryStreamCall:
        name = _method_name(client_call_details)
        stats = self._stats.get(name) or self._stats.setdefault(name, _ClientMethodMetrics(name, "server_stream"))
        stats.started.inc()
        started = time.perf_counter()
        if tracing.is_on():
            client_call_details = _traced(client_call_details)
        call = await continuation(client_call_details, request)
        call.add_done_callback(lambda finished: _observe(stats, started, finished))
        return call


_pending: set[asyncio.Future[None]] = set()


def _observe(stats: _ClientMethodMetrics, started: float, call: grpc.aio.Call) -> None:
    """Record a finished call; its code is only readable by awaiting, so that runs as a small task."""
    seconds = time.perf_counter() - started

    async def record() -> None:
        stats.seconds.observe(seconds)
        stats.handled(grpc.StatusCode.CANCELLED if call.cancelled() else await call.code())

    task = asyncio.ensure_future(record())
    _pending.add(task)  # the loop holds tasks weakly; keep it alive until it has run
    task.add_done_callback(_pending.discard)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors counting and timing every call made on a channel."""
    return [_UnaryUnary(), _UnaryStream()]


def dependency_health_check(channel: grpc.aio.Channel, grpc_service: str) -> HealthCheck:
    """A health component for the service a channel leads to: it fails unless that service answers SERVING.

    It asks grpc.health.v1 through the channel, so behind a balancer (Envoy) it fails when no replica
    is healthy, not only when the balancer is unreachable. After an outage, the check passes once the
    channel reconnects (its grpc.max_reconnect_backoff_ms bounds how late).
    """
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=grpc_service)

    async def check() -> None:
        try:
            reply = await stub.Check(request)
        except grpc.aio.AioRpcError as error:
            raise ComponentFailing(f"{grpc_service}: {error.code().name} {error.details() or ''}".strip()) from None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            raise ComponentFailing(f"{grpc_service}: {status}")

    return check
