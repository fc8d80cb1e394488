"""Agent instances and the per-session agent sets that own them.

Each session gets fresh instances with their own memory; nothing here is ever
shared between sessions. The registry bounds how many sets live at once (LRU)
so memory stays bounded even when a release is missed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from services.agents import metrics
from services.agents.llm import ChatMessage
from services.agents.personas import Persona
from services.shared.session_logs import forget_session_log

logger = logging.getLogger(__name__)


@dataclass
class Agent:
    """One persona instance: an id of its own and the conversation it has had so far."""

    persona: Persona
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    memory: list[ChatMessage] = field(default_factory=list)


@dataclass
class AgentSet:
    """The agents of one session."""

    session_id: str
    agents: dict[str, Agent]
    running: bool = False
    release_handle: asyncio.TimerHandle | None = None


class AgentSetRegistry:
    """Live agent sets by session id, least recently used first, capped at max_agent_sets."""

    def __init__(self, max_agent_sets: int) -> None:
        self.max_agent_sets = max_agent_sets
        self._sets: OrderedDict[str, AgentSet] = OrderedDict()
        self.created_total = 0
        self.released_total = 0

    def __len__(self) -> int:
        return len(self._sets)

    def get(self, session_id: str) -> AgentSet | None:
        """The session's agent set, if it is live."""
        return self._sets.get(session_id)

    def acquire(self, session_id: str, personas: list[Persona]) -> AgentSet:
        """The session's agent set, created on first use; marks it most recently used.

        A set created earlier gains agents for personas it lacks and keeps the
        ones it has, with their memory.
        """
        agent_set = self._sets.get(session_id)
        if agent_set is None:
            # Make room first, so the set being created is never its own victim.
            self._evict_over_cap(room_for=1)
            agent_set = AgentSet(session_id=session_id, agents={})
            self._sets[session_id] = agent_set
            self.created_total += 1
            metrics.AGENT_SETS_CREATED.inc()
        else:
            self._sets.move_to_end(session_id)
            if agent_set.release_handle is not None:
                agent_set.release_handle.cancel()
                agent_set.release_handle = None
        for persona in personas:
            agent_set.agents.setdefault(persona.name, Agent(persona=persona))
        return agent_set

    def release(self, session_id: str) -> bool:
        """Drop the session's agent set now; False if there was none."""
        agent_set = self._sets.pop(session_id, None)
        if agent_set is None:
            return False
        if agent_set.release_handle is not None:
            agent_set.release_handle.cancel()
        # This replica is done with the session: its log file need not stay open here (the
        # session service may delete it, and an open handle would keep the deleted file's space).
        forget_session_log(session_id)
        self.released_total += 1
        metrics.AGENT_SETS_RELEASED.inc()
        return True

    def release_later(self, session_id: str, delay_seconds: float) -> None:
        """Drop the session's agent set after a grace period, unless it is used again."""
        agent_set = self._sets.get(session_id)
        if agent_set is None:
            return
        if delay_seconds <= 0:
            self.release(session_id)
            return
        if agent_set.release_handle is not None:
            agent_set.release_handle.cancel()
        agent_set.release_handle = asyncio.get_running_loop().call_later(delay_seconds, self.release, session_id)

    def release_all(self) -> None:
        """Drop every agent set (shutdown)."""
        for session_id in list(self._sets):
            self.release(session_id)

    def _evict_over_cap(self, room_for: int) -> None:
        # Idle sets go first; a running one is evicted only if every set is running.
        while len(self._sets) + room_for > self.max_agent_sets:
            victim = next((s for s in self._sets.values() if not s.running), None)
            if victim is None:
                victim = next(iter(self._sets.values()))
            logger.warning("agent-set cap %d reached: releasing session %s", self.max_agent_sets, victim.session_id)
            self.release(victim.session_id)
