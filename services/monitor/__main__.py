"""Run the monitor service: ``python -m services.monitor --port 0 --metrics-port 0``."""

from __future__ import annotations

from services.monitor.service import MonitorService
from services.monitor.settings import MonitorSettings
from services.shared.server import run_service


def main() -> None:
    """Serve the monitor until SIGTERM or SIGINT."""
    run_service(MonitorSettings, MonitorService)


if __name__ == "__main__":
    main()
