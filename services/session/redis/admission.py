"""Admission on Redis: the same leases, FIFO queue and per-principal caps as MemoryAdmission, shared by replicas.

Every operation is one Lua script, so it is atomic however many replicas call at
once. All keys carry the hash tag {<prefix>:adm} and every script names all of them
in KEYS (none is built inside a script), so on a Redis Cluster they share one slot
and each script runs on that slot's master. Lease times come from Redis' own clock
(TIME), so replicas with skewed clocks agree on when a lease lapses.

    {P:adm}:leases             ZSET  id -> lease expiry (ms, Redis clock)
    {P:adm}:holder             HASH  id -> principal (leased or queued)
    {P:adm}:leased-count       HASH  principal -> leases held
    {P:adm}:queue              ZSET  id -> arrival number                    FIFO
    {P:adm}:queued-count       HASH  principal -> queued places
    {P:adm}:arrivals           STRING counter
    {P:adm}:mean-duration      STRING seconds (for retry estimates)
    {P:adm}:replicas           ZSET  replica -> alive until (ms)
    {P:adm}:queued-by          HASH  id -> replica holding the queued discussion
    {P:adm}:leased-by          HASH  id -> replica the lease is for (only it may renew)
    {P:adm}:inbox              HASH  id -> replica another replica promoted it for

A queued discussion lives in the queuing replica's runner, so when another replica
frees the slot the promoted id goes to the inbox addressed to that replica, whose
next release or reap (the heartbeat, every ttl/3) collects it. A replica that stops
calling for a ttl is presumed dead and its queue places are dropped.
"""

from __future__ import annotations

import logging
import secrets
import socket
from typing import Any

from services.session.admission import INITIAL_DURATION_SECONDS, WaitingCallers
from services.session.redis.connection import Client, EncodableArg, RedisUnavailable, Script, unavailable_on_failure
from services.shared.errors import ResourceExhausted

logger = logging.getLogger(__name__)

PRELUDE = """
local leases, holder, queue, queued_count, arrivals, mean_key, replicas, queued_by, leased_by, leased_count, inbox =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local replica = ARGV[1]
local capacity, max_queued, max_per_principal, ttl_ms =
  tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

-- A count in a HASH field, the field gone at zero (so an idle principal leaves nothing behind).
local function count(hash, field, by)
  if redis.call('HINCRBY', hash, field, by) <= 0 then redis.call('HDEL', hash, field) end
end

local function alive() redis.call('ZADD', replicas, now + ttl_ms, replica) end

local function mean_duration() return tonumber(redis.call('GET', mean_key) or 'INITIAL_DURATION') end

local function lease(id, principal, for_replica)
  local previous = redis.call('HGET', holder, id)
  if redis.call('ZADD', leases, now + ttl_ms, id) == 1 then
    count(leased_count, principal, 1)
  elseif previous ~= principal then
    count(leased_count, previous or '', -1)
    count(leased_count, principal, 1)
  end
  redis.call('HSET', holder, id, principal)
  redis.call('HSET', leased_by, id, for_replica or replica)
end

local function drop_lease(id)
  if redis.call('ZREM', leases, id) == 0 then return false end
  count(leased_count, redis.call('HGET', holder, id) or '', -1)
  redis.call('HDEL', holder, id)
  redis.call('HDEL', leased_by, id)
  redis.call('HDEL', inbox, id)
  return true
end

local function leave_queue(id)
  if redis.call('ZREM', queue, id) == 0 then return false end
  count(queued_count, redis.call('HGET', holder, id) or '', -1)
  redis.call('HDEL', holder, id)
  redis.call('HDEL', queued_by, id)
  return true
end

-- A dead replica's promoted ids need no sweep of their own: their leases lapse, and drop_lease clears them.
local function expire_lapsed()
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', '(' .. now)) do drop_lease(id) end
  local gone = redis.call('ZRANGEBYSCORE', replicas, '-inf', '(' .. now)
  if #gone > 0 then
    local dead = {}
    for _, name in ipairs(gone) do
      dead[name] = true
      redis.call('ZREM', replicas, name)
    end
    for _, id in ipairs(redis.call('ZRANGE', queue, 0, -1)) do
      local by = redis.call('HGET', queued_by, id)
      if by and dead[by] then leave_queue(id) end
    end
  end
end

local function retry_after()
  local needed = redis.call('ZCARD', queue) + 1
  return math.max(0.5, needed * mean_duration() / math.max(redis.call('ZCARD', leases), 1))
end

local function promote()
  local mine = {}
  local promoted = redis.call('HGETALL', inbox)
  for i = 1, #promoted, 2 do
    if promoted[i + 1] == replica then
      redis.call('HDEL', inbox, promoted[i])
      if redis.call('ZSCORE', leases, promoted[i]) then mine[#mine + 1] = promoted[i] end
    end
  end
  while redis.call('ZCARD', leases) < capacity do
    local head = redis.call('ZPOPMIN', queue)
    if #head == 0 then break end
    local id = head[1]
    local principal = redis.call('HGET', holder, id) or ''
    local by = redis.call('HGET', queued_by, id)
    redis.call('HDEL', queued_by, id)
    count(queued_count, principal, -1)
    lease(id, principal, by)
    if not by or by == replica then mine[#mine + 1] = id else redis.call('HSET', inbox, id, by) end
  end
  return mine
end

local function reply(code, extra, ids)
  local out = {code, redis.call('ZCARD', leases), redis.call('ZCARD', queue), extra or ''}
  for _, id in ipairs(ids or {}) do out[#out + 1] = id end
  return out
end
""".replace("INITIAL_DURATION", repr(INITIAL_DURATION_SECONDS))

