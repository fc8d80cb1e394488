"""The LLM port: the chat types, the errors every client raises, and the router that holds the outbound cap.

Two clients speak the OpenAI-compatible streaming API behind it: `StreamingChatClient`
(services/agents/llm_stream.py, aiohttp + orjson, the default) and `OpenAISDKChatClient`
(services/agents/llm_openai_sdk.py, the `openai` SDK, kept as the reference). Each backend picks
one. Whichever answers, a caller sees only this module's types and errors: `LLMCallFailed`,
`LLMCallTimeout` (and CancelledError), never a library's.

The router owns what does not depend on the client: the outbound cap (calls past it wait outside
their time), the whole-call time (the configured one, further bounded by the caller's deadline),
the token counters and the one observation per call of roundtable_llm_request_seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from services.agents import metrics
from services.agents.llm_budget import LLMBudget, LLMBudgetExhausted, LLMBudgetUnavailable, Reservation, UnlimitedBudget
from services.gen.roundtable.common.v1 import discussion_pb2

if TYPE_CHECKING:
    from services.agents.llm_stream import EndpointPools

ClientKind = Literal["stream", "openai-sdk"]
CLIENT_KINDS: tuple[ClientKind, ...] = ("stream", "openai-sdk")


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat prompt."""

    role: str
    content: str


@dataclass(frozen=True)
class ChatChunk:
    """A piece of a streamed answer: some text, or (last) the call's token usage."""

    text: str = ""
    usage: discussion_pb2.TokenUsage | None = None


@dataclass(frozen=True)
class CallOptions:
    """What a persona may choose per call; None takes the backend's model or the service's settings."""

    backend: str | None = None
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class Backend:
    """An OpenAI-compatible endpoint, the model it answers with unless a persona names another, and its quota."""

    name: str
    base_url: str
    api_key: str
    model: str
    # Which client speaks to it: the lean streaming one, or the openai SDK (the reference).
    client: ClientKind = "stream"
    # Sent as OpenAI-Organization / OpenAI-Project when set.
    organization: str = ""
    project: str = ""
    # The provider's quota for this endpoint and key; 0 = no limit.
    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    @property
    def budget_key(self) -> str:
        """The LLM budget's key: endpoint and key, so two backend names on one key share one quota."""
        return f"{self.base_url}#{hashlib.sha256(self.api_key.encode()).hexdigest()[:12]}"


@dataclass(frozen=True, slots=True)
class ChatCall:
    """One call as the router hands it to a backend's client: the request, its time and whose it is."""

    messages: Sequence[ChatMessage]
    model: str
    temperature: float
    max_tokens: int
    principal: str
    # The call's time, retries included (for messages), and when it ends on time.monotonic().
    timeout_seconds: float
    deadline: float

    @property
    def token_estimate(self) -> int:
        """What the call may cost at most: prompt characters / 4 + 1, plus max_tokens (as the simulator charges)."""
        return sum(len(m.content) for m in self.messages) // 4 + 1 + self.max_tokens

    def timed_out(self) -> LLMCallTimeout:
        """The error of a call whose time ran out."""
        return LLMCallTimeout(f"LLM call timed out after {self.timeout_seconds:.1f} s")


# The service's own backend and settings.
DEFAULT_OPTIONS = CallOptions()


class LLMCallFailed(Exception):
    """An LLM call failed for good (retries spent, or an error no retry can fix); the reason names the backend."""

    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        # Whether sending the same request again could succeed (429, 5xx, a lost connection).
        self.retryable = retryable


class LLMCallTimeout(TimeoutError):
    """A call, retries included, did not finish within its time (the configured one or the caller's deadline)."""


# What a budget wait that outlived the call's deadline reports.
BUDGET_TIMEOUT_REASON = "waited for the LLM budget until the deadline"


class LLMClient(Protocol):
    """Streams a chat completion."""

    def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        timeout_seconds: float,
        deadline: float | None = None,
        options: CallOptions = DEFAULT_OPTIONS,
        principal: str = "",
    ) -> AsyncIterator[ChatChunk]:
        """Yield the answer's text as it arrives, then its usage."""
        ...


class BackendClient(Protocol):
    """One backend's HTTP client: streams a call, raising only LLMCallFailed, LLMCallTimeout or CancelledError."""

    def stream(self, call: ChatCall) -> AsyncGenerator[ChatChunk, None]:
        """Yield the answer's text as it arrives, then (last) its usage, within call.deadline."""
        ...

    async def close(self) -> None:
        """Close the backend's connections."""
        ...


def build_backend_client(
    backend: Backend,
    *,
    max_retries: int,
    max_concurrent_calls: int,
    budget: LLMBudget,
    pools: EndpointPools | None = None,
) -> BackendClient:
    """The client the backend asks for; the openai SDK is imported only when a backend uses it."""
    if backend.client == "openai-sdk":
        from services.agents.llm_openai_sdk import OpenAISDKChatClient

        return OpenAISDKChatClient(
            backend, max_retries=max_retries, max_concurrent_calls=max_concurrent_calls, budget=budget
        )
    from services.agents.llm_stream import EndpointPools, StreamingChatClient

    return StreamingChatClient(
        backend, max_retries=max_retries, budget=budget, pools=pools or EndpointPools(max_concurrent_calls)
    )


