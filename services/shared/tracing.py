"""OpenTelemetry traces for every service: set up once per process, off unless an OTLP endpoint is set.

The standard variables configure it, read by the SDK itself: OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) turns it on and names the collector (OTLP over gRPC),
OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG choose the sampler (default: parent-based, always on),
OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES describe the process, OTEL_PROPAGATORS the wire format
(default W3C traceparent/tracestate), OTEL_BSP_* the batching, and OTEL_SDK_DISABLED=true keeps it off.

Off, no tracer provider exists and every helper here returns at its first line, so the code paths
that would trace cost a global read. The span helpers never put prompt or answer text in a span.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Protocol

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.util.types import AttributeValue

logger = logging.getLogger(__name__)

# The trailing metadata key of a traced call's trace id (32 hex digits), to hand to support.
TRACE_ID_METADATA_KEY = "x-roundtable-trace-id"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None


def setup_tracing(service_name: str, environ: Mapping[str, str] = os.environ) -> TracerProvider | None:
    """Install this process's tracer provider exporting over OTLP/gRPC; None (tracing off) without an endpoint."""
    global _provider, _tracer
    shutdown_tracing()
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if not any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES):
        return None
    # Imported only when on: the SDK and the exporter cost start-up time and memory a process without them saves.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_SERVICE_NAME, when set, wins over the service's own name.
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    # No sampler argument: the SDK reads OTEL_TRACES_SAMPLER; the exporter reads its other OTEL_EXPORTER_OTLP_*
    # (headers, certificates, timeout, compression) itself, and http:// in the endpoint means no TLS.
    provider = TracerProvider(resource=Resource.create(attributes))
    endpoint = _endpoint(environ)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    _provider = provider
    _tracer = provider.get_tracer("roundtable")
    logger.info("tracing on: spans of %s go to %s", service_name, endpoint)
    return provider


def _endpoint(environ: Mapping[str, str]) -> str:
    return next(environ[name] for name in ENDPOINT_VARIABLES if environ.get(name, "").strip())


def shutdown_tracing() -> None:
    """Export what is buffered and remove the provider (process exit, tests); tracing is off afterwards."""
    global _provider, _tracer
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def provider() -> TracerProvider | None:
    """The installed tracer provider, or None while tracing is off."""
    return _provider


def is_on() -> bool:
    """Whether a tracer provider is installed."""
    return _tracer is not None


def current_context() -> Context:
    """The active OpenTelemetry context, to parent spans started later on another task."""
    return otel_context.get_current()


def inject(carrier: MutableMapping[str, str]) -> None:
    """Write the active span's traceparent (and tracestate) into the carrier; nothing while tracing is off."""
    if _tracer is not None:
        propagate.inject(carrier)


def extract(carrier: Mapping[str, str]) -> Context | None:
    """The context a carrier's traceparent names, or None (no parent) when it has none or tracing is off."""
    if _tracer is None or not carrier:
        return None
    return propagate.extract(carrier)


def start_span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: Context | None = None,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> Span | None:
    """Start a span (child of parent, else of the active span) without making it active; None while off."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, context=parent, kind=kind, attributes=attributes)


@contextlib.contextmanager
def active(span: Span | None) -> Iterator[None]:
    """Make the span the active one for this block (spans started in it, log lines, traceparent)."""
    token = attach(span)
    try:
        yield
    finally:
        detach(token)


def fail(span: Span | None, error: BaseException | str) -> None:
    """Mark the span failed: error.type (the exception's class, or the given name) and an ERROR status."""
    if span is None:
        return
    error_type = error if isinstance(error, str) else type(error).__qualname__
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, error_type))


def trace_id_of(span: Span | None) -> str:
    """The span's trace id as 32 hex digits, or '' when there is no sampled span."""
    if span is None:
        return ""
    span_context = span.get_span_context()
    if not span_context.is_valid or not span_context.trace_flags.sampled:
        return ""
    return trace.format_trace_id(span_context.trace_id)


def active_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the active span, as hex, for log lines; None without one or while off."""
    if _tracer is None:
        return None
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return trace.format_trace_id(span_context.trace_id), trace.format_span_id(span_context.span_id)


def start_llm_span(*, model: str, base_url: str, max_tokens: int, temperature: float) -> Span | None:
    """A CLIENT span for one chat completion, named and attributed per the GenAI semantic conventions."""
    if _tracer is None:
        return None
    # Deferred: urllib is not needed while tracing is off.
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    attributes: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": model,
        "gen_ai.request.max_tokens": max_tokens,
        "gen_ai.request.temperature": temperature,
        "server.address": url.hostname or "",
    }
    port = url.port or (443 if url.scheme == "https" else 80)
    attributes["server.port"] = port
    return _tracer.start_span(f"chat {model}", kind=SpanKind.CLIENT, attributes=attributes)


class TokenCounts(Protocol):
    """What an LLM call reports it used (TokenUsage)."""

    prompt_tokens: int
    completion_tokens: int


def end_llm_span(span: Span | None, usage: TokenCounts | None, *, error: BaseException | None) -> None:
    """Record the call's token usage (0 when it reported none) or its error.type, and end its span."""
    if span is None:
        return
    if error is not None:
        fail(span, error)
    else:
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens if usage is not None else 0)
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens if usage is not None else 0)
    span.end()


def add_event(name: str, attributes: Mapping[str, AttributeValue]) -> None:
    """Add an event (a retry, say) to the active span; nothing while off."""
    if _tracer is not None:
        trace.get_current_span().add_event(name, attributes)


@contextlib.contextmanager
def detached() -> Iterator[None]:
    """No active span in this block: tasks started in it belong to no one trace (a lane shared by many)."""
    if _tracer is None:
        yield
        return
    token = otel_context.attach(Context())
    try:
        yield
    finally:
        otel_context.detach(token)


def attach(span: Span | None) -> contextvars.Token[Context] | None:
    """Make the span active until detach(token) is called with what this returns (a span held across awaits)."""
    if span is None:
        return None
    return otel_context.attach(trace.set_span_in_context(span))


def detach(token: contextvars.Token[Context] | None) -> None:
    """Undo attach()."""
    if token is not None:
        otel_context.detach(token)
