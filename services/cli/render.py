"""Renders a discussion's live event stream for a terminal: per agent, per round, then the summary."""

from __future__ import annotations

import shutil
import textwrap
from typing import TextIO

from roundtable_client import (
    AgentCompleted,
    AgentFailed,
    AgentStarted,
    Event,
    RoundCompleted,
    StatusChanged,
    SummaryCompleted,
)


class StreamRenderer:
    """Prints each answer once complete (parallel agents would interleave token by token)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._width = min(shutil.get_terminal_size((100, 20)).columns, 100)

    def event(self, event: Event) -> None:
        """Print what a person wants to see of one event (text deltas are left out)."""
        match event:
            case StatusChanged(status=status, error=error):
                self._print(f"● status: {status.name}" + (f" — {error}" if error else ""))
            case AgentStarted(agent=agent, round=round_number):
                self._print(f"  … {agent} is thinking (round {round_number})")
            case AgentCompleted(agent=agent, round=round_number, usage=usage, text=text):
                self._block(f"{agent} · round {round_number} · {usage.total_tokens} tokens", text)
            case AgentFailed(agent=agent, round=round_number, reason=reason):
                self._print(f"  ✗ {agent} failed in round {round_number}: {reason}")
            case RoundCompleted(round=round_number, completed_agents=completed, failed_agents=failed):
                self._print(f"── round {round_number} done: {completed} answered, {failed} failed ──")
            case SummaryCompleted(agent=agent, text=text):
                self._block(f"SUMMARY by {agent}", text)

    def _block(self, title: str, text: str) -> None:
        self._print(f"\n┌─ {title}")
        for paragraph in text.splitlines() or [""]:
            for line in textwrap.wrap(paragraph, self._width - 2) or [""]:
                self._print(f"│ {line}")
        self._print("└" + "─" * 20)

    def _print(self, line: str) -> None:
        print(line, file=self._out, flush=True)
