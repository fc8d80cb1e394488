"""The fleet LLM budget's buckets in Redis, shared by every agent replica, and what happens when Redis is down.

One HASH per backend holds both buckets and the cooldown; every operation is one Lua script, so a
check-and-take is atomic however many replicas call at once, and every script reads Redis' own
clock (TIME), so replicas with skewed clocks agree on refills and cooldowns. The key carries a hash
tag of the backend (`{<prefix>:llm-budget:<sha256(backend)[:16]>}`, like the session's admission
keys), so on a Redis Cluster a backend's keys share one slot; PEXPIRE drops a key once its buckets
would be full again and no cooldown runs, so idle backends leave nothing behind.

    {P:llm-budget:<hash>}:buckets  HASH  requests, tokens (levels), at (ms, Redis clock), cool (ms)
    {P:llm-budget:<hash>}:claims   HASH  replica -> "sequence tokens until-ms" (the heads waiting; see TAKE),
                                         ~sequence (the order they came in)

The fair queue in front (services/agents/llm_budget.py) is per replica; across replicas the store
itself serves the head that waited first (TAKE's claims), so a replica whose head needs many tokens is
not starved by another replica's stream of small calls that take each bit of the refill.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.agents import metrics
from services.agents.llm_budget import (
    MAX_SLEEP_SECONDS,
    TRANSIT_ALLOWANCE_SECONDS,
    BucketReading,
    BudgetLimits,
    LLMBudgetUnavailable,
    MemoryBuckets,
    RedisDownPolicy,
)
from services.shared import redis_client

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 0.5
# After a failure the replica budgets alone for this long before it asks Redis again.
RETRY_REDIS_AFTER_SECONDS = 3.0
# A claim outlives twice the claimant's longest sleep by this much: room for a round trip and a busy event loop.
CLAIM_MARGIN_SECONDS = 1.0

_Result = TypeVar("_Result")


# The levels refilled to now: capacity = the per-minute limit, limit/60000 per millisecond.
# A limit of 0 (unlimited) keeps that level at 0 and the script never checks it.
PRELUDE = """
local key = KEYS[1]
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local state = redis.call('HMGET', key, 'requests', 'tokens', 'at', 'cool')
local requests, tokens = tonumber(state[1]) or rpm, tonumber(state[2]) or tpm
-- `at` is ahead of now while a transit allowance runs: no refill until then.
local at = tonumber(state[3]) or now
if now > at then
  requests = math.min(rpm, requests + (now - at) * rpm / 60000)
  tokens = math.min(tpm, tokens + (now - at) * tpm / 60000)
  at = now
end
local cool = tonumber(state[4]) or 0

local function save()
  redis.call('HSET', key, 'requests', tostring(requests), 'tokens', tostring(tokens), 'at', tostring(at),
    'cool', tostring(cool))
  -- Once both buckets are full again and no cooldown runs, the key says nothing a missing key does not.
  local fill_ms = 0
  if rpm > 0 then fill_ms = math.max(fill_ms, (rpm - requests) * 60000 / rpm) end
  if tpm > 0 then fill_ms = math.max(fill_ms, (tpm - tokens) * 60000 / tpm) end
  local keep_ms = math.max(cool - now, at - now + fill_ms, 0)
  redis.call('PEXPIRE', key, math.ceil(keep_ms) + 1000)
end
"""

# KEYS[2] the claims (below). ARGV[3] tokens wanted, ARGV[4] the transit allowance (ms) a take from full
# buckets delays the refill by, ARGV[5] the replica asking (its claim's owner), ARGV[6] the longest it sleeps
# before asking again (ms), ARGV[7] the margin (ms) a claim outlives two such sleeps by.
# Returns {granted, wait_ms, requests left, tokens left}.
#
# Claims: a replica whose queue head is refused records what it waits for (owner -> "sequence tokens
# until"), in the order the replicas were first refused. A take is granted only if the buckets after it
# still cover the oldest live claim of another replica made before the taker's own (one request and its
# tokens), so the refill collects for the head that has waited longest instead of going to whichever
# replica asks for less; the claimant's grant clears its claim, and if it is refused again its new claim
# queues behind the others. A live claimant asks again within ARGV[6] and each refusal renews its claim,
# so a replica that died holds the fleet back for at most twice that plus the margin.
TAKE = (
    PRELUDE
    + """
