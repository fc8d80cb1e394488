"""LLM calls through the OpenAI-compatible API, with an outbound concurrency cap.

Retries with backoff on 429/5xx (honouring Retry-After) are the `openai`
client's own, so there is no retry loop here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import openai
from openai.types.chat import ChatCompletionMessageParam

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


class LLMClient(Protocol):
    """Streams a chat completion."""

    def stream_chat(self, messages: Sequence[ChatMessage], *, timeout_seconds: float) -> AsyncIterator[ChatChunk]:
        """Yield the answer's text as it arrives, then its usage."""
        ...


class OpenAIChatClient:
    """An OpenAI-compatible chat backend shared by every agent on this replica."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        model: str,
        temperature: float,
        max_tokens: int,
        max_retries: int,
        max_concurrent_calls: int,
    ) -> None:
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries)
        self._model = model
        self._temperature = temperature
        self._max_tokens = max_tokens
        # Queue rather than fail when the provider's concurrency is spoken for.
        self._slots = asyncio.Semaphore(max_concurrent_calls)
        self.in_flight = 0

    async def stream_chat(self, messages: Sequence[ChatMessage], *, timeout_seconds: float) -> AsyncIterator[ChatChunk]:
        """Stream one completion; raises openai.APIError subclasses when retries are spent."""
        async with self._slots:
            self.in_flight += 1
            try:
                stream = await self._client.chat.completions.create(
                    model=self._model,
                    messages=[
                        cast(ChatCompletionMessageParam, {"role": m.role, "content": m.content}) for m in messages
                    ],
                    temperature=self._temperature,
                    max_tokens=self._max_tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                    timeout=timeout_seconds,
                )
                async with stream:
                    async for chunk in stream:
                        if chunk.choices and chunk.choices[0].delta.content:
                            yield ChatChunk(text=chunk.choices[0].delta.content)
                        if chunk.usage is not None:
                            yield ChatChunk(
                                usage=discussion_pb2.TokenUsage(
                                    prompt_tokens=chunk.usage.prompt_tokens,
                                    completion_tokens=chunk.usage.completion_tokens,
                                    total_tokens=chunk.usage.total_tokens,
                                )
                            )
            finally:
                self.in_flight -= 1

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.close()
