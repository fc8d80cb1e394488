"""The asyncio client of Roundtable's session API: create, stream (resuming by itself), read, list, cancel, delete."""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import os
import pathlib
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc

from roundtable_client._gen.roundtable.session.v1 import session_pb2, session_pb2_grpc
from roundtable_client.errors import FailedPrecondition, NotFound, RoundtableError, Unavailable, from_rpc_error
from roundtable_client.events import DiscussionStatus, Event, StatusChanged, from_proto
from roundtable_client.retry import RETRYABLE_CODES, Retry, RetryPolicy

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:50051"
SESSION_ID_HEADER = "x-session-id"
Discussion = session_pb2.Discussion

# A stream only reads, so reopening it after any of these is safe; they are what a dropped connection,
# a lost replica or a proxy's reset look like. The rest (NOT_FOUND, UNAUTHENTICATED, …) would fail again.
RESUMABLE_STREAM_CODES = RETRYABLE_CODES | {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}

T = TypeVar("T")

# A connection that goes silent (a dead peer, a partition: no reset, no FIN) is found by pings, so a
# stream waiting on it is reopened instead of hanging. Roundtable's servers accept a ping every 10 s;
# an unanswered one closes the connection after 10 s (gRPC's own default waits a minute).
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
)


def env(name: str, default: str = "") -> str:
    """A ROUNDTABLE_* environment variable (ROUNDTABLE_ADDRESS, ROUNDTABLE_API_KEY, ROUNDTABLE_TLS_*)."""
    return os.environ.get(f"ROUNDTABLE_{name}", default)


