"""Renders a discussion's live event stream for a terminal: per agent, per round, then the summary."""

from __future__ import annotations

import shutil
import textwrap
from typing import TextIO

from services.gen.roundtable.session.v1 import session_pb2

Status = session_pb2.DiscussionStatus


class StreamRenderer:
    """Prints each answer once complete (parallel agents would interleave token by token)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._width = min(shutil.get_terminal_size((100, 20)).columns, 100)

    def event(self, event: session_pb2.DiscussionEvent) -> None:
        """Print what a person wants to see of one event."""
        kind = event.WhichOneof("event")
        if kind == "status_changed":
            change = event.status_changed
            line = f"● status: {Status.Name(change.status).removeprefix('DISCUSSION_STATUS_')}"
            self._print(line + (f" — {change.error}" if change.error else ""))
        elif kind == "agent_started":
            self._print(f"  … {event.agent_started.agent} is thinking (round {event.agent_started.round})")
        elif kind == "agent_completed":
            done = event.agent_completed
            self._block(f"{done.agent} · round {done.round} · {done.usage.total_tokens} tokens", done.text)
        elif kind == "agent_failed":
            failed = event.agent_failed
            self._print(f"  ✗ {failed.agent} failed in round {failed.round}: {failed.reason}")
        elif kind == "round_completed":
            ended = event.round_completed
            self._print(
                f"── round {ended.round} done: {ended.completed_agents} answered, {ended.failed_agents} failed ──"
            )
        elif kind == "summary_completed":
            summary = event.summary_completed
            self._block(f"SUMMARY by {summary.agent}", summary.text)

    def _block(self, title: str, text: str) -> None:
        self._print(f"\n┌─ {title}")
        for paragraph in text.splitlines() or [""]:
            for line in textwrap.wrap(paragraph, self._width - 2) or [""]:
                self._print(f"│ {line}")
        self._print("└" + "─" * 20)

    def _print(self, line: str) -> None:
        print(line, file=self._out, flush=True)
