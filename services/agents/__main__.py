"""Run the agent service: python -m services.agents (or roundtable-agents)."""

from __future__ import annotations

import sys

from services.agents.personas import PersonaFileError
from services.agents.service import AgentsService
from services.agents.settings import AgentsSettings
from services.shared.server import run_service


def main() -> None:
    """Serve until SIGTERM; a bad persona file stops start-up with its file and field named."""
    try:
        run_service(AgentsSettings, AgentsService)
    except PersonaFileError as error:
        print(f"agent service cannot start: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
