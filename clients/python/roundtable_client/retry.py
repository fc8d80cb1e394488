"""The one retry policy: RetryInfo as the floor, capped exponential backoff with full jitter above it.

Why both: the server's RetryInfo says when a slot can free at the earliest, so coming back sooner
only earns another refusal; and callers told the same delay come back together, so each adds a
random share of a growing window on top (full jitter), which spreads them out. Everything stays
inside the call's deadline: a retry that could not start before it is not made.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import grpc

# Refusals that say nothing was done and it may work later: safe to retry for every call
# (creates too, because their request_id and proposed id make a repeat return the first one).
RETRYABLE_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait before attempt n + 1: RetryInfo + uniform(0, min(max_backoff, initial · multiplier^n))."""

    initial_backoff_seconds: float = 0.5
    max_backoff_seconds: float = 20.0
    multiplier: float = 2.0
    # 0: as many as fit in the call's deadline; 1: never retry.
    max_attempts: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.initial_backoff_seconds < 0 or self.max_backoff_seconds < 0 or self.multiplier < 1:
            raise ValueError("backoffs must not be negative and the multiplier at least 1")
        if self.max_attempts < 0:
            raise ValueError("max_attempts must not be negative (0 means: bounded by the deadline only)")

    def window_seconds(self, retry_number: int) -> float:
        """The jitter window of the given retry (0 for the first): exponential, capped."""
        # min() on the exponent first: multiplier ** 10_000 would overflow a float.
        growth = self.multiplier ** min(retry_number, 64)
        return min(self.max_backoff_seconds, self.initial_backoff_seconds * growth)

    def delay_seconds(self, retry_number: int, retry_info_seconds: float | None) -> float:
        """The wait before the given retry: the server's RetryInfo (if any) plus a uniform share of the window."""
        floor_seconds = max(retry_info_seconds or 0.0, 0.0)
        return floor_seconds + self.rng.uniform(0.0, self.window_seconds(retry_number))

    def allows(self, attempts_made: int) -> bool:
        """Whether one more attempt is allowed after `attempts_made` (the deadline is checked by the caller)."""
        return self.max_attempts == 0 or attempts_made < self.max_attempts


# For callers that handle RESOURCE_EXHAUSTED themselves.
NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class Retry:
    """One retry about to be made, as told to `Client(on_retry=…)`: for metrics and logs."""

    method: str
    code: grpc.StatusCode
    retry_number: int
    delay_seconds: float
    retry_info_seconds: float | None
