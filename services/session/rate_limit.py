"""Per-principal request rate limits, on the `limits` library (memory now; its Redis storage for scale-out)."""

from __future__ import annotations

import time
from typing import Protocol

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from services.shared.errors import ResourceExhausted


class RateLimiter(Protocol):
    """Spends request units for a principal, or refuses with when to retry."""

    async def spend(self, principal: str, cost: int) -> None:
        """Take `cost` units from the principal's allowance; raises ResourceExhausted when it is spent."""
        ...


class NoRateLimit:
    """Rate limiting switched off."""

    async def spend(self, principal: str, cost: int) -> None:
        """Always allowed."""


class WindowRateLimiter:
    """A moving one-minute window of request units per principal.

    A moving window is the exact form of a token bucket that refills continuously:
    a principal may spend `units_per_minute` in any 60 seconds, and learns
    precisely when enough units come back.
    """

    def __init__(self, units_per_minute: int, storage: Storage | None = None) -> None:
        self._item = RateLimitItemPerMinute(units_per_minute)
        self._limiter = MovingWindowRateLimiter(storage or MemoryStorage())
        self.units_per_minute = units_per_minute

    async def spend(self, principal: str, cost: int) -> None:
        """Take the units, or raise ResourceExhausted with the time until they are back."""
        if await self._limiter.hit(self._item, principal, cost=cost):
            return
        stats = await self._limiter.get_window_stats(self._item, principal)
        raise rate_limit_reached(principal, cost, self.units_per_minute, stats.reset_time - time.time())


def rate_limit_reached(
    principal: str, cost: int, units_per_minute: int, retry_after_seconds: float
) -> ResourceExhausted:
    """The refusal of a call over the principal's rate limit, with when to retry (at least 50 ms)."""
    retry_after = max(retry_after_seconds, 0.05)
    return ResourceExhausted(
        f"request rate limit reached: {units_per_minute} units a minute per caller "
        f"(this call costs {cost}); retry in {retry_after:.1f} s",
        retry_after_seconds=retry_after,
        subject=f"principal:{principal}",
        limit="rate_limit_per_minute",
    )