local claims_key = KEYS[2]
local wanted = tonumber(ARGV[3])
local owner = ARGV[5]
local mine, oldest = nil, nil
local latest_until = 0
local entries = redis.call('HGETALL', claims_key)
for i = 1, #entries, 2 do
  local who = entries[i]
  if who ~= '~sequence' then
    local sequence, claim_tokens, until_ms = string.match(entries[i + 1], '^(%S+) (%S+) (%S+)$')
    sequence, claim_tokens, until_ms = tonumber(sequence), tonumber(claim_tokens), tonumber(until_ms)
    if until_ms <= now then
      redis.call('HDEL', claims_key, who)
    else
      latest_until = math.max(latest_until, until_ms)
      if who == owner then
        mine = {sequence, claim_tokens}
      elseif oldest == nil or sequence < oldest[1] then
        oldest = {sequence, claim_tokens}
      end
    end
  end
end
-- Only another replica's claim older than ours holds us back.
if oldest and mine and mine[1] < oldest[1] then oldest = nil end
local need_requests, need_tokens = 1, wanted
if oldest then
  need_requests = 2
  need_tokens = wanted + oldest[2]
end
local wait = 0
if rpm > 0 and requests < need_requests then wait = (need_requests - requests) * 60000 / rpm end
if tpm > 0 and tokens < need_tokens then wait = math.max(wait, (need_tokens - tokens) * 60000 / tpm) end
-- The refill starts after a running transit allowance.
if wait > 0 then wait = wait + math.max(0, at - now) end
wait = math.max(wait, cool - now)
local granted = 0
if wait <= 0 then
  granted = 1
  if requests >= rpm and tokens >= tpm then at = now + tonumber(ARGV[4]) end
  if rpm > 0 then requests = requests - 1 end
  if tpm > 0 then tokens = tokens - wanted end
  if mine then redis.call('HDEL', claims_key, owner) end
else
  local sequence = mine and mine[1] or redis.call('HINCRBY', claims_key, '~sequence', 1)
  local until_ms = now + 2 * math.min(wait, tonumber(ARGV[6])) + tonumber(ARGV[7])
  redis.call('HSET', claims_key, owner, sequence .. ' ' .. wanted .. ' ' .. string.format('%.0f', until_ms))
  latest_until = math.max(latest_until, until_ms)
end
-- The claims key lives as long as its latest claim (the sequence restarting after is harmless).
if latest_until > now then redis.call('PEXPIRE', claims_key, math.ceil(latest_until - now) + 1000) end
save()
local wait_ms = 0
if granted == 0 then wait_ms = math.max(1, math.ceil(wait)) end
return {granted, wait_ms, tostring(requests), tostring(tokens)}
"""
)

# ARGV[3] tokens, ARGV[4] requests to add back (negative tokens: a further charge), capped at capacity.
GIVE_BACK = (
    PRELUDE
    + """
requests = math.min(rpm, requests + tonumber(ARGV[4]))
tokens = math.min(tpm, tokens + tonumber(ARGV[3]))
save()
return 1
"""
)

# ARGV[3] cooldown in ms from now; extends a running cooldown, never shortens it.
COOL_DOWN = (
    PRELUDE
    + """
cool = math.max(cool, now + tonumber(ARGV[3]))
save()
return 1
"""
)


def connect(url: str, *, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> redis_client.AnyRedis:
    """The budget's client for `url`, one server or a cluster (services.shared.redis_client: no command hangs)."""
    return redis_client.connect(url, client_name="roundtable-llm-budget", timeout_seconds=timeout_seconds)


def bucket_key(prefix: str, backend: str) -> str:
    """The HASH holding `backend`'s buckets, hash-tagged by a digest of the backend key."""
    digest = hashlib.sha256(backend.encode()).hexdigest()[:16]
    return f"{{{prefix}:llm-budget:{digest}}}:buckets"


def claims_key(prefix: str, backend: str) -> str:
    """The HASH holding the claims of `backend`'s waiting replica heads, in the buckets' hash slot."""
    return bucket_key(prefix, backend).removesuffix(":buckets") + ":claims"