# ARGV[6] id, ARGV[7] principal.
ADMIT = Script(
    PRELUDE
    + """
local id, principal = ARGV[6], ARGV[7]
alive()
expire_lapsed()
if redis.call('ZSCORE', leases, id) then return reply('admitted') end
if redis.call('ZSCORE', queue, id) then return reply('queued') end
local held = tonumber(redis.call('HGET', leased_count, principal) or '0')
  + tonumber(redis.call('HGET', queued_count, principal) or '0')
if held >= max_per_principal then return reply('principal', tostring(mean_duration() / math.max(held, 1))) end
if redis.call('ZCARD', leases) < capacity and redis.call('ZCARD', queue) == 0 then
  lease(id, principal)
  return reply('admitted')
end
if redis.call('ZCARD', queue) < max_queued then
  redis.call('ZADD', queue, redis.call('INCR', arrivals), id)
  redis.call('HSET', holder, id, principal)
  redis.call('HSET', queued_by, id, replica)
  redis.call('HINCRBY', queued_count, principal, 1)
  return reply('queued')
end
return reply('full', tostring(retry_after()))
"""
)

# ARGV[6] id, ARGV[7] principal.
ADMIT_UNCHECKED = Script(
    PRELUDE
    + """
alive()
-- This replica resumes the discussion, so the lease is its own now, whoever held it before a restart.
lease(ARGV[6], ARGV[7])
return reply('admitted')
"""
)

# ARGV[6] id, ARGV[7] principal.
ADOPT = Script(
    PRELUDE
    + """
alive()
expire_lapsed()
if redis.call('ZSCORE', leases, ARGV[6]) then return reply('held') end
leave_queue(ARGV[6])
lease(ARGV[6], ARGV[7])
return reply('adopted')
"""
)

# ARGV[6] id.
RENEW = Script(
    PRELUDE
    + """
local id = ARGV[6]
alive()
local expires = redis.call('ZSCORE', leases, id)
if not expires or tonumber(expires) < now then return reply('lapsed') end
-- A replica that stalled past its ttl finds the discussion adopted by another: it must stop its copy.
local by = redis.call('HGET', leased_by, id)
if by and by ~= replica then return reply('lost') end
lease(id, redis.call('HGET', holder, id) or '')
return reply('renewed')
"""
)

# ARGV[6] id, ARGV[7] duration in seconds or ''.
RELEASE = Script(
    PRELUDE
    + """
local id, duration = ARGV[6], ARGV[7]
alive()
drop_lease(id)
leave_queue(id)
if duration ~= '' then
  -- Exponentially weighted: recent discussions say most about the next ones.
  local mean = mean_duration()
  redis.call('SET', mean_key, tostring(mean + 0.2 * (tonumber(duration) - mean)))
end
return reply('released', '', promote())
"""
)

REAP = Script(
    PRELUDE
    + """
alive()
expire_lapsed()
return reply('reaped', '', promote())
"""
)

SCRIPTS = (ADMIT, ADMIT_UNCHECKED, ADOPT, RENEW, RELEASE, REAP)


def default_replica_id() -> str:
    """Host name plus a random suffix: unique per process."""
    return f"{socket.gethostname()}-{secrets.token_hex(4)}"


