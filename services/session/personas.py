"""The personas the agent service offers, as the session service validates requests against them."""

from __future__ import annotations

from services.session.agents_client import AgentsClient
from services.shared.errors import InvalidArgument


class PersonaCatalog:
    """Persona names and aliases, fetched from the agent service on first need."""

    def __init__(self, agents: AgentsClient, max_personas: int) -> None:
        self._agents = agents
        self._max_personas = max_personas
        self._by_key: dict[str, str] = {}
        self._moderator = ""
        self._default_roster: list[str] = []

    async def refresh(self) -> None:
        """Fetch the personas; raises Unavailable if the agent service cannot be reached."""
        roster = await self._agents.roster()
        by_key: dict[str, str] = {}
        for persona in roster.personas:
            for key in (persona.name, *persona.aliases):
                by_key[key.casefold()] = persona.name
            if persona.moderator:
                self._moderator = persona.name
        self._by_key = by_key
        self._default_roster = list(roster.default_roster)

    async def resolve(self, names: list[str], *, summary: bool = True) -> list[str]:
        """Canonical names for the request (default roster when empty), moderator last; without it if not summary."""
        if not self._by_key:
            await self.refresh()
        if len(names) > self._max_personas:
            raise InvalidArgument(f"at most {self._max_personas} personas may be named", "personas")
        if not names:
            chosen = list(self._default_roster)
        else:
            chosen = []
            for name in names:
                canonical = self._by_key.get(name.strip().casefold())
                if canonical is None:
                    known = ", ".join(sorted(set(self._by_key.values())))
                    raise InvalidArgument(f"unknown persona {name[:60]!r}; known personas: {known}", "personas")
                if canonical not in chosen:
                    chosen.append(canonical)
        debaters = [n for n in chosen if n != self._moderator]
        if not debaters:
            raise InvalidArgument("name at least one persona besides the moderator", "personas")
        # The moderator sums up, and does so last, unless the caller wants the panel only.
        return [*debaters, self._moderator] if self._moderator and summary else debaters