class RedisBuckets:
    """A backend's buckets in Redis: one atomic script per take, give-back and cooldown.

    Each instance is one replica in the fleet's eyes: the owner of the claims its refused takes record.
    """

    def __init__(self, client: redis_client.AnyRedis, *, prefix: str = "roundtable") -> None:
        self._client = client
        self._prefix = prefix
        self._owner = uuid.uuid4().hex
        self._take = client.register_script(TAKE)
        self._give_back = client.register_script(GIVE_BACK)
        self._cool_down = client.register_script(COOL_DOWN)

    def _key(self, backend: str) -> list[str]:
        return [bucket_key(self._prefix, backend)]

    async def take(self, backend: str, limits: BudgetLimits, tokens: int) -> BucketReading:
        """Take one request and `tokens` if the buckets cover them and another replica's claim, and no cooldown runs."""
        granted, wait_ms, requests, tokens_left = await self._take(
            keys=[bucket_key(self._prefix, backend), claims_key(self._prefix, backend)],
            args=[
                limits.requests_per_minute,
                limits.tokens_per_minute,
                tokens,
                round(TRANSIT_ALLOWANCE_SECONDS * 1000),
                self._owner,
                round(MAX_SLEEP_SECONDS * 1000),
                round(CLAIM_MARGIN_SECONDS * 1000),
            ],
        )
        return BucketReading(bool(granted), int(wait_ms) / 1000, float(requests), float(tokens_left))

    async def give_back(self, backend: str, limits: BudgetLimits, tokens: int, requests: int = 0) -> None:
        """Add `tokens` (negative: charge more) and `requests` back, capped at capacity."""
        await self._give_back(
            keys=self._key(backend), args=[limits.requests_per_minute, limits.tokens_per_minute, tokens, requests]
        )

    async def cool_down(self, backend: str, limits: BudgetLimits, seconds: float) -> None:
        """No take on `backend`, by any replica, succeeds before Redis' now + `seconds`."""
        await self._cool_down(
            keys=self._key(backend),
            args=[limits.requests_per_minute, limits.tokens_per_minute, max(0, round(seconds * 1000))],
        )

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()


class FailoverBuckets:
    """Redis while it answers; when it does not, fail open (this replica budgets alone) or closed (raise).

    Open: the same limits in memory on this replica, a WARNING once per outage, Redis asked again every
    few seconds. Closed: LLMBudgetUnavailable, so no call starts that the fleet has not budgeted.
    """

    def __init__(
        self,
        primary: RedisBuckets,
        when_redis_down: RedisDownPolicy,
        *,
        names: Mapping[str, str] | None = None,
        retry_after_seconds: float = RETRY_REDIS_AFTER_SECONDS,
    ) -> None:
        self._primary = primary
        self._fallback = MemoryBuckets()
        self._policy = when_redis_down
        self._names = dict(names or {})
        self._retry_after_seconds = retry_after_seconds
        self._down_until: float | None = None

    @property
    def redis_down(self) -> bool:
        """Whether the last attempt failed and the fallback is in use."""
        return self._down_until is not None

    async def _run(
        self,
        backend: str,
        on_redis: Callable[[], Awaitable[_Result]],
        on_fallback: Callable[[], Awaitable[_Result]],
    ) -> _Result:
        if self._down_until is not None and self._policy == "open" and time.monotonic() < self._down_until:
            return await on_fallback()
        try:
            result = await on_redis()
        except (RedisConnectionError, RedisTimeoutError, *redis_client.CLUSTER_FAILURES) as error:
            metrics.LLM_BUDGET_STORE_ERRORS.labels(backend=self._names.get(backend, backend)).inc()
            if self._policy == "closed":
                raise LLMBudgetUnavailable(f"the LLM budget's Redis is unavailable: {error}") from error
            if self._down_until is None:
                logger.warning(
                    "LLM budget: Redis is unavailable (%s); each replica budgets alone until it answers again", error
                )
            self._down_until = time.monotonic() + self._retry_after_seconds
            return await on_fallback()
        if self._down_until is not None:
            logger.info("LLM budget: Redis answers again; the budget is shared by the fleet again")
            self._down_until = None
        return result

    async def take(self, backend: str, limits: BudgetLimits, tokens: int) -> BucketReading:
        """Take from Redis, or per the policy from this replica's buckets."""
        return await self._run(
            backend,
            lambda: self._primary.take(backend, limits, tokens),
            lambda: self._fallback.take(backend, limits, tokens),
        )

    async def give_back(self, backend: str, limits: BudgetLimits, tokens: int, requests: int = 0) -> None:
        """Give back to Redis, or per the policy to this replica's buckets."""
        await self._run(
            backend,
            lambda: self._primary.give_back(backend, limits, tokens, requests),
            lambda: self._fallback.give_back(backend, limits, tokens, requests),
        )

    async def cool_down(self, backend: str, limits: BudgetLimits, seconds: float) -> None:
        """Cool down in Redis (the fleet), or per the policy on this replica."""
        await self._run(
            backend,
            lambda: self._primary.cool_down(backend, limits, seconds),
            lambda: self._fallback.cool_down(backend, limits, seconds),
        )

    async def close(self) -> None:
        """Close the Redis connections."""
        await self._primary.close()
