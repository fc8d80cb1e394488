"""Runs one session's discussion: rounds of debate, then the moderator's summary, as a stream of events."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from opentelemetry.trace import Span

from services.agents import metrics, prompts
from services.agents.agent_set import Agent, AgentSet
from services.agents.llm import (
    CallOptions,
    ChatMessage,
    LLMCallFailed,
    LLMCallTimeout,
    LLMClient,
    estimated_usage,
)
from services.gen.roundtable.agents.v1 import agents_pb2
from services.gen.roundtable.common.v1 import discussion_pb2
from services.shared import tracing
from services.shared.logs import session_context

logger = logging.getLogger(__name__)

# Calls end this long before the caller's deadline, so their failure still reaches the caller.
DEADLINE_MARGIN_SECONDS = 0.5
# Under a token budget a call is made only if, after its prompt, the budget still holds an answer this
# long (or the whole answer its persona asks for, if that is shorter): fewer tokens make no answer.
MIN_ANSWER_TOKENS = 16


@dataclass(frozen=True)
class StreamingLimits:
    """How agent text is coalesced into delta events, and how long and how long-winded one LLM call may be."""

    flush_chars: int
    flush_interval_seconds: float
    llm_timeout_seconds: float
    # An answer's most tokens when its persona names none (--llm-max-tokens): what a call reserves from a budget.
    max_tokens: int


class DiscussionRun:
    """One RunDiscussion: runs the agents' calls as tasks and yields their events as they come."""

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
        principal: str = "",
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
        # Whose discussion it is: the LLM budget serves waiting calls fairly across principals.
        self._principal = principal
        # Tokens the finished calls used; with the reservations of the calls in flight, never above the budget.
        self.tokens_spent = 0
        self._tokens_reserved = 0
        agents = [agent_set.agents[name] for name in persona_names]
        self._debaters = [a for a in agents if not a.persona.moderator]
        self._debater_names = {a.persona.name for a in self._debaters}
        self._moderator = next((a for a in agents if a.persona.moderator), None)
        # Events the calls emitted and events() has not yielded yet; no queue or producer task of its own.
        self._ready: deque[agents_pb2.AgentEvent] = deque()
        # Set by a call when it emits or ends, so events() wakes up; None while events() is not waiting.
        self._wakeup: asyncio.Future[None] | None = None

    @functools.cached_property
    def _opening_prompt(self) -> str:
        # Built once: every debater gets the same round-1 prompt.
        return prompts.opening_prompt(self._topic)

    async def events(self) -> AsyncIterator[agents_pb2.AgentEvent]:
        """Run the discussion, yielding events; closing the iterator cancels every LLM call."""
        latest = self._replay_prior_rounds() if self._start_round > 1 else {}
        calls: list[asyncio.Task[str | None]] = []
        round_span: Span | None = None
        try:
            for round_number in range(self._start_round, self._rounds + 1):
                previous = dict(latest)
                # Never active across this generator's yields: the answers name it their parent as they start.
                round_span = tracing.start_span("discussion.round", attributes={"roundtable.round": round_number})
                calls = [
                    self._start(agent, round_number, self._user_prompt(agent, round_number, previous), round_span)
                    for agent in self._debaters
                ]
                async for event in self._events_of(calls):
                    yield event
                completed = {
                    agent.persona.name: text
                    for agent, call in zip(self._debaters, calls, strict=True)
                    if (text := call.result()) is not None
                }
                latest.update(completed)
                _end_round_span(round_span, len(completed), len(self._debaters) - len(completed))
                round_span = None
                yield agents_pb2.AgentEvent(
                    round_completed=discussion_pb2.RoundCompleted(
                        round=round_number,
                        completed_agents=len(completed),
                        failed_agents=len(self._debaters) - len(completed),
                    )
                )
                if not completed:
                    with session_context(self._set.session_id):
                        logger.warning("round %d: every agent failed; stopping", round_number)
                    return
            if self._moderator is not None and latest:
                summary_round = self._rounds + 1
                user_prompt = prompts.summary_prompt(self._topic, latest)
                calls = [self._start(self._moderator, summary_round, user_prompt, None, summary=True)]
                async for event in self._events_of(calls):
                    yield event
                if calls[0].result() is None:
                    with session_context(self._set.session_id):
                        logger.warning("the moderator's summary failed")
        finally:
            if round_span is not None:
                tracing.fail(round_span, "interrupted")
                round_span.end()
            # Client cancel, deadline or an unexpected error: no call outlives the stream.
            pending = [call for call in calls if not call.done()]
            for call in pending:
                call.cancel()
            if pending:
                await asyncio.wait(pending)

    def _start(
        self, agent: Agent, round_number: int, user_prompt: str, round_span: Span | None, summary: bool = False
    ) -> asyncio.Task[str | None]:
        # The span of the answer, in its round's (the summary's: in the run's); its LLM calls are its children.
        with tracing.active(round_span):
            span = tracing.start_span(
                "agent.summary" if summary else "agent.answer",
                attributes={"roundtable.agent": agent.persona.name, "roundtable.round": round_number},
            )
        # The task copies the context here, so its log lines carry the session and the agent, and its spans this one.
        with session_context(self._set.session_id, agent.persona.name), tracing.active(span):
            call = asyncio.create_task(self._answer(agent, round_number, user_prompt, summary))
        call.add_done_callback(self._call_ended)
        if span is not None:
            call.add_done_callback(functools.partial(_end_answer_span, span))
        return call

    def _call_ended(self, call: asyncio.Task[str | None]) -> None:
        """Count the call once by how it ended, and wake events()."""
        if call.cancelled():
            metrics.AGENT_RUNS_CANCELLED.inc()
        elif call.exception() is not None or call.result() is None:
            metrics.AGENT_RUNS_FAILED.inc()
        else:
            metrics.AGENT_RUNS_COMPLETED.inc()
        self._wake()

    async def _events_of(self, calls: list[asyncio.Task[str | None]]) -> AsyncIterator[agents_pb2.AgentEvent]:
        """The calls' events in the order they were emitted, until every call has ended."""
        while True:
            while self._ready:
                yield self._ready.popleft()
            for call in calls:
                if call.done() and not call.cancelled() and call.exception() is not None:
                    call.result()  # surfaces an unexpected error at once
            if all(call.done() for call in calls):
                return
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

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

    def _user_prompt(self, agent: Agent, round_number: int, previous: dict[str, str]) -> str:
        if round_number == 1 or not previous:
            return self._opening_prompt
        others = {name: text for name, text in previous.items() if name != agent.persona.name}
        return prompts.debate_prompt(self._topic, round_number, others)

    async def _answer(self, agent: Agent, round_number: int, user_prompt: str, summary: bool) -> str | None:
        """Emit started, deltas and completed (or failed) for one answer; None on failure."""
        name = agent.persona.name
        if not agent.memory:
            agent.memory.append(ChatMessage("system", prompts.system_prompt(agent.persona)))
        messages = [*agent.memory, ChatMessage("user", user_prompt)]
        options = agent.persona.call_options
        reserved_tokens = 0
        if self._token_budget:
            grant = self._reserve(messages, options)
            if isinstance(grant, str):
                # No call at all: the budget is a promise about what the provider bills.
                logger.warning("round %d: %s not run: %s", round_number, name, grant)
                self._emit(agent_failed=discussion_pb2.AgentFailed(agent=name, round=round_number, reason=grant))
                return None
            reserved_tokens, answer_tokens = grant
            options = dataclasses.replace(options, max_tokens=answer_tokens)
        try:
            return await self._call(agent, round_number, messages, user_prompt, options, summary)
        finally:
            # Settled however the call ended: what it used is in tokens_spent now, the rest is free again.
            self._tokens_reserved -= reserved_tokens

    def _reserve(self, messages: list[ChatMessage], options: CallOptions) -> tuple[int, int] | str:
        """Reserve the call's prompt estimate and answer: (tokens reserved, the answer's max_tokens), or why not."""
        prompt_tokens = estimated_usage(messages, 0).prompt_tokens
        left_tokens = self._token_budget - self.tokens_spent - self._tokens_reserved
        wanted_tokens = options.max_tokens or self._limits.max_tokens
        answer_tokens = min(wanted_tokens, left_tokens - prompt_tokens)
        minimal_tokens = min(wanted_tokens, MIN_ANSWER_TOKENS)
        if answer_tokens < minimal_tokens:
            return (
                f"token budget of {self._token_budget} spent: {max(left_tokens, 0)} tokens left "
                f"({self.tokens_spent} used), too few for the prompt (~{prompt_tokens}) and a minimal answer "
                f"({minimal_tokens})"
            )
        self._tokens_reserved += prompt_tokens + answer_tokens
        return prompt_tokens + answer_tokens, answer_tokens

    async def _call(
        self,
        agent: Agent,
        round_number: int,
        messages: list[ChatMessage],
        user_prompt: str,
        options: CallOptions,
        summary: bool,
    ) -> str | None:
        """Make the LLM call: emit started, deltas and completed (or failed); None on failure."""
        name = agent.persona.name
        self._emit(
            agent_started=discussion_pb2.AgentStarted(
                agent=name, round=round_number, agent_instance_id=agent.instance_id
            )
        )
        logger.info("round %d: %s is analysing the topic", round_number, name)
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
                options=options,
                principal=self._principal,
            ):
                if chunk.usage is not None:
                    usage = chunk.usage
                if not chunk.text:
                    continue
                parts.append(chunk.text)
                pending.append(chunk.text)
                pending_chars += len(chunk.text)
                now = time.monotonic()
                if pending_chars >= self._limits.flush_chars or now - last_flush >= self._limits.flush_interval_seconds:
                    self._emit_delta(name, round_number, pending)
                    pending, pending_chars, last_flush = [], 0, now
        except (LLMCallFailed, LLMCallTimeout) as error:
            if parts:
                # A provider bills an answer cut short: the prompt and the pieces that arrived.
                self.tokens_spent += estimated_usage(messages, len(parts)).total_tokens
            # The LLM port's own errors: their message names the backend and what went wrong.
            reason = str(error)
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
        self._ready.append(agents_pb2.AgentEvent(**event))  # type: ignore[arg-type]
        self._wake()


def _end_round_span(span: Span | None, completed_agents: int, failed_agents: int) -> None:
    """End a round's span with its counts; failed when no agent answered."""
    if span is None:
        return
    span.set_attribute("roundtable.completed_agents", completed_agents)
    span.set_attribute("roundtable.failed_agents", failed_agents)
    if not completed_agents:
        tracing.fail(span, "every_agent_failed")
    span.end()


def _end_answer_span(span: Span, call: asyncio.Task[str | None]) -> None:
    """End an answer's span as its call ended: cancelled, crashed, failed (no answer) or answered."""
    if call.cancelled():
        tracing.fail(span, "cancelled")
    elif (error := call.exception()) is not None:
        tracing.fail(span, error)
    elif call.result() is None:
        tracing.fail(span, "agent_failed")
    span.end()
