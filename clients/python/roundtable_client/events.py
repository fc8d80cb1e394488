"""Typed discussion events and statuses, made from the wire's DiscussionEvent."""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass
from typing import TypedDict

from roundtable_client._gen.roundtable.common.v1 import discussion_pb2
from roundtable_client._gen.roundtable.session.v1 import session_pb2


class DiscussionStatus(enum.IntEnum):
    """Where a discussion stands: QUEUED → RUNNING → a terminal status."""

    UNSPECIFIED = 0
    QUEUED = 1
    RUNNING = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5
    TIMED_OUT = 6
    INTERRUPTED = 7

    @property
    def terminal(self) -> bool:
        """True once the discussion will not change any more."""
        return self not in (DiscussionStatus.UNSPECIFIED, DiscussionStatus.QUEUED, DiscussionStatus.RUNNING)

    @classmethod
    def of(cls, value: int) -> DiscussionStatus:
        """The status for a wire value (a Discussion's `status`); UNSPECIFIED for one this client does not know."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNSPECIFIED


@dataclass(frozen=True)
class TokenUsage:
    """Tokens spent: prompt, completion and their total."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, usage: discussion_pb2.TokenUsage) -> TokenUsage:
        """From the wire message."""
        return cls(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


@dataclass(frozen=True, kw_only=True)
class BaseEvent:
    """What every event carries: its discussion, its sequence number (from 1, no gaps) and when it happened."""

    discussion_id: str
    sequence: int
    time: datetime.datetime


@dataclass(frozen=True, kw_only=True)
class StatusChanged(BaseEvent):
    """The discussion's status moved; the last event of a discussion is one with a terminal status."""

    status: DiscussionStatus
    error: str = ""


@dataclass(frozen=True, kw_only=True)
class AgentStarted(BaseEvent):
    """An agent began its answer for a round (the moderator's summary is round `rounds + 1`)."""

    agent: str
    round: int
    agent_instance_id: str = ""


@dataclass(frozen=True, kw_only=True)
class AgentDelta(BaseEvent):
    """A chunk of an agent's answer, as it is written."""

    agent: str
    round: int
    text: str


@dataclass(frozen=True, kw_only=True)
class AgentCompleted(BaseEvent):
    """An agent's whole answer for a round, with the tokens it spent."""

    agent: str
    round: int
    text: str
    usage: TokenUsage
    agent_instance_id: str = ""


@dataclass(frozen=True, kw_only=True)
class AgentFailed(BaseEvent):
    """An agent gave up on a round; the others go on."""

    agent: str
    round: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class RoundCompleted(BaseEvent):
    """Every agent of a round has answered or failed."""

    round: int
    completed_agents: int
    failed_agents: int


@dataclass(frozen=True, kw_only=True)
class SummaryCompleted(BaseEvent):
    """The moderator's summary."""

    agent: str
    text: str
    usage: TokenUsage


Event = StatusChanged | AgentStarted | AgentDelta | AgentCompleted | AgentFailed | RoundCompleted | SummaryCompleted


class _Common(TypedDict):
    discussion_id: str
    sequence: int
    time: datetime.datetime


def from_proto(message: session_pb2.DiscussionEvent) -> Event | None:
    """The typed event for a wire event; None for a kind this client does not know (a newer server)."""
    common = _Common(
        discussion_id=message.discussion_id,
        sequence=message.sequence,
        time=message.time.ToDatetime(tzinfo=datetime.UTC),
    )
    kind = message.WhichOneof("event")
    if kind == "status_changed":
        changed = message.status_changed
        return StatusChanged(**common, status=DiscussionStatus.of(changed.status), error=changed.error)
    if kind == "agent_started":
        started = message.agent_started
        return AgentStarted(
            **common, agent=started.agent, round=started.round, agent_instance_id=started.agent_instance_id
        )
    if kind == "agent_delta":
        delta = message.agent_delta
        return AgentDelta(**common, agent=delta.agent, round=delta.round, text=delta.text)
    if kind == "agent_completed":
        done = message.agent_completed
        return AgentCompleted(
            **common,
            agent=done.agent,
            round=done.round,
            text=done.text,
            usage=TokenUsage.of(done.usage),
            agent_instance_id=done.agent_instance_id,
        )
    if kind == "agent_failed":
        failed = message.agent_failed
        return AgentFailed(**common, agent=failed.agent, round=failed.round, reason=failed.reason)
    if kind == "round_completed":
        ended = message.round_completed
        return RoundCompleted(
            **common, round=ended.round, completed_agents=ended.completed_agents, failed_agents=ended.failed_agents
        )
    if kind == "summary_completed":
        summary = message.summary_completed
        return SummaryCompleted(**common, agent=summary.agent, text=summary.text, usage=TokenUsage.of(summary.usage))
    return None