class RedisAdmission:
    """Admission shared by every replica using this Redis: `capacity` is a fleet-wide cap."""

    def __init__(
        self,
        client: Client,
        *,
        capacity: int,
        max_queued: int,
        max_per_principal: int,
        lease_ttl_seconds: float,
        replica_id: str = "",
        key_prefix: str = "rt",
    ) -> None:
        self.capacity = capacity
        self._redis = client
        self._replica_id = replica_id or default_replica_id()
        base = f"{{{key_prefix}:adm}}:"
        self._keys = [
            base + name
            for name in (
                "leases",
                "holder",
                "queue",
                "queued-count",
                "arrivals",
                "mean-duration",
                "replicas",
                "queued-by",
                "leased-by",
                "leased-count",
                "inbox",
            )
        ]
        self._common: list[EncodableArg] = [
            self._replica_id,
            capacity,
            max_queued,
            max_per_principal,
            max(1, round(lease_ttl_seconds * 1000)),
        ]
        self._max_queued = max_queued
        self._max_per_principal = max_per_principal
        # What the last script saw: active() and queued() are synchronous (metrics, monitor reports).
        self._active = 0
        self._queued = 0
        # Refused callers told to come back, counted by this replica (each replica spreads its own).
        self._waiting = WaitingCallers()

    def active(self) -> int:
        """Leases held fleet-wide, as of this replica's last admission call."""
        return self._active

    def queued(self) -> int:
        """Discussions waiting fleet-wide, as of this replica's last admission call."""
        return self._queued

    async def admit(self, discussion_id: str, principal: str) -> bool:
        """Lease a slot, or queue, or raise ResourceExhausted naming the limit; RedisUnavailable fails closed."""
        code, extra, _ = await self._run(ADMIT, "admit", discussion_id, principal)
        if code == "admitted":
            return True
        if code == "queued":
            return False
        if code == "principal":
            # extra: seconds per slot of this principal. Callers waiting are counted per replica.
            raise ResourceExhausted(
                f"you already have {self._max_per_principal} discussions running or queued; "
                "wait for one to finish or cancel one",
                retry_after_seconds=self._waiting.retry_after(f"principal:{principal}", float(extra)),
                subject=f"principal:{principal}",
                limit="max_concurrent_sessions_per_principal",
            )
        full = "and its queue is full" if self._max_queued else "(no queue)"
        # extra: the wait of the first caller behind the queue, (queued + 1) slot-intervals.
        seconds_per_slot = float(extra) / (self._queued + 1)
        raise ResourceExhausted(
            f"the server is running its maximum of {self.capacity} discussions {full}; retry later",
            retry_after_seconds=self._waiting.retry_after("global", seconds_per_slot, ahead=self._queued),
            subject="global",
            limit="max_queued_sessions" if self._max_queued else "max_concurrent_sessions",
        )

    async def admit_unchecked(self, discussion_id: str, principal: str) -> None:
        """Lease past the caps (a discussion resumed after a restart was admitted before)."""
        await self._run(ADMIT_UNCHECKED, "admit", discussion_id, principal)

    async def adopt(self, discussion_id: str, principal: str) -> bool:
        """Take over a discussion whose lease lapsed (its replica died): True for exactly one caller, past the caps."""
        code, _, _ = await self._run(ADOPT, "adopt", discussion_id, principal)
        return code == "adopted"

    async def renew(self, discussion_id: str) -> bool:
        """Extend the lease by a ttl from now (Redis' clock); False if it lapsed or another replica adopted it."""
        code, _, _ = await self._run(RENEW, "renew", discussion_id)
        return code == "renewed"

    async def release(self, discussion_id: str, duration_seconds: float | None = None) -> list[str]:
        """Free the lease or queue place and return what this replica should start now.

        Best effort while Redis is down: a lease that could not be released lapses
        within its ttl, and raising here would only hide the caller's own outcome.
        """
        duration = "" if duration_seconds is None else repr(float(duration_seconds))
        try:
            _, _, promoted = await self._run(RELEASE, "release", discussion_id, duration)
        except RedisUnavailable as error:
            logger.warning("could not release the admission slot of %s (it lapses by itself): %s", discussion_id, error)
            return []
        return promoted

    async def reap(self) -> list[str]:
        """Expire lapsed leases and dead replicas' queue places; return what this replica should start now."""
        _, _, promoted = await self._run(REAP, "reap")
        return promoted

    async def _run(self, script: Script, operation: str, *args: str) -> tuple[str, str, list[str]]:
        """Run one admission script; returns (code, extra, promoted ids) and refreshes the cached counts."""
        with unavailable_on_failure(f"admission {operation}"):
            reply: list[Any] = await script(self._redis, self._keys, [*self._common, *args])
        code, active, queued, extra, *promoted = reply
        self._active, self._queued = int(active), int(queued)
        return _text(code), _text(extra), [_text(i) for i in promoted]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
