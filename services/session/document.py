"""Folds agent events into the discussion document: results per agent per round, summary, usage."""

from __future__ import annotations

from typing import TypeAlias

from google.protobuf import timestamp_pb2

from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2

AgentStatus = discussion_pb2.AgentStatus
# The enum's value type: what a status field holds.
DiscussionStatus: TypeAlias = session_pb2.DiscussionStatus.ValueType

TERMINAL_STATUSES = frozenset(
    {
        session_pb2.DISCUSSION_STATUS_COMPLETED,
        session_pb2.DISCUSSION_STATUS_FAILED,
        session_pb2.DISCUSSION_STATUS_CANCELLED,
        session_pb2.DISCUSSION_STATUS_TIMED_OUT,
        session_pb2.DISCUSSION_STATUS_INTERRUPTED,
    }
)
UNFINISHED_STATUSES = frozenset({session_pb2.DISCUSSION_STATUS_QUEUED, session_pb2.DISCUSSION_STATUS_RUNNING})


def is_terminal(status: DiscussionStatus) -> bool:
    """Whether a status is final."""
    return status in TERMINAL_STATUSES


def now_timestamp() -> timestamp_pb2.Timestamp:
    """The current time as a protobuf Timestamp."""
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def copied(doc: session_pb2.Discussion) -> session_pb2.Discussion:
    """A copy of the document that changes to the original do not reach."""
    copy = session_pb2.Discussion()
    copy.CopyFrom(doc)
    return copy


def _result(doc: session_pb2.Discussion, agent: str, round_number: int) -> session_pb2.AgentResult:
    for result in doc.results:
        if result.agent == agent and result.round == round_number:
            return result
    return doc.results.add(agent=agent, round=round_number)


def _add_usage(total: discussion_pb2.TokenUsage, usage: discussion_pb2.TokenUsage) -> None:
    total.prompt_tokens += usage.prompt_tokens
    total.completion_tokens += usage.completion_tokens
    total.total_tokens += usage.total_tokens


def apply_event(doc: session_pb2.Discussion, event: session_pb2.DiscussionEvent) -> None:
    """Update the document in place for one event."""
    kind = event.WhichOneof("event")
    if kind == "status_changed":
        doc.status = event.status_changed.status
        if event.status_changed.error:
            doc.error = event.status_changed.error
    elif kind == "agent_started":
        started = event.agent_started
        result = _result(doc, started.agent, started.round)
        result.status = discussion_pb2.AGENT_STATUS_RUNNING
        result.agent_instance_id = started.agent_instance_id
        result.text = ""
    elif kind == "agent_delta":
        delta = event.agent_delta
        _result(doc, delta.agent, delta.round).text += delta.text
    elif kind == "agent_completed":
        completed = event.agent_completed
        result = _result(doc, completed.agent, completed.round)
        result.status = discussion_pb2.AGENT_STATUS_COMPLETED
        result.text = completed.text
        result.usage.CopyFrom(completed.usage)
        _add_usage(doc.usage, completed.usage)
        if completed.agent not in doc.completed_agents:
            doc.completed_agents.append(completed.agent)
    elif kind == "agent_failed":
        failed = event.agent_failed
        result = _result(doc, failed.agent, failed.round)
        result.status = discussion_pb2.AGENT_STATUS_FAILED
        result.error = failed.reason
    elif kind == "round_completed":
        doc.completed_rounds = max(doc.completed_rounds, event.round_completed.round)
    elif kind == "summary_completed":
        summary = event.summary_completed
        result = _result(doc, summary.agent, doc.rounds + 1)
        result.status = discussion_pb2.AGENT_STATUS_COMPLETED
        result.text = summary.text
        result.usage.CopyFrom(summary.usage)
        _add_usage(doc.usage, summary.usage)
        doc.summary = summary.text
        if summary.agent not in doc.completed_agents:
            doc.completed_agents.append(summary.agent)
    doc.last_sequence = max(doc.last_sequence, event.sequence)
    doc.updated_at.CopyFrom(event.time)


def cancel_running_results(doc: session_pb2.Discussion) -> None:
    """Mark answers still being written as cancelled (their partial text is kept)."""
    for result in doc.results:
        if result.status == discussion_pb2.AGENT_STATUS_RUNNING:
            result.status = discussion_pb2.AGENT_STATUS_CANCELLED


def failure_reasons(doc: session_pb2.Discussion) -> str:
    """Why every agent failed, one reason per agent."""
    reasons = {r.agent: r.error for r in doc.results if r.status == discussion_pb2.AGENT_STATUS_FAILED}
    return "; ".join(f"{agent}: {reason}" for agent, reason in reasons.items()) or "no agent produced an answer"
