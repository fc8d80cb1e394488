"""Admission: the global cap on discussions running at once on this replica."""

from __future__ import annotations

from services.shared.errors import ResourceExhausted

# Until a discussion has finished, assume one takes this long (for RetryInfo).
INITIAL_DURATION_SECONDS = 30.0


class Admission:
    """Slots for running discussions; a full house answers RESOURCE_EXHAUSTED with a retry estimate."""

    def __init__(self, max_concurrent_sessions: int) -> None:
        self.capacity = max_concurrent_sessions
        self.active = 0
        self._mean_duration_seconds = INITIAL_DURATION_SECONDS
        self.closed = False

    def admit(self) -> None:
        """Take a slot, or raise ResourceExhausted with when one is likely to free."""
        if self.active >= self.capacity:
            raise ResourceExhausted(
                f"the server is running its maximum of {self.capacity} discussions; retry later",
                retry_after_seconds=self.retry_after_seconds(),
                subject="global",
                limit="max_concurrent_sessions",
            )
        self.active += 1

    def release(self, duration_seconds: float | None = None) -> None:
        """Give a slot back; a finished discussion's duration refines the retry estimate."""
        self.active = max(self.active - 1, 0)
        if duration_seconds is not None:
            # Exponentially weighted: recent discussions say most about the next ones.
            self._mean_duration_seconds += 0.2 * (duration_seconds - self._mean_duration_seconds)

    def retry_after_seconds(self) -> float:
        """Expected wait for a slot: with N running, one ends every mean_duration / N on average."""
        return max(0.5, self._mean_duration_seconds / max(self.active, 1))