@dataclass(frozen=True)
class Tls:
    """TLS to the session service: trust roots (None: the system's) and, for mTLS, a client certificate."""

    ca_file: pathlib.Path | None = None
    cert_file: pathlib.Path | None = None
    key_file: pathlib.Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")

    @classmethod
    def from_env(cls) -> Tls | None:
        """From ROUNDTABLE_TLS_CA_FILE, _CLIENT_CERT_FILE and _CLIENT_KEY_FILE; None (plaintext) without a CA file."""
        ca_file = env("TLS_CA_FILE")
        if not ca_file:
            return None
        cert_file, key_file = env("TLS_CLIENT_CERT_FILE"), env("TLS_CLIENT_KEY_FILE")
        return cls(
            ca_file=pathlib.Path(ca_file),
            cert_file=pathlib.Path(cert_file) if cert_file else None,
            key_file=pathlib.Path(key_file) if key_file else None,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials; the files are read here, once."""

        def read(path: pathlib.Path | None) -> bytes | None:
            return None if path is None else path.read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


@dataclass
class _Attempts:
    """What the retries of one call saw: an UNAVAILABLE may have lost the reply of an attempt that went through."""

    retried_unavailable: bool = False


class Client:
    """A connection to the session service; use it as `async with Client() as client:`.

    Unspecified arguments come from the environment as the CLI reads it: ROUNDTABLE_ADDRESS (else
    127.0.0.1:50051), ROUNDTABLE_API_KEY, ROUNDTABLE_TLS_CA_FILE (TLS when set), ROUNDTABLE_TLS_CLIENT_*.
    Every unary call is retried on RESOURCE_EXHAUSTED and UNAVAILABLE by `retry` within its deadline
    (`timeout_seconds`, retries included); a stream is reopened after the last event it delivered
    until it makes no progress for `resume_timeout_seconds`.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        api_key: str | None = None,
        tls: Tls | bool | None = None,
        timeout_seconds: float = 60.0,
        resume_timeout_seconds: float = 60.0,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[Retry], None] | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.address = address or env("ADDRESS", DEFAULT_ADDRESS)
        key = env("API_KEY") if api_key is None else api_key
        if tls is None:
            tls = Tls.from_env()
        elif tls is True:
            tls = Tls.from_env() or Tls()
        self._tls: Tls | None = tls or None
        self._timeout_seconds = timeout_seconds
        self._resume_timeout_seconds = resume_timeout_seconds
        self._retry = retry or RetryPolicy()
        self._on_retry = on_retry
        self._interceptors = list(interceptors)
        # The caller's options win over the defaults they name.
        self._channel_options = list({**dict(DEFAULT_CHANNEL_OPTIONS), **dict(channel_options)}.items())
        self._auth: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {key}"),) if key else ()
        self._channel: grpc.aio.Channel | None = None
        self._stub_cache: session_pb2_grpc.SessionServiceAsyncStub | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls still running fail CANCELLED."""
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub_cache = None, None

    async def create(
        self,
        topic: str,
        *,
        personas: Sequence[str] = (),
        rounds: int = 1,
        ttl: datetime.timedelta | None = None,
        token_budget: int = 0,
        summary: bool = True,
        max_duration: datetime.timedelta | None = None,
        request_id: str | None = None,
        discussion_id: str | None = None,
        timeout_seconds: float | None = None,
    ) -> Discussion:
        """Open a discussion; safe to retry: its request_id and proposed id make a repeat return the first one.

        `discussion_id` is proposed to the server (32 lowercase hex; minted here when not given) and sent
        as x-session-id, so a load balancer hashing on it routes the create like every later call.
        `ttl` is the idle time before it expires, `max_duration` the longest it may run, `token_budget`
        the most tokens it may spend (0: no limit); `summary=False` asks for the panel only (no moderator).
        """
        request = session_pb2.CreateDiscussionRequest(
            topic=topic,
            personas=list(personas),
            rounds=rounds,
            request_id=request_id or uuid.uuid4().hex,
            token_budget=token_budget,
            skip_summary=not summary,
        )
        if ttl is not None:
            request.ttl.FromTimedelta(ttl)
        if max_duration is not None:
            request.timeout.FromTimedelta(max_duration)
        proposed_id = discussion_id or secrets.token_hex(16)
        stub, metadata = self._stub(), self._metadata(proposed_id)
        return await self._unary(
            "CreateDiscussion",
            lambda remaining: stub.CreateDiscussion(request, metadata=metadata, timeout=remaining),
            timeout_seconds,
        )

    async def get(self, discussion_id: str, *, timeout_seconds: float | None = None) -> Discussion:
        """The whole document: status, every result so far, the summary, token usage."""
        request = session_pb2.GetDiscussionRequest(discussion_id=discussion_id)
        stub, metadata = self._stub(), self._metadata(discussion_id)
        return await self._unary(
            "GetDiscussion",
            lambda remaining: stub.GetDiscussion(request, metadata=metadata, timeout=remaining),
            timeout_seconds,
        )

    async def cancel(self, discussion_id: str, *, timeout_seconds: float | None = None) -> Discussion:
        """Stop a discussion now (partial results kept); FailedPrecondition when it had already finished."""
        request = session_pb2.CancelDiscussionRequest(discussion_id=discussion_id)
        stub, metadata = self._stub(), self._metadata(discussion_id)
        attempts = _Attempts()
        try:
            return await self._unary(
                "CancelDiscussion",
                lambda remaining: stub.CancelDiscussion(request, metadata=metadata, timeout=remaining),
                timeout_seconds,
                attempts,
            )
        except FailedPrecondition:
            # After a lost reply, "already finished" may be this very cancel's doing.
            if attempts.retried_unavailable:
                doc = await self.get(discussion_id, timeout_seconds=timeout_seconds)
                if DiscussionStatus.of(doc.status) == DiscussionStatus.CANCELLED:
                    return doc
            raise

    async def delete(self, discussion_id: str, *, timeout_seconds: float | None = None) -> None:
        """Remove a discussion, its events and its agents."""
        request = session_pb2.DeleteDiscussionRequest(discussion_id=discussion_id)
        stub, metadata = self._stub(), self._metadata(discussion_id)
        attempts = _Attempts()
        try:
            await self._unary(
                "DeleteDiscussion",
                lambda remaining: stub.DeleteDiscussion(request, metadata=metadata, timeout=remaining),
                timeout_seconds,
                attempts,
            )
        except NotFound:
            if not attempts.retried_unavailable:  # after a lost reply, gone is what was asked
                raise

    async def list(
        self, *, status: DiscussionStatus | None = None, page_size: int = 100, timeout_seconds: float | None = None
    ) -> AsyncIterator[Discussion]:
        """The caller's discussions, newest first, every page followed (documents without results)."""
        stub, metadata = self._stub(), self._metadata()
        page_token = ""
        while True:
            request = session_pb2.ListDiscussionsRequest(
                page_size=page_size,
                page_token=page_token,
                status=session_pb2.DiscussionStatus.ValueType(status or DiscussionStatus.UNSPECIFIED),
            )
            page = await self._unary(
                "ListDiscussions",
                functools.partial(self._list_page, stub, request, metadata),
                timeout_seconds,
            )
            for doc in page.discussions:
                yield doc
            page_token = page.next_page_token
            if not page_token:
                return

    async def events(self, discussion_id: str, *, after_sequence: int = 0) -> AsyncIterator[Event]:
        """Every event after `after_sequence`, once each and in order, until the terminal status.

        A dropped stream (a lost replica, a proxy's reset) is reopened after the last event delivered,
        with the retry policy's backoff; it gives up, raising the last error, after
        `resume_timeout_seconds` without a new event. Errors that would recur (NotFound, …) raise at once.
        """
        loop = asyncio.get_running_loop()
        stub = self._stub()
        metadata = self._metadata(discussion_id)
        last_sequence = after_sequence
        retry_number = 0
        give_up_at = loop.time() + self._resume_timeout_seconds
        while True:
            request = session_pb2.StreamDiscussionRequest(discussion_id=discussion_id, after_sequence=last_sequence)
            call = stub.StreamDiscussion(request, metadata=metadata)
            failure: RoundtableError | None = None
            try:
                async for message in call:
                    if message.sequence <= last_sequence:  # already delivered before the stream was reopened
                        continue
                    last_sequence = message.sequence
                    retry_number = 0
                    give_up_at = loop.time() + self._resume_timeout_seconds
                    event = from_proto(message)
                    if event is None:  # a kind this client does not know yet
                        continue
                    yield event
                    if isinstance(event, StatusChanged) and event.status.terminal:
                        return
            except grpc.aio.AioRpcError as error:
                failure = from_rpc_error(error)
                if failure.code not in RESUMABLE_STREAM_CODES:
                    raise failure from None
            finally:
                call.cancel()  # the caller stopped early, or the stream broke: either way it is done
            if failure is None:
                # A clean end without a terminal status: the caller's after_sequence was already past the
                # terminal event (nothing more will come), or the server stopped streaming (a drain).
                doc = await self.get(discussion_id)
                if DiscussionStatus.of(doc.status).terminal and doc.last_sequence <= last_sequence:
                    return
                failure = Unavailable(grpc.StatusCode.UNAVAILABLE, "the stream ended before the terminal status")
            # Reopen the stream after the last event delivered.
            delay_seconds = self._retry.delay_seconds(retry_number, failure.retry_delay_seconds)
            if loop.time() + delay_seconds > give_up_at:
                raise failure
            logger.info(
                "stream of %s dropped after sequence %d (%s); reopening in %.2f s",
                discussion_id,
                last_sequence,
                failure.code.name,
                delay_seconds,
            )
            self._report(
                Retry("StreamDiscussion", failure.code, retry_number, delay_seconds, failure.retry_delay_seconds)
            )
            await asyncio.sleep(delay_seconds)
            retry_number += 1

    async def discuss(
        self,
        topic: str,
        *,
        personas: Sequence[str] = (),
        rounds: int = 1,
        ttl: datetime.timedelta | None = None,
        token_budget: int = 0,
        summary: bool = True,
        max_duration: datetime.timedelta | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[Event]:
        """Create a discussion and yield its every event until the terminal status (create + events)."""
        created = await self.create(
            topic,
            personas=personas,
            rounds=rounds,
            ttl=ttl,
            token_budget=token_budget,
            summary=summary,
            max_duration=max_duration,
            request_id=request_id,
        )
        async for event in self.events(created.discussion_id):
            yield event

    def _stub(self) -> session_pb2_grpc.SessionServiceAsyncStub:
        # Made on first use, inside the event loop that will run the calls.
        if self._stub_cache is None:
            options = self._channel_options
            interceptors = self._interceptors or None
            if self._tls is None:
                self._channel = grpc.aio.insecure_channel(self.address, options=options, interceptors=interceptors)
            else:
                credentials = self._tls.credentials()
                self._channel = grpc.aio.secure_channel(
                    self.address, credentials, options=options, interceptors=interceptors
                )
            self._stub_cache = session_pb2_grpc.SessionServiceStub(self._channel)
        assert self._stub_cache is not None
        return self._stub_cache

    @staticmethod
    def _list_page(
        stub: session_pb2_grpc.SessionServiceAsyncStub,
        request: session_pb2.ListDiscussionsRequest,
        metadata: tuple[tuple[str, str], ...],
        remaining: float,
    ) -> Awaitable[session_pb2.ListDiscussionsResponse]:
        return stub.ListDiscussions(request, metadata=metadata, timeout=remaining)

    def _metadata(self, discussion_id: str = "") -> tuple[tuple[str, str], ...]:
        """The API key, and the discussion id a load balancer hashes on so every call of it lands together."""
        return (*self._auth, (SESSION_ID_HEADER, discussion_id)) if discussion_id else self._auth

    async def _unary(
        self,
        method: str,
        attempt: Callable[[float], Awaitable[T]],
        timeout_seconds: float | None,
        attempts: _Attempts | None = None,
    ) -> T:
        """Run `attempt(remaining deadline)` under the retry policy; failures raise as typed exceptions."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._timeout_seconds if timeout_seconds is None else timeout_seconds)
        retry_number = 0
        while True:
            try:
                return await attempt(max(deadline - loop.time(), 0.001))
            except grpc.aio.AioRpcError as error:
                failure = from_rpc_error(error)
            if failure.code not in RETRYABLE_CODES or not self._retry.allows(retry_number + 1):
                raise failure
            delay_seconds = self._retry.delay_seconds(retry_number, failure.retry_delay_seconds)
            if loop.time() + delay_seconds >= deadline:  # no time left for another attempt
                raise failure
            if attempts is not None and failure.code == grpc.StatusCode.UNAVAILABLE:
                attempts.retried_unavailable = True
            self._report(Retry(method, failure.code, retry_number, delay_seconds, failure.retry_delay_seconds))
            await asyncio.sleep(delay_seconds)
            retry_number += 1

    def _report(self, retry: Retry) -> None:
        if self._on_retry is not None:
            self._on_retry(retry)
