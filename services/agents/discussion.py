"""Runs one session's discussion: rounds of debate, then the moderator's summary, as a stream of events."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import openai

from services.agents import metrics, prompts
from services.agents.agent_set import Agent, AgentSet
from services.agents.llm import ChatMessage, LLMCallTimeout, LLMClient
from services.gen.roundtable.agents.v1 import agents_pb2
from services.gen.roundtable.common.v1 import discussion_pb2
from services.shared.logs import session_context

logger = logging.getLogger(__name__)

# Calls end this long before the caller's deadline, so their failure still reaches the caller.
DEADLINE_MARGIN_SECONDS = 0.5


@dataclass(frozen=True)
class StreamingLimits:
    """How agent text is coalesced into delta events, and how long one LLM call may take."""

    flush_chars: int
    flush_interval_seconds: float
    llm_timeout_seconds: float


class DiscussionRun:
    """One RunDiscussion: emits AgentEvents into a queue that the servicer streams out."""

    def __init__(
        self,
        *,
        agent_set: AgentSet,
        topic: str,
        persona_names: list[str],
        rounds: int,
        llm: LLMClient,
        limits: StreamingLimits,
        deadline: float | None,
        start_round: int = 1,
        prior_answers: dict[int, dict[str, str]] | None = None,
        token_budget: int = 0,
    ) -> None:
        self._set = agent_set
        self._topic = topic
        self._rounds = rounds
        self._start_round = max(start_round, 1)
        self._prior = prior_answers or {}
        self._llm = llm
        self._limits = limits
        self._deadline = deadline
        self._token_budget = token_budget
        self.tokens_spent = 0
        agents = [agent_set.agents[name] for name in persona_names]
        self._debaters = [a for a in agents if not a.persona.moderator]
        self._debater_names = {a.persona.name for a in self._debaters}
        self._moderator = next((a for a in agents if a.persona.moderator), None)
        self._events: asyncio.Queue[agents_pb2.AgentEvent | None] = asyncio.Queue()

    async def events(self) -> AsyncIterator[agents_pb2.AgentEvent]:
        """Run the discussion, yielding events; closing the iterator cancels every LLM call."""
        producer = asyncio.create_task(self._produce(), name=f"discussion-{self._set.session_id}")
        try:
            while (event := await self._events.get()) is not None:
                yield event
            await producer  # surfaces an unexpected error in the producer
        finally:
            if not producer.done():
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)

    async def _produce(self) -> None:
        try:
            with session_context(self._set.session_id):
                await self._run_rounds()
        finally:
            self._events.put_nowait(None)

    def _replay_prior_rounds(self) -> dict[str, str]:
        """Rebuild every debater's memory from the earlier rounds' answers; the latest answer of each."""
        latest: dict[str, str] = {}
        for agent in self._debaters:
            agent.memory = [ChatMessage("system", prompts.system_prompt(agent.persona))]
        for round_number in range(1, self._start_round):
            answers = self._prior.get(round_number, {})
            for agent in self._debaters:
                text = answers.get(agent.persona.name)
                if text is not None:
                    user = self._user_prompt(agent, round_number, latest)
                    agent.memory += [ChatMessage("user", user), ChatMessage("assistant", text)]
            latest.update({name: text for name, text in answers.items() if name in self._debater_names})
        return latest

    async def _run_rounds(self) -> None:
        latest = self._replay_prior_rounds() if self._start_round > 1 else {}
        for round_number in range(self._start_round, self._rounds + 1):
            previous = dict(latest)
            results = await asyncio.gather(
                *(self._answer_round(agent, round_number, previous) for agent in self._debaters)
            )
            completed = {
                agent.persona.name: text
                for agent, text in zip(self._debaters, results, strict=True)
                if text is not None
            }
            latest.update(completed)
            self._emit(
                round_completed=discussion_pb2.RoundCompleted(
                    round=round_number,
                    completed_agents=len(completed),
                    failed_agents=len(self._debaters) - len(completed),
                )
            )
            if not completed:
                logger.warning("round %d: every agent failed; stopping", round_number)
                return
        if self._moderator is not None and latest:
            await self._summarise(self._moderator, latest)

    def _user_prompt(self, agent: Agent, round_number: int, previous: dict[str, str]) -> str:
        if round_number == 1 or not previous:
            return prompts.opening_prompt(self._topic)
        others = {name: text for name, text in previous.items() if name != agent.persona.name}
        return prompts.debate_prompt(self._topic, round_number, others)

    async def _answer_round(self, agent: Agent, round_number: int, previous: dict[str, str]) -> str | None:
        return await self._call(agent, round_number, self._user_prompt(agent, round_number, previous))

    async def _summarise(self, moderator: Agent, final_answers: dict[str, str]) -> None:
        summary_round = self._rounds + 1
        text = await self._call(
            moderator, summary_round, prompts.summary_prompt(self._topic, final_answers), summary=True
        )
        if text is None:
            logger.warning("the moderator's summary failed")

    async def _call(self, agent: Agent, round_number: int, user_prompt: str, summary: bool = False) -> str | None:
        """One agent's answer for one round, counted once by how it ended. None on failure."""
        try:
            text = await self._answer(agent, round_number, user_prompt, summary)
        except asyncio.CancelledError:
            metrics.AGENT_RUNS_CANCELLED.inc()
            raise
        except Exception:
            metrics.AGENT_RUNS_FAILED.inc()
            raise
        (metrics.AGENT_RUNS_FAILED if text is None else metrics.AGENT_RUNS_COMPLETED).inc()
        return text

    async def _answer(self, agent: Agent, round_number: int, user_prompt: str, summary: bool) -> str | None:
        """Emit started, deltas and completed (or failed) for one answer; None on failure."""
        name = agent.persona.name
        with session_context(self._set.session_id, name):
            if self._token_budget and self.tokens_spent >= self._token_budget:
                # No call at all: the budget is a promise about what the provider bills.
                reason = f"token budget of {self._token_budget} spent ({self.tokens_spent} tokens used)"
                logger.warning("round %d: %s not run: %s", round_number, name, reason)
                self._emit(agent_failed=discussion_pb2.AgentFailed(agent=name, round=round_number, reason=reason))
                return None
            self._emit(
                agent_started=discussion_pb2.AgentStarted(
                    agent=name, round=round_number, agent_instance_id=agent.instance_id
                )
            )
            logger.info("round %d: %s is analysing the topic", round_number, name)
            if not agent.memory:
                agent.memory.append(ChatMessage("system", prompts.system_prompt(agent.persona)))
            messages = [*agent.memory, ChatMessage("user", user_prompt)]
            parts: list[str] = []
            pending: list[str] = []
            pending_chars = 0
            last_flush = time.monotonic()
            usage = discussion_pb2.TokenUsage()
            try:
                async for chunk in self._llm.stream_chat(
                    messages,
                    timeout_seconds=self._limits.llm_timeout_seconds,
                    deadline=None if self._deadline is None else self._deadline - DEADLINE_MARGIN_SECONDS,
                    options=agent.persona.call_options,
                ):
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if not chunk.text:
                        continue
                    parts.append(chunk.text)
                    pending.append(chunk.text)
                    pending_chars += len(chunk.text)
                    now = time.monotonic()
                    if (
                        pending_chars >= self._limits.flush_chars
                        or now - last_flush >= self._limits.flush_interval_seconds
                    ):
                        self._emit_delta(name, round_number, pending)
                        pending, pending_chars, last_flush = [], 0, now
            except (openai.APIError, TimeoutError) as error:
                reason = _describe(error)
                logger.warning("round %d: %s failed: %s", round_number, name, reason)
                self._emit(agent_failed=discussion_pb2.AgentFailed(agent=name, round=round_number, reason=reason))
                return None
            if pending:
                self._emit_delta(name, round_number, pending)
            text = "".join(parts).strip()
            self.tokens_spent += usage.total_tokens
            agent.memory.extend([ChatMessage("user", user_prompt), ChatMessage("assistant", text)])
            if summary:
                self._emit(summary_completed=discussion_pb2.SummaryCompleted(agent=name, text=text, usage=usage))
            else:
                self._emit(
                    agent_completed=discussion_pb2.AgentCompleted(
                        agent=name,
                        round=round_number,
                        text=text,
                        usage=usage,
                        agent_instance_id=agent.instance_id,
                    )
                )
            # Per call, so DEBUG; "is analysing the topic" above is the seed's per-agent INFO line.
            logger.debug("round %d: %s answered (%d tokens)", round_number, name, usage.total_tokens)
            return text

    def _emit_delta(self, agent: str, round_number: int, pending: list[str]) -> None:
        self._emit(agent_delta=discussion_pb2.AgentDelta(agent=agent, round=round_number, text="".join(pending)))

    def _emit(self, **event: object) -> None:
        self._events.put_nowait(agents_pb2.AgentEvent(**event))  # type: ignore[arg-type]


def _describe(error: BaseException) -> str:
    if isinstance(error, openai.APIStatusError):
        return f"LLM backend answered HTTP {error.status_code} after retries: {error.message}"
    if isinstance(error, LLMCallTimeout):
        return str(error)
    if isinstance(error, openai.APITimeoutError | TimeoutError):
        return "LLM call timed out"
    if isinstance(error, openai.APIConnectionError):
        return f"LLM backend unreachable: {error}"
    return f"LLM call failed: {error}"
