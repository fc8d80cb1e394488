"""Wakes live stream readers when a discussion gets new events.

The store is the source of truth; this only says "look again". A reader checks
`latest` before waiting, so an event published between its read and its wait
is never missed.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass


@dataclass(slots=True)
class _Channel:
    latest: int = 0
    # Made when a reader first waits, dropped once set: most discussions have no live reader,
    # and an Event per held discussion (and per event) is memory and time for nobody.
    changed: asyncio.Event | None = None


class EventNotifier:
    """Per-discussion latest sequence number and a wake-up for readers."""

    def __init__(self) -> None:
        self._channels: dict[str, _Channel] = {}

    def open(self, discussion_id: str, sequence: int) -> None:
        """A discussion starts producing events after `sequence`."""
        self._channels.setdefault(discussion_id, _Channel(latest=sequence))

    def publish(self, discussion_id: str, sequence: int) -> None:
        """Events up to `sequence` are in the store."""
        channel = self._channels.setdefault(discussion_id, _Channel())
        channel.latest = max(channel.latest, sequence)
        if channel.changed is not None:
            channel.changed.set()
            channel.changed = None

    def close(self, discussion_id: str) -> None:
        """The discussion will get no more events: wake everyone and forget it."""
        channel = self._channels.pop(discussion_id, None)
        if channel is not None and channel.changed is not None:
            channel.changed.set()

    async def wait_beyond(self, discussion_id: str, sequence: int, timeout_seconds: float) -> None:
        """Return once an event after `sequence` may be in the store, or after the timeout."""
        channel = self._channels.get(discussion_id)
        if channel is None or channel.latest > sequence:
            return
        if channel.changed is None:
            channel.changed = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(channel.changed.wait(), timeout_seconds)