class LLMRouter:
    """The OpenAI-compatible backends of this replica (the default one and any the persona file adds), one cap."""

    def __init__(
        self,
        *,
        default: Backend,
        extra: Sequence[Backend] = (),
        temperature: float,
        max_tokens: int,
        max_retries: int,
        max_concurrent_calls: int,
        budget: LLMBudget | None = None,
    ) -> None:
        self.default = default
        self.backends = {backend.name: backend for backend in extra}
        self.budget: LLMBudget = budget or UnlimitedBudget()

        from services.agents.llm_stream import EndpointPools

        # The streaming clients' sockets: one keep-alive pool per endpoint, whichever backends name it.
        pools = EndpointPools(max_concurrent_calls)

        def client_of(backend: Backend) -> BackendClient:
            return build_backend_client(
                backend,
                max_retries=max_retries,
                max_concurrent_calls=max_concurrent_calls,
                budget=self.budget,
                pools=pools,
            )

        # One connection pool per endpoint; the outbound cap below is shared by all of them.
        self.clients = {backend.name: client_of(backend) for backend in extra}
        self.default_client = client_of(default)
        self._temperature = temperature
        self._max_tokens = max_tokens
        # Queue rather than fail when the provider's concurrency is spoken for.
        self._slots = asyncio.Semaphore(max_concurrent_calls)
        self.in_flight = 0

    def describe(self, options: CallOptions) -> tuple[str, str]:
        """The backend name and model that answer calls made with these options."""
        backend = self.backends[options.backend] if options.backend else self.default
        return backend.name, options.model or backend.model

    async def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        timeout_seconds: float,
        deadline: float | None = None,
        options: CallOptions = DEFAULT_OPTIONS,
        principal: str = "",
    ) -> AsyncIterator[ChatChunk]:
        """Stream one completion; raises LLMCallFailed when it fails for good, LLMCallTimeout when time is spent."""
        client = self.clients[options.backend] if options.backend else self.default_client
        _, model = self.describe(options)
        with metrics.LLM_CALLS_WAITING.track_inprogress():
            await self._slots.acquire()
        # From here on the call holds a slot: it is in flight, and observed once however it ends.
        started = time.monotonic()
        outcome = metrics.LLM_REQUEST_ERROR
        self.in_flight += 1
        metrics.LLM_CALLS_IN_FLIGHT.inc()
        try:
            # The time starts once a slot is ours (queueing is not the provider's slowness), but the
            # caller's deadline (time.monotonic) bounds the queue and the call alike.
            seconds = timeout_seconds if deadline is None else min(timeout_seconds, deadline - started)
            if seconds <= 0:
                raise LLMCallTimeout("the caller's deadline passed before the LLM call could start")
            call = ChatCall(
                messages=messages,
                model=model,
                temperature=self._temperature if options.temperature is None else options.temperature,
                max_tokens=options.max_tokens or self._max_tokens,
                principal=principal,
                timeout_seconds=seconds,
                deadline=started + seconds,
            )
            # aclosing: a caller that stops reading closes the client's stream (and its socket) now.
            async with contextlib.aclosing(client.stream(call)) as chunks:
                async for chunk in chunks:
                    if chunk.usage is not None:
                        metrics.LLM_PROMPT_TOKENS.inc(chunk.usage.prompt_tokens)
                        metrics.LLM_COMPLETION_TOKENS.inc(chunk.usage.completion_tokens)
                    yield chunk
            outcome = metrics.LLM_REQUEST_OK
        except LLMCallTimeout:
            outcome = metrics.LLM_REQUEST_TIMEOUT
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled by the caller, or the caller closed the stream before its end.
            outcome = metrics.LLM_REQUEST_CANCELLED
            raise
        finally:
            outcome.observe(time.monotonic() - started)
            metrics.LLM_CALLS_IN_FLIGHT.dec()
            self.in_flight -= 1
            self._slots.release()

    async def close(self) -> None:
        """Close every backend's connection pool."""
        await self.default_client.close()
        for client in self.clients.values():
            await client.close()


def estimated_usage(messages: Sequence[ChatMessage], pieces: int) -> discussion_pb2.TokenUsage:
    """Usage for a server that streams none (llama.cpp's): one token a streamed piece, 4 prompt characters a token."""
    prompt_tokens = sum(len(m.content) for m in messages) // 4 + 1
    return discussion_pb2.TokenUsage(
        prompt_tokens=prompt_tokens, completion_tokens=pieces, total_tokens=prompt_tokens + pieces
    )


async def reserve_budget(budget: LLMBudget, budget_key: str, call: ChatCall, backend_name: str) -> Reservation:
    """Wait for the budget's room for one attempt of the call; its refusals leave as LLMCallTimeout / LLMCallFailed."""
    try:
        return await budget.reserve(budget_key, call.principal, call.token_estimate, call.deadline)
    except LLMBudgetExhausted as error:
        raise LLMCallTimeout(BUDGET_TIMEOUT_REASON) from error
    except LLMBudgetUnavailable as error:
        raise LLMCallFailed(f"LLM budget of backend {backend_name} unavailable: {error}", False) from error


async def settle_reservation(reservation: Reservation, used_tokens: int, *, shielded: bool) -> None:
    """Settle an attempt's reservation; shielded (after a failure or a cancel) so a second cancel cannot skip it."""
    if shielded:
        await asyncio.shield(reservation.settle(used_tokens))
    else:
        await reservation.settle(used_tokens)
