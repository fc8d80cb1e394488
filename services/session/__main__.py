"""Run the session service: python -m services.session (or roundtable-session)."""

from __future__ import annotations

from services.session.service import SessionService
from services.session.settings import SessionSettings
from services.shared.server import run_service


def main() -> None:
    """Serve until SIGTERM."""
    run_service(SessionSettings, SessionService)


if __name__ == "__main__":
    main()
