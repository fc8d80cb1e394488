"""Start and stop the simulator's HTTP server inside the current event loop."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import TracebackType

from aiohttp import web

from services.simulator.app import Simulator, create_app
from services.simulator.settings import SimulatorSettings

logger = logging.getLogger(__name__)

# Benchmarks open thousands of connections at once; the default backlog of 128 would refuse some.
LISTEN_BACKLOG = 4096
# Upper bound on how long stop() waits for in-flight answers before cancelling them.
SHUTDOWN_TIMEOUT_SECONDS = 2.0


def _url_host(host: str) -> str:
    # A wildcard bind address is not connectable; point clients at loopback instead.
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


@dataclass
class RunningSimulator:
    """A started simulator: its state, bound port and OpenAI base URL."""

    simulator: Simulator
    port: int
    base_url: str
    host: str
    _runner: web.AppRunner = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def root_url(self) -> str:
        """Server URL without the /v1 suffix, for /healthz and /_sim/* endpoints."""
        return self.base_url.removesuffix("/v1")

    async def stop(self) -> None:
        """Stop accepting connections, release hanging requests and shut the server down (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self.simulator.begin_shutdown()
        await self._runner.cleanup()
        logger.info("simulator on port %d stopped", self.port)

    async def __aenter__(self) -> RunningSimulator:
        """Return self so the simulator can be used as an async context manager."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the simulator."""
        await self.stop()


async def start_simulator(settings: SimulatorSettings | None = None) -> RunningSimulator:
    """Start the simulator on settings.host/settings.port (0 picks a free port) and return its handle."""
    settings = settings or SimulatorSettings()
    simulator = Simulator(settings)
    runner = web.AppRunner(
        create_app(settings, simulator),
        # Off by default in aiohttp: without it a handler never learns that its client has gone.
        handler_cancellation=True,
        # The access log at INFO would be one line per LLM call; the simulator logs at DEBUG instead.
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=LISTEN_BACKLOG)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = site.port
    base_url = f"http://{_url_host(settings.host)}:{port}/v1"
    logger.info("simulator listening on %s", base_url)
    return RunningSimulator(simulator=simulator, port=port, base_url=base_url, host=settings.host, _runner=runner)
