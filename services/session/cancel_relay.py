"""Carries a cancel from the replica a client reached to the replica that runs the discussion."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

# Called with the store id of a discussion some replica was asked to cancel.
CancelHandler = Callable[[str], Awaitable[None]]


class CancelRelay(Protocol):
    """Cancel requests between the replicas that share a store."""

    async def request(self, discussion_id: str) -> int:
        """Ask every replica to cancel the discussion if it runs or queues it; how many replicas heard."""
        ...

    def start(self, on_request: CancelHandler) -> None:
        """Begin handing this replica the requests made anywhere (its own included)."""
        ...

    async def stop(self) -> None:
        """Stop listening."""
        ...


class LocalCancelRelay:
    """One replica, its own store: whatever it runs it cancels itself, so there is nobody to tell."""

    async def request(self, discussion_id: str) -> int:
        """Nobody else runs discussions of this store."""
        return 0

    def start(self, on_request: CancelHandler) -> None:
        """Nothing to listen to."""

    async def stop(self) -> None:
        """Nothing to stop."""
