"""The service credential: a shared token the internal services (agents, monitor) require of every caller.

The session service authenticates people with API keys; the internal contracts are called only by
other Roundtable processes (the session's agent channel, every instance's monitor reporter, the
operator's monitor tools), which send `authorization: Bearer <internal token>`. Health and reflection
are not internal contracts, so probes and grpcurl keep working without it.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from services.shared.errors import Unauthenticated

INTERNAL_TOKEN_ENV = "ROUNDTABLE_INTERNAL_TOKEN"
METADATA_KEY = "authorization"
BEARER_PREFIX = "Bearer "
MIN_TOKEN_CHARS = 16
# DESIGN.md §3: the internal contracts. Only their methods require the service credential.
INTERNAL_GRPC_SERVICES = frozenset({"roundtable.agents.v1.AgentService", "roundtable.monitor.v1.MonitorService"})


def is_internal_method(full_method: str) -> bool:
    """Whether /package.Service/Method belongs to an internal contract."""
    return full_method.lstrip("/").split("/", 1)[0] in INTERNAL_GRPC_SERVICES


class ServiceTokenCheck:
    """Checks a call's metadata against the internal token, in constant time."""

    def __init__(self, token: str) -> None:
        self._expected = f"{BEARER_PREFIX}{token}".encode()

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """Raise Unauthenticated unless the metadata carries the internal token."""
        presented = next((value for key, value in metadata or () if key == METADATA_KEY), None)
        if presented is None:
            raise Unauthenticated("this internal service needs the service credential (authorization: Bearer …)")
        if not hmac.compare_digest(presented.encode() if isinstance(presented, str) else presented, self._expected):
            raise Unauthenticated("the service credential is not valid")


def _with_token(details: grpc.aio.ClientCallDetails, entry: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(*entry)
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=metadata,
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class _AddToken:
    """Adds the token to every call, whatever its kind; a call's metadata is a copy, never shared."""

    def __init__(self, token: str) -> None:
        self._entry = (METADATA_KEY, f"{BEARER_PREFIX}{token}")

    async def _intercept(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_token(details, self._entry), request)


class _UnaryUnary(_AddToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request)


class _UnaryStream(_AddToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request)


class _StreamUnary(_AddToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request_iterator)


class _StreamStream(_AddToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request_iterator)


def token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors sending the internal token on every call of a channel."""
    return [_UnaryUnary(token), _UnaryStream(token), _StreamUnary(token), _StreamStream(token)]
