"""Client-side go-grpc-prometheus metrics for the calls one service makes to another."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from services.shared import metrics


class _ClientMethodMetrics:
    """Label children of one client method, resolved once."""

    def __init__(self, full_method: str, grpc_type: str) -> None:
        service, method = metrics.split_method(full_method)
        self.labels = (grpc_type, service, method)
        self.started = metrics.CLIENT_STARTED.labels(*self.labels)
        self.seconds = metrics.CLIENT_HANDLING_SECONDS.labels(*self.labels)

    def handled(self, code: grpc.StatusCode) -> None:
        metrics.CLIENT_HANDLED.labels(*self.labels, code.name).inc()


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
