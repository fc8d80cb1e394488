"""The reference LLM client: the `openai` SDK's streamed chat completions (a backend's client = "openai-sdk").

Retries are the SDK's own (max_retries): on 408/409/429/5xx and connection errors it waits what
retry-after-ms or Retry-After says when that is between 0 and 60 s, else 0.5 s × 2^n capped at 8 s
with up to 25 % jitter. Its `timeout` bounds each attempt and each read, not the whole call, so this
module bounds the whole call, retries included. The SDK's retries are counted from the requests it
sends (an httpx request hook), its 429s from the responses (a response hook, which also pauses the
backend's LLM budget). The budget is reserved once per call (the SDK's retries happen inside it).
Every SDK error leaves as LLMCallFailed or LLMCallTimeout.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncGenerator
from typing import cast

import httpx2
import openai
from openai.types.chat import ChatCompletionMessageParam

from services.agents import metrics
from services.agents.llm import (
    Backend,
    ChatCall,
    ChatChunk,
    LLMCallFailed,
    estimated_usage,
    reserve_budget,
    settle_reservation,
)
from services.agents.llm_budget import LLMBudget
from services.agents.llm_stream import DEFAULT_RATE_LIMIT_SECONDS, RETRY_COUNT_HEADER, retry_after_seconds
from services.gen.roundtable.common.v1 import discussion_pb2
from services.shared import tracing


class OpenAISDKChatClient:
    """One OpenAI-compatible backend through openai.AsyncOpenAI, its pool sized to the outbound cap."""

    def __init__(self, backend: Backend, *, max_retries: int, max_concurrent_calls: int, budget: LLMBudget) -> None:
        self.backend = backend
        self._budget = budget
        self._budget_key = backend.budget_key
        # The SDK's own HTTP client defaults (timeout, redirects), plus hooks on every attempt and answer.
        http_client = openai.DefaultAsyncHttpxClient(
            event_hooks={"request": [_count_retry], "response": [self._on_response]},
            limits=connection_limits(max_concurrent_calls),
        )
        self.sdk = openai.AsyncOpenAI(
            base_url=backend.base_url,
            api_key=backend.api_key,
            organization=backend.organization or None,
            project=backend.project or None,
            max_retries=max_retries,
            http_client=http_client,
        )

    async def stream(self, call: ChatCall) -> AsyncGenerator[ChatChunk, None]:
        """Stream one completion through the SDK; its errors leave as LLMCallFailed / LLMCallTimeout."""
        name = self.backend.name
        reservation = await reserve_budget(self._budget, self._budget_key, call, name)
        loop = asyncio.get_running_loop()
        expires = loop.time() + (call.deadline - time.monotonic())
        used_tokens = 0
        completed = False
        span = tracing.start_llm_span(
            model=call.model, base_url=self.backend.base_url, max_tokens=call.max_tokens, temperature=call.temperature
        )
        usage: discussion_pb2.TokenUsage | None = None
        try:
            # Each await is bounded on its own: a timeout scope must never span a yield.
            trace_headers: dict[str, str] = {}
            tracing.inject(trace_headers)
            async with asyncio.timeout_at(expires):
                stream = await self.sdk.chat.completions.create(
                    model=call.model,
                    messages=[
                        cast(ChatCompletionMessageParam, {"role": m.role, "content": m.content}) for m in call.messages
                    ],
                    temperature=call.temperature,
                    max_tokens=call.max_tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                    # httpx applies this per read, so it bounds a silent server, not the whole call.
                    timeout=call.timeout_seconds,
                    extra_headers=trace_headers or None,
                )
            pieces = 0
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
                        usage = discussion_pb2.TokenUsage(
                            prompt_tokens=chunk.usage.prompt_tokens,
                            completion_tokens=chunk.usage.completion_tokens,
                            total_tokens=chunk.usage.total_tokens,
                        )
            usage = usage or estimated_usage(call.messages, pieces)
            used_tokens = usage.total_tokens
            completed = True
            yield ChatChunk(usage=usage)
        except (TimeoutError, openai.APITimeoutError) as error:
            raise call.timed_out() from error
        except openai.APIStatusError as error:
            retryable = error.status_code in (408, 409, 429) or error.status_code >= 500
            raise LLMCallFailed(
                f"LLM backend {name} answered HTTP {error.status_code}: {_message(error)}", retryable
            ) from error
        except openai.APIConnectionError as error:
            raise LLMCallFailed(f"LLM backend {name} unreachable: {error}", True) from error
        except (openai.APIError, json.JSONDecodeError, httpx2.HTTPError) as error:
            # A malformed SSE line (the SDK does not skip one) or an error event mid-stream.
            raise LLMCallFailed(f"LLM backend {name} failed mid-stream: {error!r}", False) from error
        finally:
            tracing.end_llm_span(span, usage, error=None if completed else sys.exc_info()[1])
            await settle_reservation(reservation, used_tokens, shielded=not completed)

    async def _on_response(self, response: httpx2.Response) -> None:
        """A 429 pauses the backend (on every replica sharing the budget) for what the provider said, 1 s if nothing."""
        if response.status_code == 429:
            metrics.LLM_RATE_LIMITED.inc()
            told = retry_after_seconds(response.headers, rate_limited=True)
            await self._budget.cool_down(self._budget_key, told if told is not None else DEFAULT_RATE_LIMIT_SECONDS)

    async def close(self) -> None:
        """Close the SDK's HTTP connection pool."""
        await self.sdk.close()


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


def _message(error: openai.APIStatusError) -> str:
    """The provider's own message from OpenAI's error body, else the SDK's."""
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
    return error.message
