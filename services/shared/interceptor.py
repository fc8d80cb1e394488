"""The one server interceptor: go-grpc-prometheus metrics, domain-error mapping, the service credential check
and, when tracing is on, a server span per call (the caller's traceparent its parent)."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind

from services.shared import metrics, tracing
from services.shared.errors import InvalidArgument, RoundtableError, to_grpc_status
from services.shared.service_auth import ServiceTokenCheck, is_internal_method

logger = logging.getLogger(__name__)

INSTANCE_METADATA_KEY = "x-roundtable-instance"

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class _MethodMetrics:
    """Label children of one method, resolved once: labels() costs more than the increment."""

    def __init__(self, full_method: str, grpc_type: str) -> None:
        service, method = metrics.split_method(full_method)
        self._labels = (grpc_type, service, method)
        self.started = metrics.SERVER_STARTED.labels(*self._labels)
        self.received = metrics.SERVER_MSG_RECEIVED.labels(*self._labels)
        self.sent = metrics.SERVER_MSG_SENT.labels(*self._labels)
        self.seconds = metrics.SERVER_HANDLING_SECONDS.labels(*self._labels)
        self._handled: dict[grpc.StatusCode, Any] = {}
        self.traced = not full_method.startswith(_UNTRACED_PREFIX) and full_method not in _UNTRACED_METHODS

    def handled(self, code: grpc.StatusCode) -> Any:
        """The handled_total child for this code."""
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = metrics.SERVER_HANDLED.labels(*self._labels, code.name)
        return child


class Undecodable:
    """Stands in for a request whose bytes do not parse, so the handler can answer INVALID_ARGUMENT.

    A deserializer that raises makes grpc.aio answer UNKNOWN before any interceptor runs.
    """

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as error:
            return Undecodable(InvalidArgument(f"the request is not a valid protobuf message: {error}"))

    return deserialize


def _final_code(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return default


async def _abort(context: grpc.aio.ServicerContext, error: RoundtableError) -> None:
    await context.abort_with_status(to_grpc_status(error))


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC, turns RoundtableError into its status with details, and, given a
    service token check, refuses internal-contract calls without the credential (UNAUTHENTICATED)."""

    def __init__(self, instance_id: str = "", service_token: ServiceTokenCheck | None = None) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        # Sent back in trailing metadata: which replica served a call (affinity checks, debugging).
        self._instance = ((INSTANCE_METADATA_KEY, instance_id),) if instance_id else ()
        self._service_token = service_token

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        """Return the cached wrapped handler for the method."""
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        deserializer = _tolerant(handler.request_deserializer)
        guard = self._service_token if self._service_token is not None and is_internal_method(method) else None
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary, guard),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                self._server_stream(method, handler.unary_stream, guard),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            # A streaming handler that writes through context.write (health Watch) is a coroutine.
            return grpc.unary_stream_rpc_method_handler(
                self._unary(method, cast(Callable[..., Awaitable[Any]], handler.unary_stream), guard, "server_stream"),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if guard is not None:
            return _guarded_client_streaming(handler, guard)
        # Client- and bidi-streaming RPCs (reflection) are not part of our contracts; pass them through.
        return handler

    def _unary(
        self,
        method: str,
        behavior: Callable[..., Awaitable[Any]],
        guard: ServiceTokenCheck | None,
        grpc_type: str = "unary",
    ) -> Callable[..., Awaitable[Any]]:
        stats = _MethodMetrics(method, grpc_type)

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _Call(method, stats, context) as call:
                self._admit(request, context, guard, call)
                response = await behavior(request, context)
                call.code = _final_code(context, grpc.StatusCode.OK)
                if call.code is grpc.StatusCode.OK:
                    stats.sent.inc()
                return response

        return handle

    def _server_stream(
        self, method: str, behavior: Callable[..., AsyncIterator[Any]], guard: ServiceTokenCheck | None
    ) -> Callable[..., AsyncIterator[Any]]:
        stats = _MethodMetrics(method, "server_stream")

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with _Call(method, stats, context) as call:
                self._admit(request, context, guard, call)
                async for response in behavior(request, context):
                    stats.sent.inc()
                    yield response
                call.code = _final_code(context, grpc.StatusCode.OK)

        return handle

    def _admit(
        self, request: Any, context: grpc.aio.ServicerContext, guard: ServiceTokenCheck | None, call: _Call
    ) -> None:
        """Name this replica and the call's trace in the trailers, check the credential, refuse a request that did
        not parse."""
        trace_id = tracing.trace_id_of(call.span)
        if trace_id:
            context.set_trailing_metadata((*self._instance, (tracing.TRACE_ID_METADATA_KEY, trace_id)))
        elif self._instance:
            context.set_trailing_metadata(self._instance)
        if guard is not None:
            guard.check(context.invocation_metadata())
        if isinstance(request, Undecodable):
            raise request.error


class _Call:
    """One RPC, unary or streaming alike: counted and timed, and its errors turned into statuses on the way out."""

    def __init__(self, method: str, stats: _MethodMetrics, context: grpc.aio.ServicerContext) -> None:
        self._method = method
        self._stats = stats
        self._context = context
        self._started = 0.0
        # The handler sets OK (or the code it set on the context) when it finished; an error sets its own.
        self.code = grpc.StatusCode.UNKNOWN
        self.span: Span | None = None
        self._span_token: contextvars.Token[Context] | None = None

    async def __aenter__(self) -> _Call:
        self._stats.started.inc()
        self._stats.received.inc()
        self._started = time.perf_counter()
        if self._stats.traced and tracing.is_on():
            self._start_span()
        return self

    def _start_span(self) -> None:
        """A server span, the caller's traceparent its parent, active for the handler."""
        carrier = {key: value for key, value in self._context.invocation_metadata() or () if isinstance(value, str)}
        service, method = metrics.split_method(self._method)
        self.span = tracing.start_span(
            self._method.lstrip("/"),
            kind=SpanKind.SERVER,
            parent=tracing.extract(carrier),
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )
        self._span_token = tracing.attach(self.span)

    def _end_span(self) -> None:
        span = self.span
        if span is None:
            return
        tracing.detach(self._span_token)
        span.set_attribute("rpc.grpc.status_code", self.code.value[0])
        if self.code in _SERVER_ERROR_CODES:
            tracing.fail(span, self.code.name)
        span.end()

    async def __aexit__(
        self, error_type: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            if isinstance(error, RoundtableError):
                self.code = error.code
                await _abort(self._context, error)
            elif isinstance(error, (asyncio.CancelledError, GeneratorExit)):
                self.code = grpc.StatusCode.CANCELLED
            elif isinstance(error, grpc.aio.AbortError):
                self.code = _final_code(self._context, grpc.StatusCode.UNKNOWN)
            elif isinstance(error, Exception):
                logger.error("unhandled error in %s", self._method, exc_info=error)
                self.code = grpc.StatusCode.INTERNAL
                await self._context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        finally:
            self._stats.handled(self.code).inc()
            self._stats.seconds.observe(time.perf_counter() - self._started)
            self._end_span()


# Health checks, reflection and every instance's periodic report to the monitor: a root trace every few
# seconds from each would bury the discussions' traces.
_UNTRACED_PREFIX = "/grpc."
_UNTRACED_METHODS = frozenset({"/roundtable.monitor.v1.MonitorService/ReportInstance"})
# The codes that mark a server span failed, as the OpenTelemetry gRPC conventions list them.
_SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _guarded_client_streaming(handler: grpc.RpcMethodHandler, guard: ServiceTokenCheck) -> grpc.RpcMethodHandler:
    """A client- or bidi-streaming handler of an internal contract that checks the credential first."""

    async def check(context: grpc.aio.ServicerContext) -> None:
        try:
            guard.check(context.invocation_metadata())
        except RoundtableError as error:
            await _abort(context, error)  # raises: the handler never runs

    behavior = handler.stream_stream or handler.stream_unary
    if inspect.isasyncgenfunction(behavior):
        generate = cast(Callable[..., AsyncIterator[Any]], behavior)

        async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(context)
            async for response in generate(request_iterator, context):
                yield response

        guarded: Callable[..., Any] = stream
    else:
        call = cast(Callable[..., Awaitable[Any]], behavior)

        async def unary(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            return await call(request_iterator, context)

        guarded = unary
    make = grpc.stream_stream_rpc_method_handler if handler.stream_stream else grpc.stream_unary_rpc_method_handler
    return make(
        guarded,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
