"""LLM calls through the OpenAI-compatible API, with an outbound concurrency cap and a bounded time per call.

Retries are the `openai` client's own (max_retries): on 408/409/429/5xx and
connection errors it waits what retry-after-ms or Retry-After says when that is
between 0 and 120 s (and does not retry past 120 s), else 0.5 s × 2^n capped at
8 s with up to 25 % jitter. Its `timeout` bounds each attempt and each read,
not the whole call, so this module bounds the whole call, retries included.
The SDK's retries are counted from the requests it sends (an httpx request hook),
each call's time and outcome once it ends (services.agents.metrics).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import httpx2
import openai
from openai.types.chat import ChatCompletionMessageParam

from services.agents import metrics
from services.gen.roundtable.common.v1 import discussion_pb2


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
    """An OpenAI-compatible endpoint and the model it answers with unless a persona names another."""

    name: str
    base_url: str
    api_key: str
    model: str


# The service's own backend and settings.
DEFAULT_OPTIONS = CallOptions()

# The header in which the openai SDK numbers the attempts of one call (0, then 1, 2, … for its retries).
RETRY_COUNT_HEADER = "x-stainless-retry-count"


class LLMCallTimeout(TimeoutError):
    """A call, retries included, did not finish within its time (the configured one or the caller's deadline)."""


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


class OpenAIChatClient:
    """The OpenAI-compatible backends of this replica: the default one and any the persona file adds."""

    def __init__(
        self,
        *,
        default: Backend,
        extra: Sequence[Backend] = (),
        temperature: float,
        max_tokens: int,
        max_retries: int,
        max_concurrent_calls: int,
    ) -> None:
        self.default = default
        self.backends = {backend.name: backend for backend in extra}
        # One connection pool per endpoint; the outbound cap below is shared by all of them.
        self._clients = {b.name: _client(b, max_retries, max_concurrent_calls) for b in extra}
        self._default_client = _client(default, max_retries, max_concurrent_calls)
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
        """Stream one completion; raises openai.APIError when retries are spent, LLMCallTimeout when time is."""
        client = self._clients[options.backend] if options.backend else self._default_client
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
            budget = timeout_seconds if deadline is None else min(timeout_seconds, deadline - time.monotonic())
            if budget <= 0:
                raise LLMCallTimeout("the caller's deadline passed before the LLM call could start")
            expires = asyncio.get_running_loop().time() + budget
            try:
                # Each await is bounded on its own: a timeout scope must never span a yield.
                async with asyncio.timeout_at(expires):
                    stream = await client.chat.completions.create(
                        model=model,
                        messages=[
                            cast(ChatCompletionMessageParam, {"role": m.role, "content": m.content}) for m in messages
                        ],
                        temperature=self._temperature if options.temperature is None else options.temperature,
                        max_tokens=options.max_tokens or self._max_tokens,
                        stream=True,
                        stream_options={"include_usage": True},
                        # httpx applies this per read, so it bounds a silent server, not the whole call.
                        timeout=budget,
                    )
                pieces = 0
                usage_sent = False
                async with stream:
                    chunks = aiter(stream)
                    while True:
                        async with asyncio.timeout_at(expires):
                            try:
                                chunk = await anext(chunks)
                            except StopAsyncIteration:
                                break
                        if chunk.choices and chunk.choices[0].delta.content:
                            pieces += 1
                            yield ChatChunk(text=chunk.choices[0].delta.content)
                        if chunk.usage is not None:
                            usage_sent = True
                            usage = discussion_pb2.TokenUsage(
                                prompt_tokens=chunk.usage.prompt_tokens,
                                completion_tokens=chunk.usage.completion_tokens,
                                total_tokens=chunk.usage.total_tokens,
                            )
                            _count_tokens(usage)
                            yield ChatChunk(usage=usage)
                if not usage_sent:
                    usage = _estimated_usage(messages, pieces)
                    _count_tokens(usage)
                    yield ChatChunk(usage=usage)
            except (TimeoutError, openai.APITimeoutError) as error:
                raise LLMCallTimeout(f"LLM call timed out after {budget:.1f} s") from error
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
        """Close every HTTP connection pool."""
        await self._default_client.close()
        for client in self._clients.values():
            await client.close()


def _client(backend: Backend, max_retries: int, max_concurrent_calls: int) -> openai.AsyncOpenAI:
    # The SDK's own HTTP client defaults (timeout, redirects), plus a hook on every attempt it sends.
    http_client = openai.DefaultAsyncHttpxClient(
        event_hooks={"request": [_count_retry]}, limits=connection_limits(max_concurrent_calls)
    )
    return openai.AsyncOpenAI(
        base_url=backend.base_url, api_key=backend.api_key, max_retries=max_retries, http_client=http_client
    )


def connection_limits(max_concurrent_calls: int) -> httpx2.Limits:
    """A pool with a connection for every call the outbound cap lets through, so only the cap queues.

    The SDK's default pool (1,000 connections) would make calls past it wait for a connection
    inside their time budget and end as LLMCallTimeout; the cap's queue is outside it.
    """
    return httpx2.Limits(
        max_connections=max_concurrent_calls, max_keepalive_connections=min(max_concurrent_calls, 1000)
    )


async def _count_retry(request: httpx2.Request) -> None:
    """Count the attempts the SDK sends again: it numbers each one in x-stainless-retry-count, 0 the first."""
    try:
        retried = int(request.headers.get(RETRY_COUNT_HEADER, "0")) > 0
    except ValueError:
        retried = False
    if retried:
        metrics.LLM_RETRIES.inc()


def _count_tokens(usage: discussion_pb2.TokenUsage) -> None:
    metrics.LLM_PROMPT_TOKENS.inc(usage.prompt_tokens)
    metrics.LLM_COMPLETION_TOKENS.inc(usage.completion_tokens)


def _estimated_usage(messages: Sequence[ChatMessage], pieces: int) -> discussion_pb2.TokenUsage:
    """Usage for a server that streams none (llama.cpp's): one token a streamed piece, 4 prompt characters a token."""
    prompt_tokens = sum(len(m.content) for m in messages) // 4 + 1
    return discussion_pb2.TokenUsage(
        prompt_tokens=prompt_tokens, completion_tokens=pieces, total_tokens=prompt_tokens + pieces
    )
