"""The agent service as shipped, but with an in-process LLM of fixed latency: `python -m bench.fake_agents`.

It runs the product's own `run_service(AgentsSettings, AgentsService)` and only hands
AgentsService a different LLM client (the constructor's `llm` parameter), so the
gRPC server, interceptor, metrics, logging, agent sets and discussion runs are the
shipped code. This isolates our overhead from an HTTP client and a provider. Extra
flags (taken off argv before the service's own settings parse it):

  --fake-latency-seconds S           time from the call to its whole answer (default 1.0)
  --fake-summary-latency-seconds S   the same for the moderator's summary (default: --fake-latency-seconds)
  --fake-answer-words N              answer length in words, sent as one chunk (default 60)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Sequence

from services.agents.llm import DEFAULT_OPTIONS, CallOptions, ChatChunk, ChatMessage
from services.agents.service import AgentsService
from services.agents.settings import AgentsSettings
from services.gen.roundtable.common.v1 import discussion_pb2
from services.shared.server import run_service

BACKEND_NAME = "bench-fixed-latency"
# The summary prompt (services/agents/prompts.py) asks the moderator to sum up the panel's final answers.
SUMMARY_MARKER = "The panel's final answers:"


class FixedLatencyLLM:
    """An LLM client that answers every call after the same delay, with the same number of words."""

    def __init__(self, latency_seconds: float, answer_words: int, summary_latency_seconds: float | None = None) -> None:
        self._latency_seconds = latency_seconds
        self._summary_latency_seconds = latency_seconds if summary_latency_seconds is None else summary_latency_seconds
        self._answer = " ".join(["word"] * answer_words)
        self._words = answer_words
        self.in_flight = 0

    def describe(self, options: CallOptions) -> tuple[str, str]:
        """Backend and model names, as OpenAIChatClient reports them."""
        return BACKEND_NAME, options.model or "fixed"

    async def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        timeout_seconds: float,
        deadline: float | None = None,
        options: CallOptions = DEFAULT_OPTIONS,
        principal: str = "",
    ) -> AsyncIterator[ChatChunk]:
        """Wait the fixed latency, then yield the whole answer and its usage."""
        summary = bool(messages) and messages[-1].content.startswith(SUMMARY_MARKER)
        self.in_flight += 1
        try:
            await asyncio.sleep(self._summary_latency_seconds if summary else self._latency_seconds)
        finally:
            self.in_flight -= 1
        yield ChatChunk(text=self._answer)
        prompt_tokens = sum(len(m.content) for m in messages) // 4 + 1
        yield ChatChunk(
            usage=discussion_pb2.TokenUsage(
                prompt_tokens=prompt_tokens, completion_tokens=self._words, total_tokens=prompt_tokens + self._words
            )
        )

    async def close(self) -> None:
        """Nothing to close."""


def main(argv: Sequence[str] | None = None) -> None:
    """Split off the --fake-* flags, then run the shipped agent service with the fake LLM."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--fake-latency-seconds", type=float, default=1.0)
    parser.add_argument("--fake-summary-latency-seconds", type=float, default=None)
    parser.add_argument("--fake-answer-words", type=int, default=60)
    fake, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    llm = FixedLatencyLLM(fake.fake_latency_seconds, fake.fake_answer_words, fake.fake_summary_latency_seconds)

    def build(settings: AgentsSettings) -> AgentsService:
        return AgentsService(settings, llm=llm)  # type: ignore[arg-type]  # the same duck type as OpenAIChatClient

    run_service(AgentsSettings, build, rest)


if __name__ == "__main__":
    main()
