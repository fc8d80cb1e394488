"""The periodic sweep that removes discussions idle past their ttl (Discussions.expire_due does the removing)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)


class ExpirySweeper:
    """Every interval, runs one sweep; a failed sweep is logged and the next one runs as planned."""

    def __init__(self, sweep: Callable[[], Awaitable[int]], *, interval_seconds: float) -> None:
        self._sweep = sweep
        self._interval_seconds = interval_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin sweeping in the background."""
        self._task = asyncio.create_task(self._loop(), name="expiry-sweeper")

    async def stop(self) -> None:
        """Stop sweeping."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_seconds)
            try:
                await self._sweep()
            except Exception:  # one bad sweep must not end the sweeping
                logger.exception("expiry sweep failed")
