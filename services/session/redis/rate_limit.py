"""Per-principal request rate limit on Redis, shared by every replica: GCRA (a token bucket) in one Lua script.

Why not `limits`' own Redis storage under WindowRateLimiter (it does run on redis-py
here): its moving window pushes one list entry per unit spent (a create costs 20,
so up to `rate_limit_per_minute` entries per principal), stamps them with each
replica's own clock (skew between replicas shifts every window), and a refusal
takes a second round trip to learn when to retry. GCRA keeps one number per
principal, reads Redis' clock, and answers "allowed" or "retry in N s" in one
call. The bucket holds a minute's units and refills continuously, so a burst of
`units_per_minute` passes exactly as with the moving window; a steady caller gets
`units_per_minute` a minute.
"""

from __future__ import annotations

from services.session.rate_limit import rate_limit_reached
from services.session.redis.connection import Client, Script, unavailable_on_failure

MICROSECONDS_PER_MINUTE = 60_000_000

# KEYS[1]: the principal's theoretical arrival time (µs, Redis clock).
# ARGV: emission interval (µs per unit), burst tolerance (µs: a full bucket), cost (units).
# Returns {1, '0'} when the units are taken, else {0, microseconds until they would be}.
GCRA = Script(
    """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval, tolerance, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + cost * interval
local allowed_at = new_tat - tolerance
if allowed_at > now then return {0, string.format('%.0f', allowed_at - now)} end
-- The key lives as long as the bucket is not full again: idle principals cost nothing.
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1)
return {1, '0'}
"""
)


class RedisRateLimiter:
    """`units_per_minute` request units per principal across all replicas (GCRA on Redis)."""

    def __init__(self, client: Client, units_per_minute: int, *, key_prefix: str = "rt") -> None:
        self._redis = client
        self._prefix = key_prefix
        self.units_per_minute = units_per_minute
        self._interval_us = MICROSECONDS_PER_MINUTE / units_per_minute

    async def spend(self, principal: str, cost: int) -> None:
        """Take the units, or raise ResourceExhausted with the time until they are back; RedisUnavailable if down."""
        with unavailable_on_failure("rate limit"):
            allowed, wait_us = await GCRA(
                self._redis,
                [f"{self._prefix}:rate:{principal}"],
                [repr(self._interval_us), MICROSECONDS_PER_MINUTE, cost],
            )
        if int(allowed):
            return
        raise rate_limit_reached(principal, cost, self.units_per_minute, int(wait_us) / 1e6)
