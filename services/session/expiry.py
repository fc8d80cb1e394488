"""The periodic sweep that removes discussions idle past their ttl, with their agent sets."""

from __future__ import annotations

import asyncio
import logging
import time

from services.session.metrics import DISCUSSIONS_EXPIRED
from services.session.runner import DiscussionRunner
from services.session.stores.interface import Store
from services.shared.session_logs import remove_session_log

logger = logging.getLogger(__name__)

SWEEP_BATCH = 500


class ExpirySweeper:
    """Every interval, deletes expired discussions and releases their agent sets."""

    def __init__(self, *, store: Store, runner: DiscussionRunner, interval_seconds: float) -> None:
        self._store = store
        self._runner = runner
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

    async def sweep_once(self) -> int:
        """Remove what has expired now; returns how many were removed."""
        removed = 0
        while True:
            expired = await self._store.expired(time.time(), SWEEP_BATCH)
            # A running discussion extends its own expiry as it progresses; one that is still
            # here past it is stalled, and is left to its runner's deadline.
            due = [i for i in expired if i not in self._runner.active]
            for discussion_id in due:
                # A queued one leaves the queue first, freeing its place, so it can never start on a deleted record.
                await self._runner.drop_queued(discussion_id)
                if await self._store.delete(discussion_id):
                    removed += 1
                    DISCUSSIONS_EXPIRED.inc()
                    logger.info("discussion %s expired and was removed", discussion_id)
                await self._runner.release_agents(discussion_id)
                remove_session_log(discussion_id)
            if len(expired) < SWEEP_BATCH or not due:
                return removed

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_seconds)
            try:
                await self.sweep_once()
            except Exception:  # one bad sweep must not end the sweeping
                logger.exception("expiry sweep failed")
